"""Train a recipe's run across sessions: resume it from its committed state, commit its checkpoint as it goes.

    nohup python -m qnkit.train.background kidney-synth-4 --workdir WORK --kits-labels KITS19_LABELS \\
        --resume-dir resume > WORK/background.log 2>&1 &

A training run of the shipped model takes longer than a working session on 2 CPU cores, and only what is
committed survives a session. This command, started in a session's first minutes:

1. brings the committed run ``RESUME_DIR/<name>`` (settings, splits, metrics, ``checkpoints/last`` with the
   optimiser and RNG state, ``checkpoints/best``) into ``WORK/run`` unless WORK already holds a run as far along;
2. runs the recipe up to its training step (``python -m qnkit.train.recipe NAME --until train``) in a child
   process: the phantoms and the reference set are made again where missing (the same bytes: they are seeded),
   then ``qnkit train`` resumes where the run stopped, phase after phase;
3. every ``--commit-every`` minutes, and when training ends or this process is told to stop (SIGTERM,
   SIGINT), copies the run's state back into ``RESUME_DIR/<name>`` (hash-checked against each checkpoint's
   meta.json, so a checkpoint being swapped during the copy is copied again) and commits those files alone
   (``git commit -- RESUME_DIR/<name>``) when an epoch has finished since the last commit.

The preprocessed cache, the phantoms and TensorBoard's event files stay in WORK (they are remade or are
large); ``metrics.jsonl`` holds the whole curve, with CPU and wall hours per epoch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from qnkit.train.recipe import RECIPES, trained_epochs

#: What of a run folder is committed: enough to resume it exactly and to read its whole curve.
RUN_FILES = ("settings.ini", "splits.json", "evaluation_data.json", "metrics.jsonl")
CHECKPOINTS = ("last", "best")


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


def _checkpoint_intact(folder: Path) -> bool:
    """Every file a checkpoint's meta.json lists is there with its SHA-256."""
    try:
        files = json.loads((folder / "meta.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() and hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
               for name, digest in files.items())


def copy_run(source: Path, target: Path, attempts: int = 5) -> None:
    """Copy a run's committed files from `source` to `target` (replacing them), each checkpoint checked
    whole; a checkpoint that a trainer swapped in mid-copy is copied again."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    for kind in CHECKPOINTS:
        src = source / "checkpoints" / kind
        if not src.is_dir():
            continue
        dst = target / "checkpoints" / kind
        for _ in range(attempts):
            staging = dst.with_name(f".{kind}.copy")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(src, staging)
            if _checkpoint_intact(staging):
                shutil.rmtree(dst, ignore_errors=True)
                staging.rename(dst)
                break
            time.sleep(2)
        else:
            raise RuntimeError(f"{src}: no intact copy after {attempts} attempts")


def git_commit(paths: list[Path], message: str, attempts: int = 10) -> bool:
    """Commit `paths` alone (other staged or changed files untouched); retried while another git holds the
    index. False when there was nothing to commit."""
    repo = subprocess.run(["git", "-C", str(paths[0]), "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, check=True).stdout.strip()
    rel = [str(p.resolve().relative_to(repo)) for p in paths]
    for _ in range(attempts):
        add = subprocess.run(["git", "-C", repo, "add", "--", *rel], capture_output=True, text=True)
        if add.returncode == 0:
            diff = subprocess.run(["git", "-C", repo, "diff", "--cached", "--quiet", "--", *rel])
            if diff.returncode == 0:
                return False
            done = subprocess.run(["git", "-C", repo, "commit", "-q", "-m", message, "--", *rel],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return True
            error = done.stderr
        else:
            error = add.stderr
        if "index.lock" not in error:
            raise RuntimeError(f"git: {error.strip()}")
        time.sleep(3)
    raise RuntimeError("git: the index stayed locked")


def summary(run: Path) -> str:
    """'epoch N, best validation Dice D (epoch B), reference Dice R, C CPU hours' of a run's metrics."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    if not lines:
        return "no epoch yet"
    last = json.loads(lines[-1])
    text = f"epoch {last['epoch']}, best validation Dice {last['best_val_dice']:.4f} (epoch {last['best_epoch']})"
    if "reference_dice" in last:
        text += f", reference Dice {last['reference_dice']:.4f}"
    if "cpu_hours" in last:
        text += f", {last['cpu_hours']:.2f} CPU hours"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--resume-dir", type=Path, required=True, help="the checkout's resume/ folder")
    parser.add_argument("--kits-labels", type=Path, help="KiTS19 label maps, to make the phantoms where missing")
    parser.add_argument("--commit-every", type=float, default=25.0, help="minutes between commits (default 25)")
    parser.add_argument("--workers", type=int, default=2, help="processes making the phantoms")
    parser.add_argument("--no-commit", action="store_true", help="copy the state back, but do not commit it")
    args = parser.parse_args(argv)

    committed, run = args.resume_dir / args.name, args.workdir / "run"
    if (committed / "checkpoints" / "last").is_dir() and trained_epochs(committed) > trained_epochs(run):
        log(f"resuming from {committed}: {summary(committed)}")
        copy_run(committed, run)
    cmd = [sys.executable, "-m", "qnkit.train.recipe", args.name, "--workdir", str(args.workdir), "--until", "train",
           "--workers", str(args.workers), "--resume-dir", str(args.resume_dir)]
    if args.kits_labels is not None:
        cmd += ["--kits-labels", str(args.kits_labels)]
    log("$ " + " ".join(cmd))
    child = subprocess.Popen(cmd, start_new_session=True)  # its own process group: the recipe and its qnkit train
    stop = {"asked": False}

    def ask_to_stop(signum, frame):
        stop["asked"] = True
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, ask_to_stop)
    signal.signal(signal.SIGINT, ask_to_stop)
    synced, last_sync = trained_epochs(committed), time.monotonic()

    def sync(reason: str) -> None:
        nonlocal synced, last_sync
        last_sync = time.monotonic()
        epochs = trained_epochs(run)
        if epochs <= synced or not (run / "checkpoints" / "last").is_dir():
            return
        copy_run(run, committed)
        message = f"resume/{args.name}: {summary(committed)} ({reason})"
        if not args.no_commit and git_commit([committed], message):
            log(f"committed: {message}")
        synced = epochs

    while child.poll() is None:
        time.sleep(5)
        if time.monotonic() - last_sync >= args.commit_every * 60:
            sync("checkpoint")
    sync("stopped" if stop["asked"] else "training step ended")
    log(f"recipe exited with {child.returncode}: {summary(run)}")
    return 0 if stop["asked"] else child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
