"""The model recipes (synth -> train -> evaluate -> export -> register) as orchestration: which `qnkit` commands
a recipe runs, in which order, and what it reuses. `qnkit train` itself is replaced by a stand-in that
finishes the epochs it is asked for, since what is tested is the recipe's bookkeeping, not training."""
from __future__ import annotations

from pathlib import Path

import pytest


def test_recipe_trains_its_phases_in_turn_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    """The recipe's phases become `qnkit train` then `qnkit train --resume --lr ... --step-size ...`;
    a finished phase is skipped, and --epochs caps the schedule."""
    import json

    from qnkit.train import recipe as R

    calls = []

    def fake_train(*args, **kw):  # a `qnkit train` that finishes the epochs it is asked for
        args = [str(a) for a in args]
        calls.append(args)
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": int(args[args.index("--epochs") + 1])}) + "\n")

    monkeypatch.setattr(R, "_qnkit", fake_train)
    plan = {"settings": "shipped", "phases": [{"epochs": 5}, {"epochs": 15, "lr": 1e-3, "step_size": 4}]}
    run = tmp_path / "run"
    R.train_phases(plan, tmp_path / "data", run)
    assert calls[0][:1] == ["train"] and "--resume" not in calls[0] and calls[0][-2:] == ["--epochs", "5"]
    assert calls[1][-6:] == ["--epochs", "15", "--lr", "0.001", "--step-size", "4"] and "--resume" in calls[1]

    calls.clear()
    R.train_phases(plan, tmp_path / "data", run)
    assert calls == []  # all done
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 7}) + "\n")
    R.train_phases(plan, tmp_path / "data", run)  # phase 1 done, phase 2 interrupted at epoch 7
    assert len(calls) == 1 and "--resume" in calls[0] and "15" in calls[0]
    calls.clear()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 7}) + "\n")
    R.train_phases(plan, tmp_path / "data", run, epochs=12)
    assert len(calls) == 1 and calls[0][calls[0].index("--epochs") + 1] == "12" and "--lr" in calls[0]
    calls.clear()
    R.train_phases(plan, tmp_path / "data", run / "none", epochs=3)
    assert len(calls) == 1 and "--resume" not in calls[0] and "--lr" not in calls[0] and calls[0][-2:] == ["--epochs", "3"]


def test_a_fine_tuning_recipe_starts_from_the_committed_run(tmp_path, monkeypatch):
    """kidney-synth-2: its first phase is `qnkit train --init-from resume/kidney-synth`, resumes are plain."""
    import json

    from qnkit.train import recipe as R

    calls = []

    def fake_train(*args, **kw):
        args = [str(a) for a in args]
        calls.append(args)
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": int(args[args.index("--epochs") + 1])}) + "\n")

    monkeypatch.setattr(R, "_qnkit", fake_train)
    recipe = {**R.RECIPES["kidney-synth-2"], "phases": [{"epochs": 2, "lr": 5e-4, "schedule": "poly"},
                                                         {"epochs": 4, "lr": 1e-4}]}
    resume_dir = Path(__file__).resolve().parents[1] / "resume"  # the checkout's committed runs
    source = R.init_source(recipe, resume_dir=resume_dir)
    assert source == resume_dir / "kidney-synth" and (source / "checkpoints" / "best" / "meta.json").is_file()
    with pytest.raises(SystemExit, match="--resume-dir"):
        R.init_source(recipe)  # never guessed from where qnkit is installed
    run = tmp_path / "run"
    R.train_phases(recipe, tmp_path / "data", run, init_from=source)
    assert calls[0][calls[0].index("--init-from") + 1] == str(source) and "--resume" not in calls[0]
    assert calls[0][calls[0].index("--schedule") + 1] == "poly"
    assert "--init-from" not in calls[1] and "--resume" in calls[1]
    assert R.init_source(R.RECIPES["kidney-synth"]) is None
    with pytest.raises(SystemExit, match="no trained run"):
        R.init_source(recipe, tmp_path / "empty")


def _finished_run(workdir, hashes: dict, epochs: int) -> None:
    """What a GPU machine brings back: a run trained to `epochs`, its evaluation and bundle (no phantoms)."""
    import json

    best = workdir / "run" / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "meta.json").write_text(json.dumps({"epoch": epochs - 3, "files": hashes}))
    (workdir / "run" / "metrics.jsonl").write_text(json.dumps({"epoch": epochs}) + "\n")
    (workdir / "evaluation.json").write_text(json.dumps({"epoch": epochs - 3, "checkpoint_sha256": hashes,
                                                         "mean_dice": 0.9}))
    (workdir / "bundle").mkdir()
    (workdir / "bundle" / "qnkit.json").write_text(json.dumps({"training": {"checkpoint_sha256": hashes},
                                                               "cpu_precision": {"default": "fp32", "why": "x"}}))


def test_a_run_trained_elsewhere_is_finished_without_its_phantoms(tmp_path, monkeypatch):
    """build() reuses a finished run, its evaluation and its bundle when they are of the run's best checkpoint
    (by SHA-256), so a GPU machine's run is validated and installed here without making its phantoms again;
    a stale evaluation is redone, and a step that needs phantoms without them says so."""
    import json

    from qnkit.train import recipe as R

    calls = []
    monkeypatch.setattr(R, "_qnkit", lambda *args, **kw: calls.append([str(a) for a in args]))
    work = tmp_path / "work"
    _finished_run(work, {"model.safetensors": "aa"}, R.RECIPES["kidney-synth-wide"]["phases"][-1]["epochs"])
    entry = R.build("kidney-synth-wide", work, None, None, None, install_into=None)
    assert calls == []
    assert entry["validation"][0]["figures"]["mean_dice"] == 0.9 and "GPU" in entry["machine"]
    assert "cases 0-119" in entry["trained_on"] and entry["settings"] == "train/shipped_gpu.ini"

    meta = work / "run" / "checkpoints" / "best" / "meta.json"
    meta.write_text(json.dumps({"epoch": 40, "files": {"model.safetensors": "bb"}}))  # trained on: stale outputs
    with pytest.raises(SystemExit, match="no phantoms"):
        R.build("kidney-synth-wide", work, None, None, None, install_into=None)
    (work / "data").mkdir()
    (work / "data" / "kits.json").write_text("[]")
    assert R.build("kidney-synth-wide", work, None, None, None, install_into=None, until="evaluate") == {}
    assert [c[0] for c in calls] == ["evaluate"]


def test_a_recipe_draws_its_kidneys_from_the_first_kits_cases(tmp_path):
    import json

    from qnkit.train import recipe as R

    kits = tmp_path / "kits"
    for i in range(5):
        (kits / f"case_{i:05d}").mkdir(parents=True)
        (kits / f"case_{i:05d}" / "segmentation.nii.gz").write_bytes(b"x")
    (kits / "kits.json").write_text(json.dumps([{"case_id": f"case_{i:05d}"} for i in range(5)]))
    folder = R.first_kits_cases(kits, 3, tmp_path / "subset")
    assert sorted(p.name for p in folder.iterdir()) == ["case_00000", "case_00001", "case_00002", "kits.json"]
    assert (folder / "case_00002" / "segmentation.nii.gz").read_bytes() == b"x"
    assert [e["case_id"] for e in json.loads((folder / "kits.json").read_text())] == ["case_00000", "case_00001",
                                                                                      "case_00002"]
    with pytest.raises(SystemExit, match="needs the first 9"):
        R.first_kits_cases(kits, 9, tmp_path / "subset")


def test_benchmark_scripts_parse_and_gpu_ones_name_a_gpu_recipe():
    """The device scripts cannot run here (no GPU); they must at least parse, and the recipe they are
    documented with must be a GPU recipe whose KiTS19 subset fits the device's 64 MiB carry limit."""
    import subprocess

    from qnkit.train import recipe as R

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    for script in sorted(root.glob("*.sh")):  # gpu_*.sh, and small_run.sh (30 min of CPU: not run here)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script.name
    for script in sorted(root.glob("gpu_*.sh")):
        assert "kidney-synth-wide" in script.read_text() or script.name in ("gpu_session.sh", "gpu_kits_stub.sh")
    wide = R.RECIPES["kidney-synth-wide"]
    assert wide["machine"] == "gpu" and 0 < wide["kits_cases"] <= 150  # ~0.31 MB of labels per case


def test_recipe_command_refuses_bad_input_with_one_line_and_exit_2(tmp_path, capsys):
    from qnkit.train import recipe as R

    with pytest.raises(SystemExit) as exit_info:
        R.main(["kidney-synth-wide", "--workdir", str(tmp_path / "work")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "no phantoms" in lines[0]


def test_the_recipe_writes_its_entry_beside_the_run_and_installs_only_where_told(tmp_path, monkeypatch):
    """build() never writes into the installed qnkit: the entry goes to WORK/registry_entry.json, and only an
    explicit --install-into (a checkout's qnkit/models) gets the bundle and the registry entry."""
    import hashlib
    import json

    import qnkit
    from qnkit.train import recipe as R

    package = Path(qnkit.__file__).resolve().parent

    def snapshot():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(package.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts}

    before = snapshot()
    monkeypatch.setattr(R, "_qnkit", lambda *args, **kw: None)
    work = tmp_path / "work"
    _finished_run(work, {"model.safetensors": "aa"}, R.RECIPES["kidney-synth-wide"]["phases"][-1]["epochs"])
    entry = R.build("kidney-synth-wide", work, None, None, None)
    assert json.loads((work / "registry_entry.json").read_text()) == entry
    assert snapshot() == before, "the recipe wrote into the installed package"

    models = tmp_path / "checkout" / "qnkit" / "models"
    models.mkdir(parents=True)
    (models / "registry.json").write_text(json.dumps({"models": {"old": {"default": True}}}))
    R.build("kidney-synth-wide", work, None, None, None, install_into=models)
    registry = json.loads((models / "registry.json").read_text())
    assert (models / "kidney-synth-wide" / "qnkit.json").is_file()
    assert registry["models"]["kidney-synth-wide"]["default"] is False and registry["models"]["old"]["default"]
    with pytest.raises(SystemExit, match="not a qnkit/models folder"):
        R.build("kidney-synth-wide", work, None, None, None, install_into=tmp_path / "elsewhere")
    assert snapshot() == before


def test_the_registry_records_hours_curve_and_checkpoint_hash(tmp_path):
    """issue 25 point 2: total CPU and wall hours, how the steps ran, the whole validation curve (the reference
    Dice where it was scored) and the hash of the shipped checkpoint."""
    import json

    from qnkit.train.recipe import training_record

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    run.mkdir()
    bundle.mkdir()
    rows = [{"epoch": 1, "val_dice": 0.51234, "best_val_dice": 0.51234, "best_epoch": 1, "cpu_hours": 0.4,
             "wall_hours": 0.3},
            {"epoch": 2, "val_dice": 0.6, "best_val_dice": 0.6, "best_epoch": 2, "cpu_hours": 0.7, "wall_hours": 0.5,
             "reference_dice": 0.55561, "step": "bfloat16 autocast (AVX512-BF16), torch.compile"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (bundle / "qnkit.json").write_text(json.dumps({"training": {"checkpoint_sha256": {"model.safetensors": "ab"}}}))
    record = training_record(run, bundle)
    assert (record["epochs"], record["cpu_hours"], record["wall_hours"], record["best_epoch"]) == (2, 0.7, 0.5, 2)
    assert record["validation_curve"] == [[1, 0.5123, None], [2, 0.6, 0.5556]]
    assert record["steps"] == ["FP32", "bfloat16 autocast (AVX512-BF16), torch.compile"]
    assert record["checkpoint_sha256"] == {"model.safetensors": "ab"}


def test_a_widening_recipe_sets_its_width_at_the_start_and_calibrates_before_evaluating(tmp_path, monkeypatch):
    """kidney-synth-9: `--num-filters 32` with `--init-from` on the first start only (a resume keeps the run's
    network), and its evaluation fits the threshold first (`qnkit evaluate --calibrate-threshold`)."""
    import json

    from qnkit.train import recipe as R

    calls = []

    def fake_qnkit(*args, **kw):
        args = [str(a) for a in args]
        calls.append(args)
        if args[0] == "train":
            (run / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run / "metrics.jsonl").write_text(json.dumps({"epoch": int(args[args.index("--epochs") + 1])}) + "\n")

    monkeypatch.setattr(R, "_qnkit", fake_qnkit)
    recipe = {**R.RECIPES["kidney-synth-9"], "phases": [{"epochs": 1, "lr": 5e-4}, {"epochs": 2, "lr": 1e-4}]}
    run = tmp_path / "run"
    R.train_phases(recipe, tmp_path / "data", run, init_from=tmp_path / "source")
    assert calls[0][calls[0].index("--num-filters") + 1] == "32" and "--init-from" in calls[0]
    assert "--num-filters" not in calls[1] and "--resume" in calls[1]

    calls.clear()
    work = tmp_path / "work"
    _finished_run(work, {"model.safetensors": "aa"}, 2)
    (work / "evaluation.json").unlink()
    (work / "data").mkdir()
    (work / "data" / "kits.json").write_text("[]")
    R.build("kidney-synth-9", work, None, None, None, epochs=2, resume_dir=Path(__file__).resolve().parents[1] /
            "resume", until="evaluate")
    assert calls == [["evaluate", str(work / "run"), "--json", str(work / "evaluation.json"), "--calibrate-threshold"]]
