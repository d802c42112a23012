"""The background trainer: a run brought back from its committed state, copied back whole, committed alone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qnkit.train import background as B


def _checkpoint(folder: Path, payload: bytes) -> None:
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "meta.json").write_text(json.dumps({"files": {"model.safetensors": hashlib.sha256(payload).hexdigest()}}))


def _run(folder: Path, epochs: int) -> Path:
    _checkpoint(folder / "checkpoints" / "last", b"last %d" % epochs)
    _checkpoint(folder / "checkpoints" / "best", b"best")
    (folder / "settings.ini").write_text("[TRAINING]\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "best_val_dice": 0.5, "best_epoch": e,
                                                              "cpu_hours": e / 10}) + "\n" for e in range(1, epochs + 1)))
    (folder / "cache").mkdir()
    (folder / "cache" / "big.npy").write_bytes(b"x")
    return folder


def test_copy_run_takes_the_resumable_files_and_leaves_the_cache(tmp_path):
    run = _run(tmp_path / "run", 3)
    B.copy_run(run, tmp_path / "copy")
    assert (tmp_path / "copy" / "checkpoints" / "last" / "model.safetensors").read_bytes() == b"last 3"
    assert (tmp_path / "copy" / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert not (tmp_path / "copy" / "cache").exists()
    assert B.summary(tmp_path / "copy").startswith("epoch 3, best validation Dice 0.5000 (epoch 3)")


def test_a_checkpoint_that_does_not_match_its_hashes_is_never_copied(tmp_path, monkeypatch):
    run = _run(tmp_path / "run", 2)
    (run / "checkpoints" / "last" / "model.safetensors").write_bytes(b"half-written")
    monkeypatch.setattr(B.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match="no intact copy"):
        B.copy_run(run, tmp_path / "copy")
    assert not (tmp_path / "copy" / "checkpoints" / "last").exists()


def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_commit_takes_only_the_run_and_says_when_there_is_nothing(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    (repo / "other.txt").write_text("someone else's work\n")
    _git(repo, "add", "other.txt")  # staged by another engineer: must stay out of this commit
    run = _run(repo / "resume" / "m", 1)
    (run / "cache" / "big.npy").unlink()
    (run / "cache").rmdir()
    assert B.git_commit([run], "resume/m: epoch 1")
    files = _git(repo, "show", "--name-only", "--format=", "HEAD").split()
    assert files and all(f.startswith("resume/m/") for f in files)
    assert "other.txt" in _git(repo, "diff", "--cached", "--name-only")
    assert not B.git_commit([run], "again")


def test_main_resumes_the_committed_run_and_commits_each_new_epoch(tmp_path, monkeypatch):
    """main(): the committed run is copied into WORK/run, the recipe is started up to its training step, and
    what training adds is copied back and committed, also when it stops."""
    resume = tmp_path / "resume"
    _run(resume / "kidney-synth-4", 2)
    commits, started = [], []

    class Child:  # the recipe: trains two more epochs into WORK/run, then ends
        pid = 0

        def __init__(self, cmd, **kwargs):
            started.append(cmd)
            self.polls = 0

        def poll(self):
            self.polls += 1
            if self.polls == 2:
                _checkpoint(tmp_path / "work" / "run" / "checkpoints" / "last", b"last 4")
                with open(tmp_path / "work" / "run" / "metrics.jsonl", "a") as fh:
                    for e in (3, 4):
                        fh.write(json.dumps({"epoch": e, "best_val_dice": 0.6, "best_epoch": e, "cpu_hours": 0.4}) + "\n")
            return None if self.polls < 3 else 0

        returncode = 0

    monkeypatch.setattr(B.subprocess, "Popen", Child)
    monkeypatch.setattr(B.time, "sleep", lambda s: None)
    monkeypatch.setattr(B, "git_commit", lambda paths, message: commits.append((paths, message)) or True)
    code = B.main(["kidney-synth-4", "--workdir", str(tmp_path / "work"), "--resume-dir", str(resume)])
    assert code == 0
    cmd = started[0]
    assert cmd[:3] == [sys.executable, "-m", "qnkit.train.recipe"] and "--until" in cmd and "train" in cmd
    assert cmd[cmd.index("--resume-dir") + 1] == str(resume)
    assert (resume / "kidney-synth-4" / "checkpoints" / "last" / "model.safetensors").read_bytes() == b"last 4"
    assert len(commits) == 1 and "epoch 4" in commits[0][1] and commits[0][0] == [resume / "kidney-synth-4"]
