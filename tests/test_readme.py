"""The README names only files a clone of the repository has, no folder outside it, and its figures match the
committed files it names as their source (issues 27 and 29: "README figures without a file behind them",
"The README names folders a clone does not have").

Paths are found in the README's code: inline `backticked` spans and fenced blocks, split into tokens; a token
that starts with one of the repository's top-level folders (or is one of its top-level files) is a path the
README promises, so it must exist (a glob must match something). In the Layout table, a bare file name in a
folder's row must exist in that folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

TOP_FOLDERS = ("qnkit", "train", "export", "benchmarks", "tests", "resume", "csrc", ".ci")
TOP_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md")
PATH_RE = re.compile(r"^(?:\./)?(?:(?:" + "|".join(map(re.escape, TOP_FOLDERS)) + r")/[\w.\-/*]*|"
                     + "|".join(map(re.escape, TOP_FILES)) + r")$")
FILE_EXTS = ("py", "pyx", "h", "c", "ini", "json", "jsonl", "sh", "md", "toml", "cfg", "txt", "nii.gz", "onnx",
             "safetensors")
BARE_FILE_RE = re.compile(r"^[\w\-]+\.(?:" + "|".join(re.escape(e) for e in FILE_EXTS) + r")$")
#: References to places a clone does not have: the development machine's shared data and spec.
OUTSIDE = ("shared/", "SPEC.md", "SPEC §")


def code_spans(text: str) -> list[str]:
    """Fenced code blocks and inline code spans (which may wrap across lines), in order."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return fenced + re.findall(r"`([^`]+)`", rest)


def tokens(span: str) -> list[str]:
    return [t.strip(".,;:") for t in re.split(r"[\s,;()\[\]{}|\"'=<>]+", span) if t.strip(".,;:")]


def repo_paths(text: str) -> list[str]:
    """Every repository-relative path the README's code names, in order, without repeats."""
    found = []
    for span in code_spans(text):
        for token in tokens(span):
            if PATH_RE.match(token) and token not in found:
                found.append(token)
    return found


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    return [p for p in repo_paths(text) if not (any(root.glob(p.rstrip("/"))) if "*" in p else (root / p).exists())]


def layout_files(text: str) -> list[tuple[str, str]]:
    """(folder, bare file name) for each file name in a Layout table row whose first cell is a folder."""
    pairs = []
    for line in text.splitlines():
        row = re.match(r"^\| `([\w./\-]+/)` \|(.*)\|\s*$", line)
        if row:
            for span in re.findall(r"`([^`]+)`", row.group(2)):
                pairs += [(row.group(1), t) for t in tokens(span) if BARE_FILE_RE.match(t)]
    return pairs


def missing_layout_files(text: str, root: Path = ROOT) -> list[str]:
    return [f"{folder}{name}" for folder, name in layout_files(text)
            if not any((root / folder).rglob(name)) and not (root / name).exists()]


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_every_repository_path_the_readme_names_exists(readme):
    assert missing_paths(readme) == []


def test_every_file_the_layout_table_names_is_in_its_folder(readme):
    assert layout_files(readme), "no Layout table rows found: the table or this test's pattern changed"
    assert missing_layout_files(readme) == []


def test_the_readme_names_the_files_its_figures_come_from(readme):
    named = repo_paths(readme)
    for source in ("qnkit/models/registry.json", "resume/kidney-synth-7/validation.json",
                   "resume/kidney-synth-7/mass-effect.json", "benchmarks/results/e2e-kidney-synth-7-amd-epyc-2cpu.json",
                   "resume/kidney-synth/metrics.jsonl", "resume/kidney-synth/evaluation.json",
                   "resume/kidney-synth-2/metrics.jsonl", "resume/kidney-synth-2/evaluation.json",
                   "train/shipped.ini", "benchmarks/results/demo-amd-epyc-2cpu.json"):
        assert source in named, source


def test_no_reference_outside_the_repository(readme):
    for line_no, line in enumerate(readme.splitlines(), 1):
        for outside in OUTSIDE:
            assert outside not in line, f"README.md:{line_no} names {outside!r}, which a clone does not have: {line}"


def test_the_checks_catch_a_missing_file(tmp_path):
    (tmp_path / "resume" / "run").mkdir(parents=True)
    (tmp_path / "resume" / "run" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.pyx").write_text("")
    text = ("Figures from `resume/run/metrics.jsonl` and `resume/run/evaluation.json`; `resume/*/metrics.jsonl`,\n"
            "`resume/*/nothing.json`. A wrapped span `python -m x --data\n  benchmarks/results/gone.json`.\n"
            "```bash\nqnkit train --settings train/gone.ini   # and bundles/kits, /nfs/x/train/y: not repo paths\n```\n"
            "| `csrc/` | kernels (`a.pyx`, `b.pyx`), built by `setup.py` |\n")
    assert repo_paths(text) == ["train/gone.ini", "resume/run/metrics.jsonl", "resume/run/evaluation.json",
                                "resume/*/metrics.jsonl", "resume/*/nothing.json", "benchmarks/results/gone.json",
                                "csrc/", "setup.py"]
    assert missing_paths(text, tmp_path) == ["train/gone.ini", "resume/run/evaluation.json", "resume/*/nothing.json",
                                             "benchmarks/results/gone.json", "setup.py"]
    assert missing_layout_files(text, tmp_path) == ["csrc/b.pyx", "csrc/setup.py"]


# --- figures quoted from committed files -----------------------------------------------------------------


def _metrics(run: str) -> list[dict]:
    lines = (ROOT / "resume" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _registry_validation(model: str, data_prefix: str) -> dict:
    models = json.loads((ROOT / "qnkit" / "models" / "registry.json").read_text())["models"]
    return next(v["figures"] for v in models[model]["validation"] if v["data"].startswith(data_prefix))


def _quoted_figures() -> list[str]:
    """Each string the README must contain, made from the file the README names beside it."""
    ks, ks2 = _metrics("kidney-synth"), _metrics("kidney-synth-2")
    lineage = [_metrics(run)[-1]["cpu_hours"] for run in ("kidney-synth-5", "kidney-synth-6", "kidney-synth-7")]
    real = _registry_validation("kidney-synth", "real CT")
    real7 = _registry_validation("kidney-synth-7", "real CT")
    held7 = _registry_validation("kidney-synth-7", "held-out phantoms")
    bundle7 = json.loads((ROOT / "qnkit" / "models" / "kidney-synth-7" / "qnkit.json").read_text())
    int8 = bundle7["cpu_precision"]
    mass7 = json.loads((ROOT / "resume" / "kidney-synth-7" / "mass-effect.json").read_text())
    e2e7 = json.loads((ROOT / "benchmarks" / "results" / "e2e-kidney-synth-7-amd-epyc-2cpu.json").read_text())["e2e"]
    phantoms = json.loads((ROOT / "resume" / "kidney-synth" / "evaluation.json").read_text())
    phantoms2 = json.loads((ROOT / "resume" / "kidney-synth-2" / "evaluation.json").read_text())
    settings = (ROOT / "resume" / "kidney-synth" / "settings.ini").read_text()
    slices = int(re.search(r"^slices_per_epoch\s*=\s*(\d+)", settings, flags=re.M).group(1))
    weights = (ROOT / "qnkit" / "models" / "kidney-synth-7" / "weights.safetensors").stat().st_size
    epoch_min = [row["seconds"] / 60 for row in ks]
    demo = json.loads((ROOT / "benchmarks" / "results" / "demo-amd-epyc-2cpu.json").read_text())["last"]
    dice = [c["dice"] for c in demo["cases"]]
    train = {r["variant"]: r for r in
             json.loads((ROOT / "benchmarks" / "results" / "train-amd-epyc-2cpu.json").read_text())["train"]["rows"]}
    whole, window = train["whole"], train["window"]
    ks4 = _metrics("kidney-synth-4")
    ks4_window = next(row for row in reversed(ks4) if row.get("train_slice_side"))
    ks4_check = json.loads((ROOT / "resume" / "kidney-synth-4" / "validation.json").read_text())
    ks4_real, ks4_mass = ks4_check["real_ct"]["figures"], ks4_check["mass_effect"]["max_abs_relative_change"]
    quality = json.loads((ROOT / "resume" / "kidney-synth" / "quality-calibration.json").read_text())
    held_out = quality["held_out"]
    e2e = json.loads((ROOT / "benchmarks" / "results" / "e2e-amd-epyc-2cpu.json").read_text())["e2e"]
    real_sm, real_dcm = (c["kidneys"] for c in json.loads(
        (ROOT / "resume" / "kidney-synth" / "quality-real-ct.json").read_text())["cts"])

    def _unedged(kidney):  # the score without the at-edge signal
        return max(v / quality["limits"][k] for k, v in kidney["signals"].items() if k != "at_edge" and quality["limits"].get(k))

    sealed = json.loads((ROOT / "qnkit" / "models" / "kidney-synth" / "qnkit.json").read_text())["quality"]
    assert sealed["limits"] == quality["limits"], "the shipped bundle carries the committed calibration"
    return [
        f"the default path takes {e2e['seconds']:.1f} s against {e2e['eager_seconds']:.1f} s for eager FP32 on every "
        f"slice ({e2e['speedup_vs_eager']:.2f}x, mask Dice\n{e2e['mask_dice_vs_eager']:.4f} between them), and "
        f"`--quality --uncertainty 8` takes {e2e['uncertainty']['wall_s']:.1f} s "
        f"({e2e['uncertainty']['cost_vs_plain']:.2f}x the plain run",
        f"chosen on {quality['chosen_on']['kidneys']} kidneys",
        f"On {held_out['kidneys']} held-out kidneys",
        f"Spearman rank correlation with the true Dice is {held_out['spearman']['score']:.3f}, "
        f"{held_out['bad_flagged']} of the {held_out['bad']} kidneys with Dice below 0.75",
        f"and {'both' if held_out['good'] == 2 else held_out['good']} with Dice of 0.90 or more are `ok`",
        f"true Dice of {held_out['kidneys']} held-out phantom kidneys",
        f"mirror pass {held_out['spearman']['mirror_disagreement']:.2f}, dropout volume spread "
        f"{held_out['spearman']['mc_volume_cv']:.2f}, dropout disagreement\n{held_out['spearman']['mc_disagreement']:.2f}",
        f"(+{quality['calibration']['spearman']['hu_spread']:.2f} on the calibration kidneys",
        f"(right Dice {real_sm['right']['dice']:.3f}, left {real_sm['left']['dice']:.3f}); without the edge they would "
        f"score {_unedged(real_sm['right']):.2f} and {_unedged(real_sm['left']):.2f}",
        f"found, {real_dcm['left']['volume_ml']:.1f} mL, is `{real_dcm['left']['verdict']}`",
        f"({real_dcm['left']['signals']['mc_disagreement']:.3f} against a limit of {quality['limits']['mc_disagreement']:.3f})",
        f"reference Dice {ks4_window['reference_dice']:.3f} after the window epochs and {ks4[-1]['reference_dice']:.3f} "
        f"after the two whole-slice epochs",
        f"in {ks4[-1]['cpu_hours']:.2f} CPU hours",
        f"at most {100 * ks4_mass:.1f} %",
        f"its Dice is {ks4_real['both']:.3f} ({ks4_real['right']:.3f} right, {ks4_real['left']:.3f} left)",
        f"a window costs {window['seconds_per_slice']:.3f} s against {whole['seconds_per_slice']:.3f} s for a whole "
        f"slice ({window['speedup_per_slice']:.2f}x per slice; {window['gflop_per_slice']:.2f} against "
        f"{whole['gflop_per_slice']:.2f} GFLOP, {window['gflop_per_s']:.0f} against {whole['gflop_per_s']:.0f} GFLOP/s)",
        f"{train['window, bf16, compiled']['seconds_per_slice']:.3f} s with bf16 autocast and a compiled step "
        f"({train['window, bf16, compiled']['speedup_per_slice']:.2f}x a whole slice in FP32, "
        f"{train['window, bf16, compiled']['gflop_per_s']:.0f} GFLOP/s)",
        f"held-out case of the run's test split ({['one', 'two', 'three'][len(dice) - 1]})",
        f"load average {demo['machine']['load_average_1_5_15min'][2]:.1f} over the last 15 minutes",
        f"test Dice {' and '.join(f'{d:.4f}' for d in dice)}, mean {demo['mean_dice']:.4f}",
        f"{demo['seconds']:.0f} s in all, {demo['stages_s']['train']:.0f} s of it training",
        f"weights {weights / 1e6:.2f} MB",
        f"kidney-synth-5` (anatomy version 4: large masses against a kidney as negatives, spleen, liver and masses at "
        f"the kidney's HU; {lineage[0]:.2f} CPU hours)",
        f"as in TotalSegmentator's masks and kidney dosimetry's volume; {lineage[1]:.2f} CPU hours)",
        f"eight epochs on 160 new version 5 bodies; {lineage[2]:.2f} CPU hours): {sum(lineage):.2f} CPU hours of "
        f"training",
        f"its held-out phantoms (mean Dice {held7['mean_dice']:.3f}",
        f"Dice {real7['both']:.3f} for both kidneys, {real7['right']:.3f} right ({real7['voxels_right']:,} voxels "
        f"against the labels' {real7['voxels_true_right']:,}), {real7['left']:.3f} left ({real7['voxels_left']:,} "
        f"against {real7['voxels_true_left']:,})",
        f"the default before it, {real['both']:.3f}, {real['right']:.3f} and {real['left']:.3f}",
        f"moves the volume it reports by at most {100 * mass7['max_abs_relative_change']:.2f} % "
        f"({len(mass7['cases'])} bodies",
        f"{int8['kept_float']} nodes kept in FP32, {100 * int8['int8_flops_share']:.0f} % of the FLOPs in INT8) agrees "
        f"with FP32 at mask Dice {int8['worst_dice']:.4f} on the real CT and {int8['phantoms']['mean_dice']:.4f} on "
        f"average over {int8['phantoms']['cases_counted']} held-out phantoms (worst {int8['phantoms']['min_dice']:.4f})",
        f"it takes {e2e7['seconds']:.1f} s against the old default's {e2e7['baseline']['wall_s']:.1f} s, side by side "
        f"on the same 2 cores ({e2e7['seconds_vs_baseline']:.2f}×",
        f"takes {e2e7['seconds']:.1f} s against {e2e7['eager_seconds']:.1f} s eager FP32 "
        f"({e2e7['speedup_vs_eager']:.1f}x, mask Dice {e2e7['mask_dice_vs_eager']:.4f} between them), and "
        f"kidney-synth's default path {e2e7['baseline']['wall_s']:.1f} s in the same run",
        f"mean Dice {phantoms['mean_dice']:.2f}, `resume/kidney-synth/evaluation.json`; real CT {real['both']:.3f})",
        f"the recipe's {len(ks)} epochs of {slices:,} slices",
        f"{sum(row['seconds'] for row in ks) / 3600:.1f} hours of training",
        f"{len(ks2)} epochs, `resume/kidney-synth-2/metrics.jsonl`; mean Dice {phantoms2['mean_dice']:.2f} on its own "
        f"{len(phantoms2['cases'])} held-out phantoms",
        f"took {min(epoch_min):.1f} to {max(epoch_min):.0f} minutes",
    ]


def test_each_quoted_figure_matches_its_file(readme):
    flat = " ".join(readme.split())
    wrong = [expected for expected in _quoted_figures() if " ".join(expected.split()) not in flat]
    assert wrong == [], "README.md does not quote these as their source files give them (update it from the files)"
