"""The recipe of a shipped model: one command from nothing to a validated bundle, ready to install.

    python -m qnkit.train.recipe kidney-synth --workdir WORK --kits-labels KITS19_LABELS \\
        --real-ct example_ct_sm.nii.gz --real-labels example_seg.nii.gz [--resume-dir resume]
    python -m qnkit.train.recipe kidney-synth --workdir WORK --install-into qnkit/models   # a developer's checkout

Steps (each a ``qnkit`` command in a subprocess, so the runtime never imports training or export): ``qnkit
synth`` (anatomy generator) -> ``qnkit train`` (the recipe's settings file) -> for a recipe with ``qat``,
``qnkit train --qat`` (quantisation-aware fine-tuning from the best checkpoint into ``WORK/run-qat``, whose best
checkpoint is the one that ships) -> ``qnkit evaluate`` (held-out phantoms; a recipe with ``calibrate_threshold``
first fits the threshold to its validation phantoms: ``--calibrate-threshold``) -> ``qnkit export`` (with
``--int8-evidence REAL_CT``: the INT8 graph becomes the CPU default only if it agrees with FP32 on the real CT)
-> ``qnkit segment`` of the real validation CT, scored per kidney against its labels -> the registry entry
(recipe, figures) written to ``WORK/registry_entry.json``. Installing the bundle and its entry as a shipped
model is a separate, explicit developer step (``--install-into`` a source checkout's ``qnkit/models``): the
recipe never writes into an installed qnkit. A step whose output already exists is reused, so an interrupted
build resumes (``qnkit train --resume``). A recipe with ``init_from`` fine-tunes: its first phase starts from
the best weights of that model's committed run (``--resume-dir``, the checkout's ``resume/`` folder:
``RESUME_DIR/<model>``; ``qnkit train --init-from``) instead of random ones.

A recipe marked ``"machine": "gpu"`` is trained on a GPU machine by ``benchmarks/gpu_recipe.sh``
(``--until`` stops after a step there); the run, its evaluation and its bundle come back, and the same
command finishes it here: a step is skipped when its output was made from the run's best checkpoint
(SHA-256 of its files), so the phantoms are not made again. ``kits_cases`` limits the kidney shapes to
the first N KiTS19 cases (so that they travel to that machine, and the rest stay unseen).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


RECIPES = {
    "kidney-synth": {
        "description": "QuickNAT (16 filters) at 2.5 mm pixels, trained only on anatomy phantoms",
        "synth": ["--cases", "140", "--seed", "1", "--generator", "anatomy", "--pixel-range", "1.3,2.6",
                  "--anatomy-version", "1"],
        "settings": "shipped",  # preset: train/shipped.ini
        # epochs 1-5 as the preset says, then warm restarts of the schedule (qnkit train --resume --lr ...)
        "phases": [{"epochs": 5}, {"epochs": 15, "lr": 1e-3, "step_size": 4}, {"epochs": 22, "lr": 2.5e-4, "step_size": 5}],
        "export": ["--int8"],
        "default": False,  # the default until 2026-12-07; kidney-synth-7 replaced it
    },
    # kidney-synth fine-tuned on anatomy version 2 (spleen and liver moved and resized against the kidneys,
    # the left side's spleen confusion): a new seed, so new bodies; starts from the committed run of
    # kidney-synth (resume/kidney-synth) instead of random weights.
    "kidney-synth-2": {
        "description": "QuickNAT (16 filters) at 2.5 mm pixels: kidney-synth fine-tuned on anatomy version 2 "
                       "phantoms (organs against the kidneys)",
        "synth": ["--cases", "140", "--seed", "2", "--generator", "anatomy", "--pixel-range", "1.3,2.6",
                  "--anatomy-version", "2"],
        "settings": "shipped",
        "init_from": "kidney-synth",
        "phases": [{"epochs": 8, "lr": 5e-4, "schedule": "poly"}],
        "export": ["--int8"],
        "default": False,  # becomes the default model only once its figures say so (set it here, rebuild)
    },
    # kidney-synth-2 fine-tuned on a phase mix led by unenhanced CT: qnkit's users plan radionuclide therapy
    # doses on the CT of SPECT/CT or PET/CT, which is mostly low-dose and unenhanced, while the default mix
    # draws unenhanced phantoms for only 15 % of cases. A new seed, so new bodies. Run once (2026-12-01,
    # stopped after 6 of its 8 epochs: `--epochs 6`), not installed: real CT Dice both 0.771 (kidney-synth-2
    # 0.772) with both kidneys over-segmented by about a third; held-out phantoms of its own mix 0.760.
    "kidney-synth-3": {
        "description": "QuickNAT (16 filters) at 2.5 mm pixels: kidney-synth-2 fine-tuned on a phase mix led by "
                       "unenhanced CT (the CT of SPECT/CT)",
        "synth": ["--cases", "140", "--seed", "3", "--generator", "anatomy", "--pixel-range", "1.3,2.6",
                  "--anatomy-version", "2", "--phases", "0.4,0.2,0.25,0.15"],
        "settings": "shipped",
        "init_from": "kidney-synth-2",
        "phases": [{"epochs": 8, "lr": 5e-4, "schedule": "poly"}],
        "export": ["--int8"],
        "default": False,
    },
    # The wider network for a GPU machine (benchmarks/gpu_recipe.sh runs it there in one command; an epoch
    # of the 16-filter model takes about 9 minutes on 2 CPU cores, so a 32-filter one does not train here):
    # twice the filters, twice the bodies (anatomy version 2, its organs against the kidneys), the kidney
    # shapes of the first 120 KiTS19 cases only (the other 90 never seen), 24 epochs of 3,200 slices
    # with a poly schedule (about four and a half minutes' training is what one lent GPU session leaves).
    "kidney-synth-wide": {
        "description": "QuickNAT (32 filters) at 2.5 mm pixels, trained on a GPU on anatomy version 2 phantoms",
        "synth": ["--cases", "280", "--seed", "4", "--generator", "anatomy", "--pixel-range", "1.3,2.6",
                  "--anatomy-version", "2"],
        "kits_cases": 120,
        "settings": "shipped-gpu",
        "phases": [{"epochs": 24}],
        "export": ["--int8"],
        "default": False,
        "machine": "gpu",
    },
}
#: kidney-synth's own validation phantoms (its run's splits.json): the held-out set on which later recipes are
#: scored after every epoch, so that their time to kidney-synth's best validation Dice (0.874) is measured on it.
KIDNEY_SYNTH_VALIDATION = {
    "synth": {"cases": 140, "seed": 1, "generator": "anatomy", "pixel_range": (1.3, 2.6), "anatomy_version": 1},
    "only": [2, 16, 22, 37, 40, 51, 53, 55, 63, 68, 69, 70, 85, 89, 97, 99, 101, 111, 115, 132, 133],
    "best_dice": 0.874,
}

# The kidney-synth network trained the fast way: 128-pixel windows (a step costs about a third of a whole
# 208-pixel slice's), anatomy version 3 (a large mass against a kidney in 30 % of the bodies, as a negative),
# more bodies; a last phase on whole slices at a low rate settles the batch-norm and channel-SE statistics on
# what inference sees. Scored after every epoch on kidney-synth's validation phantoms (`reference`).
RECIPES["kidney-synth-4"] = {
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, trained on 128-pixel windows of anatomy version 3 "
                   "phantoms (large masses against the kidneys as negatives)",
    "synth": ["--cases", "160", "--seed", "5", "--generator", "anatomy", "--pixel-range", "1.5,2.6",
              "--anatomy-version", "3"],
    "settings": "shipped-fast",
    "reference": KIDNEY_SYNTH_VALIDATION,
    "phases": [{"epochs": 16}, {"epochs": 18, "crop_size": 0, "lr": 2e-4, "schedule": "poly"}],
    # bf16 autocast (where the CPU has it natively) and torch.compile, on every start and resume: epochs 1-4
    # ran without them (metrics.jsonl's "step" says how each epoch ran)
    "step": ["--amp", "--compile"],
    "export": ["--int8"],
    "default": False,  # becomes the default model only once its figures say so
}

# kidney-synth-4's loop on anatomy version 4 (look-alikes: the spleen, liver or mass drawn at the kidney's
# own HU in some bodies; kidney-synth-4 over-segments the real validation CT's kidneys into the spleen), new
# bodies (seed 6), and the time split the other way: kidney-synth-4's two whole-slice epochs gave +0.07 of
# reference Dice after sixteen window epochs had given their last +0.00, so ten window epochs, eight whole.
RECIPES["kidney-synth-5"] = {
    **RECIPES["kidney-synth-4"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, trained on 128-pixel windows then whole slices of "
                   "anatomy version 4 phantoms (large masses as negatives; spleen, liver and masses at the "
                   "kidney's HU)",
    "synth": ["--cases", "160", "--seed", "6", "--generator", "anatomy", "--pixel-range", "1.5,2.6",
              "--anatomy-version", "4"],
    "phases": [{"epochs": 10}, {"epochs": 18, "crop_size": 0, "lr": 5e-4, "schedule": "poly"}],
}

# kidney-synth-5 fine-tuned on anatomy version 5: the renal sinus opened at the hilum and labelled background, so
# that the kidney is its parenchyma (TotalSegmentator's masks, kidney dosimetry's volume of interest) and not
# KiTS19's sinus-filled outline. kidney-synth and kidney-synth-5 fill the real validation CT's sinus (about a
# quarter of what they take beyond its labels is fat at the hilum). Whole slices only: the window epochs are
# behind it. Not scored on kidney-synth's validation phantoms: their labels fill the sinus.
RECIPES["kidney-synth-6"] = {
    **{k: v for k, v in RECIPES["kidney-synth-5"].items() if k != "reference"},
    "description": "QuickNAT (16 filters) at 2.5 mm pixels: kidney-synth-5 fine-tuned on anatomy version 5 "
                   "phantoms (the renal sinus left out of the kidney, as in TotalSegmentator's masks)",
    "synth": ["--cases", "160", "--seed", "7", "--generator", "anatomy", "--pixel-range", "1.5,2.6",
              "--anatomy-version", "5"],
    "init_from": "kidney-synth-5",
    "phases": [{"epochs": 8, "crop_size": 0, "lr": 5e-4, "schedule": "poly"}],
}

# kidney-synth-6 with 2.5-D input: five planes per slice, 3 mm apart along z (train/shipped_context.ini), its first
# block inflated from kidney-synth-6's (the same output at start), fine-tuned on new version 5 bodies (seed 8).
# The real validation CT's spleen is taken where, in one slice, a lobe of it looks like a kidney's upper pole; a
# few millimetres above and below it joins the spleen.
RECIPES["kidney-synth-7"] = {
    **RECIPES["kidney-synth-6"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart): kidney-synth-6 "
                   "fine-tuned with context along z on anatomy version 5 phantoms",
    "synth": ["--cases", "160", "--seed", "8", "--generator", "anatomy", "--pixel-range", "1.5,2.6",
              "--anatomy-version", "5"],
    "settings": "shipped-context",
    "init_from": "kidney-synth-6",
    "default": True,  # the default model since 2026-12-07 (real validation CT 0.821 against kidney-synth's 0.773)
}

# kidney-synth-7 trained on: eight more whole-slice epochs on 160 new version 5 bodies (seed 9) at a lower rate. Its
# real-CT Dice rose from 0.793 (epoch 2) to 0.822 (epoch 7) while its validation phantoms levelled at 0.745: the
# question is whether more bodies, not a new idea, keep buying real-CT kidney.
RECIPES["kidney-synth-8"] = {
    **RECIPES["kidney-synth-7"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart): kidney-synth-7 "
                   "trained on new anatomy version 5 phantoms",
    "synth": ["--cases", "160", "--seed", "9", "--generator", "anatomy", "--pixel-range", "1.5,2.6",
              "--anatomy-version", "5"],
    "init_from": "kidney-synth-7",
    "phases": [{"epochs": 8, "crop_size": 0, "lr": 3e-4, "schedule": "poly"}],
    "default": False,  # becomes the default model only once its figures say so
}

# Time to quality: kidney-synth's own recipe (the same 140 phantoms, seeded, so the same splits and its validation
# phantoms, on which its best was 0.874 after 5.3 hours) with today's training step (bf16 autocast where the CPU
# has it, torch.compile) and one polynomial schedule instead of its warm restarts. Its metrics.jsonl says how many
# CPU hours the new loop needs to reach 0.874 on the same validation phantoms.
RECIPES["kidney-synth-fast"] = {
    **RECIPES["kidney-synth"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels: kidney-synth's recipe and phantoms with the fast "
                   "training step (time to kidney-synth's validation Dice)",
    "phases": [{"epochs": 22, "lr": 1e-3, "schedule": "poly"}],
    "step": ["--amp", "--compile"],
    "default": False,  # a measurement of the training loop, not a model to ship
}

# kidney-synth-7 with twice the filters (32; its 16 widened so that it starts computing what kidney-synth-7 does:
# qnkit.nn.quicknat.widen_filters), trained on kidney-synth-8's data (the same 160 seed-9 bodies, the same splits)
# for a like-for-like answer to: is the 16-filter network's capacity what holds the phantoms at 0.75-0.80? The
# training Dice of kidney-synth-7 and -8 levelled at 0.71-0.74 with the rate near zero (underfitting, not
# overfitting), and the phantoms' kidneys at the model's grid allow 0.99 (their labels down- and up-sampled).
# A 32-filter step costs 2.8x a 16-filter one here (0.36 against 0.13 s per 208-px slice, bf16, compiled).
RECIPES["kidney-synth-9"] = {
    **RECIPES["kidney-synth-8"],
    "description": "QuickNAT (32 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart): kidney-synth-7 widened "
                   "to 32 filters and trained on new anatomy version 5 phantoms",
    "num_filters": 32,
    "init_from": "kidney-synth-7",
    # the threshold at which its masks have the true kidney volume on its validation phantoms (kidney-synth-8, on
    # the same data, drew them 7 % too large at 0.5 there, and 12-17 % on the real CT)
    "calibrate_threshold": True,
    # five epochs (about 25 minutes each here, twice kidney-synth-8's eight): one session's worth; the poly schedule
    # was planned over ten at the start and squeezed to five at the first resume (epoch 1 ran at 5e-4 either way)
    "phases": [{"epochs": 5, "crop_size": 0, "lr": 5e-4, "schedule": "poly"}],
    "default": False,  # becomes the default model only once its figures say so
}


# kidney-synth-8 fine-tuned on the same 160 seed-9 bodies drawn with anatomy version 6: the renal vein, artery,
# pelvis and ureter leaving each hilum, labelled background (qnkit.synth.hilum). On the real validation CT most of
# what kidney-synth-7 and -9 take beyond the labels lies in one region in front of and medial to each kidney's
# lower hilum, at -10..0 HU (vein and pelvis, unenhanced), up to 17 % of the right kidney's volume; phantoms had
# nothing there but fat, and more training on them moved that border further out. The same bodies and splits as
# kidney-synth-8, so the hilum is the only change; 16 filters (kidney-synth-9's 32 did not beat kidney-synth-8 on
# these validation phantoms, and cost 3.4x the network's time).
RECIPES["kidney-synth-10"] = {
    **RECIPES["kidney-synth-8"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart): kidney-synth-8 "
                   "fine-tuned on anatomy version 6 phantoms (renal vein, artery, pelvis and ureter at each hilum)",
    "synth": ["--cases", "160", "--seed", "9", "--generator", "anatomy", "--pixel-range", "1.5,2.6",
              "--anatomy-version", "6"],
    "init_from": "kidney-synth-8",
    "calibrate_threshold": True,
    "phases": [{"epochs": 4, "crop_size": 0, "lr": 3e-4, "schedule": "poly"}],
}

# kidney-synth-8 fine-tuned on the same 160 seed-9 bodies drawn with anatomy version 7 (the renal pelvis filling the
# part of the sinus nearest the hilum: water-dense unenhanced) and a phase mix with more unenhanced scans (0.30 instead
# of 0.15: the CT of a SPECT/CT for dosimetry is usually unenhanced; the phase costs one draw whatever the mix, so the
# bodies and splits stay kidney-synth-8's). kidney-synth-10 (version 6) did not shrink the region kidney-synth-7 to
# -10 take at each lower hilum of the real validation CT: it is the sinus, filled, and a probe says why: with that
# region's voxels set to fat (-90 HU) the network leaves 94 % of them out, at -40 HU it takes 76 % (version 5's sinus
# is fat of -100..-40 HU with patches of urine). On its own validation phantoms kidney-synth-10 takes 15-85 % of the
# carved sinus too, more where the sinus is near the parenchyma's HU.
RECIPES["kidney-synth-11"] = {
    **RECIPES["kidney-synth-10"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart): kidney-synth-8 "
                   "fine-tuned on anatomy version 7 phantoms (the renal pelvis in the sinus, the hilum's vessels and "
                   "ureter), 30 % unenhanced",
    "synth": ["--cases", "160", "--seed", "9", "--generator", "anatomy", "--pixel-range", "1.5,2.6",
              "--anatomy-version", "7", "--phases", "0.30,0.25,0.30,0.15"],
}

# kidney-synth-11 with the renal sinus and hilum weighed as hard negatives (qnkit synth's hard_negatives.nii.gz; [DATA]
# hard_negative_weight 1: a false positive there costs what a missed kidney pixel costs). kidney-synth-8 and -11 take
# ~70 % of the carved sinus of their own validation phantoms, where their labels at the 2.5 mm grid take 6 %: with
# QuickNAT's median-frequency weights a background pixel weighs ~1/30 of a kidney pixel, so filling the sinus
# (a tenth of a kidney) costs the loss little. The same bodies, phases and splits as kidney-synth-11.
RECIPES["kidney-synth-12"] = {
    **RECIPES["kidney-synth-11"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart): kidney-synth-8 "
                   "fine-tuned on anatomy version 7 phantoms with their renal sinus and hilum weighed as hard "
                   "negatives, 30 % unenhanced",
    "step": [*RECIPES["kidney-synth-11"]["step"], "--hard-negative-weight", "1"],
}

# kidney-synth-11 without QuickNAT's median-frequency class weights ([DATA] class_weights none: every pixel weighs 1
# plus the border term, as nnU-Net's cross-entropy beside its Dice). On kidney-synth-11's validation phantoms
# kidney-synth-8's masks are 20-60 % too large in most cases, and what they take beyond the labels is mostly the
# spleen against the left kidney (36-89 mL in the worst cases), then the sinus and fat: every doubtful pixel next to
# a kidney, which the class weights make ~30x cheaper to take than to miss. The same bodies, phases and splits.
RECIPES["kidney-synth-13"] = {
    **RECIPES["kidney-synth-11"],
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart): kidney-synth-8 "
                   "fine-tuned on anatomy version 7 phantoms without class weights in its loss, 30 % unenhanced",
    "step": [*RECIPES["kidney-synth-11"]["step"], "--class-weights", "none"],
}

# From random weights, 2.5-D from the start, on kidney-synth-11's data (the same 160 seed-9 bodies, anatomy version 7,
# 30 % unenhanced, the same splits), with both answers to the class weights: none (every pixel 1, as nnU-Net's
# cross-entropy) and the sinus and hilum weighed 3 (what a kidney border pixel weighs). Every model since
# kidney-synth-5 is a fine-tune of one lineage trained on sinus-filled labels (42 epochs) and median-frequency
# weights, and fine-tuning moves its sinus little (kidney-synth-11, -12, -13: 0.69 -> 0.55-0.60 of the sinus taken in
# one or two epochs). kidney-synth-4's schedule: 128-pixel windows (a third of a slice's cost) with the bf16 compiled
# step, then whole slices at a lower rate. Several sessions: `python -m qnkit.train.background kidney-synth-14`.
RECIPES["kidney-synth-14"] = {
    **{k: v for k, v in RECIPES["kidney-synth-11"].items() if k != "init_from"},
    "description": "QuickNAT (16 filters) at 2.5 mm pixels, 2.5-D (five planes 3 mm apart), trained from random "
                   "weights on anatomy version 7 phantoms without class weights, the renal sinus and hilum weighed as "
                   "hard negatives, 30 % unenhanced",
    "phases": [{"epochs": 12}, {"epochs": 30, "crop_size": 0, "lr": 5e-4, "schedule": "poly"}],
    "step": [*RECIPES["kidney-synth-11"]["step"], "--class-weights", "none", "--hard-negative-weight", "3"],
}


class RecipeInputError(SystemExit):
    """A recipe cannot start from what it was given; ``main`` prints the one line and exits 2."""


def _qnkit(*args, log=print) -> None:
    cmd = [sys.executable, "-m", "qnkit", *map(str, args)]
    log("$ qnkit " + " ".join(map(str, args)))
    subprocess.run(cmd, check=True)


def kidney_dice(mask: np.ndarray, labels: np.ndarray, right: int, left: int, sides: np.ndarray | None = None) -> dict:
    """Dice of both kidneys together and (with `sides`: 1 right, 2 left) of each side; volumes in voxels."""
    from qnkit.kernels import mask_dice as dice

    truth = np.isin(labels, (right, left))
    out = {"both": dice(mask > 0, truth), "voxels": int((mask > 0).sum()), "voxels_true": int(truth.sum())}
    if sides is not None:
        for name, value, code in (("right", right, 1), ("left", left, 2)):
            out[name] = dice(sides == code, labels == value)
            out[f"voxels_{name}"] = int((sides == code).sum())
            out[f"voxels_true_{name}"] = int((labels == value).sum())
    return out


def validate_real_ct(bundle: Path, ct: Path, labels: Path, work: Path, right: int = 2, left: int = 3) -> dict:
    """Segment a real CT with the bundle (`qnkit segment --split-sides`) and score it on its own grid."""
    import nibabel as nib

    out = work / "real_ct_kidneys.nii.gz"
    if out.exists():
        out.unlink()
    _qnkit("segment", ct, "--model", bundle, "--out", out, "--split-sides", "--no-progress")
    sides = np.asarray(nib.load(str(out)).dataobj)
    lab = np.asarray(nib.load(str(labels)).dataobj)
    return kidney_dice(sides > 0, lab, right, left, sides=sides)


def run_metrics(run: Path) -> list[dict]:
    """A run folder's metrics.jsonl, one dict per finished epoch ([] for none)."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def trained_epochs(run: Path) -> int:
    """The last epoch a run folder has finished (0 for none)."""
    rows = run_metrics(run)
    return rows[-1]["epoch"] if rows else 0


PHASE_KEYS = ("lr", "schedule", "step_size", "crop_size")


def train_phases(recipe: dict, data: Path, run: Path, epochs: int | None = None, init_from: Path | None = None,
                 reference: Path | None = None) -> None:
    """Train the recipe's phases in turn, each to its epoch count (`epochs` caps the last one);
    a phase already done is skipped, one interrupted is resumed (from `data`, wherever the run was started).
    `init_from` (a run folder): the first phase starts from its best weights (`qnkit train --init-from`);
    `reference`: held-out cases scored after every epoch (`qnkit train --reference-data`)."""
    phases = [dict(phase) for phase in recipe["phases"]]
    if epochs:
        phases = [p for p in phases if p["epochs"] < epochs] + [{**next(
            (p for p in phases if p["epochs"] >= epochs), phases[-1]), "epochs": epochs}]
    every_start = (["--reference-data", reference] if reference is not None else []) + list(recipe.get("step", []))
    for phase in phases:
        schedule = [arg for key in PHASE_KEYS if key in phase for arg in (f"--{key.replace('_', '-')}", phase[key])]
        if not (run / "checkpoints").is_dir():
            start = ["--init-from", init_from] if init_from is not None else []
            if recipe.get("num_filters"):  # the network's width, set at its start (a resume keeps the run's)
                start += ["--num-filters", recipe["num_filters"]]
            if run.is_dir() and any(run.iterdir()):
                start.append("--force")  # a start that ended before its first checkpoint: nothing to keep
            _qnkit("train", "--data", data, "--out", run, "--settings", recipe["settings"], "--no-progress",
                   *start, *every_start, "--epochs", phase["epochs"], *schedule)
        elif trained_epochs(run) < phase["epochs"]:
            _qnkit("train", "--out", run, "--resume", "--data", data, "--no-progress", *every_start,
                   "--epochs", phase["epochs"], *schedule)


def reference_cases(recipe: dict, folder: Path, kits_labels: Path | None, workers: int) -> Path | None:
    """The recipe's reference set (``recipe["reference"]``: a synth set and the indices kept), made once into
    `folder`; None for a recipe without one."""
    spec = recipe.get("reference")
    if spec is None:
        return None
    if not (folder / "kits.json").is_file():
        if kits_labels is None:
            raise RecipeInputError(f"recipe: {folder} has no reference phantoms and no --kits-labels was given to "
                                   f"make them")
        from qnkit.synth import write_dataset

        write_dataset(folder, **spec["synth"], only=spec["only"], labels_from=kits_labels, workers=workers,
                      progress=False)
    return folder


def init_source(recipe: dict, override: Path | None = None, resume_dir: Path | None = None) -> Path | None:
    """The run folder a fine-tuning recipe starts from: `override`, else ``resume_dir/<model>`` (the
    checkout's committed runs, given explicitly: an installed qnkit has no resume/ folder)."""
    if "init_from" not in recipe:
        return None
    if override is None and resume_dir is None:
        raise RecipeInputError(f"recipe: it starts from {recipe['init_from']}'s committed run: give --resume-dir "
                               f"(the checkout's resume/ folder) or --init-from RUN")
    source = Path(override) if override is not None else Path(resume_dir) / recipe["init_from"]
    if not (source / "checkpoints" / "best" / "meta.json").is_file():
        raise RecipeInputError(f"recipe: {source} holds no trained run to start from (checkpoints/best)")
    return source


STEPS = ("synth", "train", "qat", "evaluate", "export")


def qat_phase(recipe: dict, data: Path, run: Path, qat_run: Path) -> None:
    """The recipe's quantisation-aware fine-tuning (``recipe["qat"]``: epochs, lr and optionally ``teacher``: train
    towards the FP32 network's own output, ``qnkit train --qat-teacher``): a new run `qat_run` from
    `run`'s best weights, trained with ``--qat`` (train/qat.py); resumed where it stopped, skipped when done."""
    spec = recipe["qat"]
    phase = {"epochs": spec["epochs"], "lr": spec["lr"], "schedule": "poly", "crop_size": 0}
    teacher = ["--qat-teacher"] if spec.get("teacher") else []
    step = [*recipe.get("step", []), "--qat", *teacher]
    train_phases({"phases": [phase], "settings": recipe["settings"], "step": step}, data, qat_run, init_from=run)


def first_kits_cases(kits_labels: Path, count: int, folder: Path) -> Path:
    """``folder`` holding the first ``count`` KiTS19 cases of ``kits_labels`` (sorted, linked) and their
    kits.json entries: the label maps a recipe with ``kits_cases`` draws its kidney shapes from."""
    kits_labels = Path(kits_labels).absolute()
    cases = sorted(p.parent for p in kits_labels.glob("case_*/segmentation.nii.gz"))[:count]
    if len(cases) < count:
        raise RecipeInputError(f"recipe: {kits_labels} holds {len(cases)} KiTS19 cases; this recipe needs the first {count}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for case in cases:
        (folder / case.name).symlink_to(case, target_is_directory=True)
    names = {case.name for case in cases}
    if (kits_labels / "kits.json").is_file():
        entries = json.loads((kits_labels / "kits.json").read_text())
        (folder / "kits.json").write_text(json.dumps([e for e in entries if e.get("case_id") in names]))
    return folder


def best_checkpoint_hashes(run: Path) -> dict | None:
    """The SHA-256 of the files of a run's best checkpoint (None without one)."""
    meta = run / "checkpoints" / "best" / "meta.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("files") or None


def _made_from_best(record: Path, hashes_of, run: Path) -> dict | None:
    """A step's JSON output, if it exists and was made from the run's present best checkpoint; else None."""
    try:
        hashes, made = best_checkpoint_hashes(run), json.loads(record.read_text())
        return made if hashes is not None and hashes_of(made) == hashes else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _evaluated_hashes(evaluation: dict) -> dict:
    return evaluation["checkpoint_sha256"]


def _in_domain(evaluation: dict) -> str:
    """'; 0.812 on the 27 within the seed's domain (worst case_00015 0.617)' where the filter rule left cases out."""
    inside = evaluation.get("in_domain") or {}
    if not inside.get("out_of_domain") or not inside.get("cases"):
        return ""
    return (f"; {inside['mean_dice']:.3f} on the {inside['cases']} within the seed's domain (worst "
            f"{inside['worst_case']} {inside['min_dice']:.3f})")


def training_record(run: Path, bundle: Path) -> dict:
    """What the registry says about how a model was trained: its CPU and wall hours (cumulated across resumes),
    how each epoch's step ran, the whole validation curve (and the reference set's, where scored) and the hash
    of the shipped checkpoint's files."""
    rows = run_metrics(run)
    last = rows[-1]
    meta = json.loads((bundle / "qnkit.json").read_text()).get("training", {})
    steps = sorted({row.get("step") or "FP32" for row in rows})
    return {"epochs": last["epoch"], "cpu_hours": last.get("cpu_hours"), "wall_hours": last.get("wall_hours"),
            "steps": steps, "best_epoch": last.get("best_epoch"),
            "best_validation_dice": _rounded(last.get("best_val_dice")),
            "validation_curve": [[row["epoch"], _rounded(row.get("val_dice")),
                                  _rounded(row.get("reference_dice"))]
                                 for row in rows],
            "curve_columns": ["epoch", "validation Dice", "reference Dice (kidney-synth's validation phantoms)"],
            "checkpoint_sha256": meta.get("checkpoint_sha256")}


def _rounded(value) -> float | None:
    return None if value is None else round(float(value), 4)


def build(name: str, workdir: Path, kits_labels: Path | None, real_ct: Path | None, real_labels: Path | None,
          install_into: Path | None = None, epochs: int | None = None, init_from: Path | None = None, workers: int = 2,
          until: str | None = None, resume_dir: Path | None = None) -> dict:
    """Synth -> train (phases) -> quantisation-aware fine-tuning (``recipe["qat"]``, if any) -> evaluate -> export ->
    validate -> install; each step reuses what a previous run of it left in ``workdir`` (data, a finished run,
    an evaluation and a bundle of the run's best checkpoint), so a run trained elsewhere
    (`benchmarks/gpu_recipe.sh` on a GPU machine) is finished here without its phantoms. ``until`` (one of
    :data:`STEPS`) stops after that step and returns {}. The entry goes to ``WORK/registry_entry.json``;
    ``install_into`` (a checkout's qnkit/models) also installs it."""
    recipe = RECIPES[name]
    source = init_source(recipe, init_from, resume_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, run, bundle = workdir / "data", workdir / "run", workdir / "bundle"
    evaluation_path = workdir / "evaluation.json"
    target = epochs or recipe["phases"][-1]["epochs"]
    trained = (run / "checkpoints").is_dir() and trained_epochs(run) >= target
    shipped_run = workdir / "run-qat" if recipe.get("qat") else run  # the run whose best checkpoint ships
    evaluated = _made_from_best(evaluation_path, _evaluated_hashes, shipped_run) is not None
    if not (trained and evaluated) and not (data / "kits.json").is_file():
        if kits_labels is None:
            raise RecipeInputError(f"recipe: {data} has no phantoms and no --kits-labels was given to make them")
        if recipe.get("kits_cases"):
            kits_labels = first_kits_cases(kits_labels, recipe["kits_cases"], workdir / "kits19-labels")
        _qnkit("synth", data, *recipe["synth"], "--labels-from", kits_labels, "--workers", workers, "--no-progress")
    reference = None
    if not (trained and evaluated):
        reference = reference_cases(recipe, workdir / "reference", kits_labels, workers)
    if until == "synth":
        return {}
    train_phases(recipe, data, run, epochs, source, reference)
    if until == "train":
        return {}
    trained_run, run = run, shipped_run
    if recipe.get("qat"):  # the model that ships is the quantisation-aware one: evaluate and export it
        qat_phase(recipe, data, trained_run, run)
    if until == "qat":
        return {}
    if _made_from_best(evaluation_path, _evaluated_hashes, run) is None:
        # a recipe that calibrates fits the threshold to its validation phantoms first (RUN/threshold.json);
        # evaluate and export then use it for this checkpoint
        calibrate = ["--calibrate-threshold"] if recipe.get("calibrate_threshold") else []
        _qnkit("evaluate", run, "--json", evaluation_path, *calibrate)
    if until == "evaluate":
        return {}
    # The real CT is the INT8 graph's evidence: INT8 becomes the CPU default only if it agrees with FP32 there.
    evidence = ["--int8-evidence", real_ct] if real_ct is not None and "--int8" in recipe["export"] else []
    exported = _made_from_best(bundle / "qnkit.json", lambda m: m["training"]["checkpoint_sha256"], run)
    if exported is None or (evidence and "int8_real_ct" not in exported.get("verification", {})):
        if bundle.exists():
            shutil.rmtree(bundle)
        _qnkit("export", run, "--out", bundle, *recipe["export"], *evidence)
    if until == "export":
        return {}
    evaluation = json.loads((workdir / "evaluation.json").read_text())
    entry = {
        "description": recipe["description"],
        "trained_on": f"{recipe['synth'][1]} anatomy phantoms (qnkit synth {' '.join(recipe['synth'])}; "
                      f"kidney shapes from the KiTS19 label maps"
                      + (f" of cases 0-{recipe['kits_cases'] - 1}" if recipe.get("kits_cases") else "")
                      + "), no real CT image",
        "recipe": f"python -m qnkit.train.recipe {name} --workdir WORK --kits-labels KITS19_LABELS"
                  + (f" --epochs {epochs}" if epochs else ""),
        "settings": f"train/{recipe['settings'].replace('-', '_')}.ini",
        **({"machine": "trained on a GPU machine with benchmarks/gpu_recipe.sh"} if recipe.get("machine") == "gpu"
           else {}),
        "training_phases": recipe["phases"],
        **({"initialised_from": f"{recipe['init_from']} (its committed run, best checkpoint)"}
           if "init_from" in recipe else {}),
        "not_for": "clinical use: qnkit and its models are not a medical device",
        "validation": [{"data": "held-out phantoms",
                        "summary": f"mean Dice {evaluation.get('mean_dice', float('nan')):.3f}" + _in_domain(evaluation),
                        "figures": {"mean_dice": evaluation.get("mean_dice"),
                                    **({"in_domain": evaluation["in_domain"]} if "in_domain" in evaluation else {})}}],
    }
    entry["training"] = training_record(trained_run, bundle)
    if run != trained_run:
        rows = run_metrics(run)
        entry["training"]["quantisation_aware"] = {
            **recipe["qat"], "cpu_hours": rows[-1].get("cpu_hours"), "wall_hours": rows[-1].get("wall_hours"),
            "validation_curve": [[row["epoch"], _rounded(row.get("val_dice"))] for row in rows],
            "note": "fine-tuned from the best checkpoint with fake-quantised INT8 convolutions (train/qat.py); "
                    "validation Dice through the fake-quantised network"}
    cpu = json.loads((bundle / "qnkit.json").read_text()).get("cpu_precision")
    if cpu:
        entry["cpu_precision"] = {"default": cpu["default"], "why": cpu["why"]}
    if real_ct is not None and real_labels is not None:
        figures = validate_real_ct(bundle, real_ct, real_labels, workdir)
        entry["validation"].append({
            "data": f"real CT {real_ct.name} (TotalSegmentator example, labels 2/3; validation only, never trained on)",
            "summary": f"Dice both {figures['both']:.3f}, right {figures.get('right', float('nan')):.3f}, "
                       f"left {figures.get('left', float('nan')):.3f}",
            "figures": figures})
    from qnkit._atomic import write_text_atomic

    write_text_atomic(workdir / "registry_entry.json", json.dumps(entry, indent=1) + "\n")
    if install_into is not None:
        install(name, bundle, entry, Path(install_into), default=bool(recipe.get("default", True)))
    return entry


def install(name: str, bundle: Path, entry: dict, models_dir: Path, default: bool) -> None:
    """Copy `bundle` to ``models_dir/name`` and write its registry entry (a developer's step, into a source
    checkout's qnkit/models: the next wheel ships it); `default` makes it the one default model."""
    if not (models_dir / "registry.json").is_file() and not (models_dir / "__init__.py").is_file():
        raise RecipeInputError(f"recipe: {models_dir} is not a qnkit/models folder (no registry.json or __init__.py)")
    target = models_dir / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle, target)
    registry_path = models_dir / "registry.json"
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {"models": {}}
    if default:  # one default model
        for other in registry["models"].values():
            other["default"] = False
    registry["models"][name] = {**entry, "default": default}
    registry_path.write_text(json.dumps(registry, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--kits-labels", type=Path, help="KiTS19 label maps (case_*/segmentation.nii.gz); needed "
                                                         "unless WORKDIR holds the phantoms or a finished, evaluated run")
    parser.add_argument("--real-ct", type=Path)
    parser.add_argument("--real-labels", type=Path)
    parser.add_argument("--epochs", type=int, help="train this many epochs in all (default: the settings')")
    parser.add_argument("--install-into", type=Path, metavar="MODELS_DIR",
                        help="also install the bundle and its registry entry into this qnkit/models folder of a "
                             "source checkout (a developer's step; never an installed qnkit)")
    parser.add_argument("--resume-dir", type=Path, help="the checkout's resume/ folder of committed runs (a "
                                                        "fine-tuning recipe starts from RESUME_DIR/<model>)")
    parser.add_argument("--init-from", type=Path, help="for a fine-tuning recipe: the run folder to start from "
                                                       "(default: RESUME_DIR/<model>)")
    parser.add_argument("--workers", type=int, default=2, help="processes making the phantoms (qnkit synth)")
    parser.add_argument("--until", choices=STEPS, help="stop after this step (a GPU machine trains, this one "
                                                       "validates and installs)")
    args = parser.parse_args(argv)
    try:
        entry = build(args.name, args.workdir, args.kits_labels, args.real_ct, args.real_labels, args.install_into,
                      args.epochs, args.init_from, args.workers, args.until, args.resume_dir)
    except RecipeInputError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    if args.until:
        return
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
