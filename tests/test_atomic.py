"""Crash-safe writes (qnkit._atomic, qnkit.train.checkpoint): writers SIGKILLed at every step of the
write protocol, a full disk, racing no-overwrite writers, fsync order and file modes.

The fault tests fork a writer, let it trace its own execution and SIGKILL itself at the N-th line
executed in the write protocol (qnkit/_atomic.py, train/checkpoint.py and the chunked writer below),
for every N from the first line to the last. After each kill the target must hold the old or the new
content, whole; the killed writer's temporaries are hidden and the next write removes them.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qnkit import _atomic

TRACED = ("_atomic.py", "checkpoint.py", Path(__file__).name)
OLD, NEW = b"old " * 20_000, b"new!" * 30_000


def _write_in_chunks(path: Path, data: bytes, chunks: int = 8) -> None:
    """Write ``data`` in pieces, so that a kill can leave a half-written temporary."""
    with open(path, "wb") as fh:
        step = -(-len(data) // chunks)
        for start in range(0, len(data), step):
            fh.write(data[start:start + step])
            fh.flush()


def _run_traced(action, kill_at: int | None) -> int:
    """Run ``action`` in a forked child that SIGKILLs itself at its ``kill_at``-th traced line.

    Returns the number of traced lines when the child ran to the end (kill_at None or too large),
    or -1 when it was killed.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer
        os.close(read_end)
        count = 0

        def local(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return local

        def global_trace(frame, event, arg):
            return local if frame.f_code.co_filename.endswith(TRACED) else None

        code = 0
        try:
            sys.settrace(global_trace)
            action()
            sys.settrace(None)
            os.write(write_end, str(count).encode())
        except BaseException:  # noqa: BLE001 - report through the exit code, never run pytest on
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        out = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return -1
    assert os.WEXITSTATUS(status) == 0, "the writer failed"
    return int(out)


def _kill_points(action, reset) -> list[int]:
    reset()
    total = _run_traced(action, None)
    assert total >= 50, f"only {total} traced lines: the fault test needs at least 50 kill points"
    return list(range(1, total + 1))


def _hidden_temporaries(folder: Path, keep: set[str]) -> list[str]:
    others = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert all(name.startswith(".") and _atomic._TMP_MARK in name or name.endswith(".old") for name in others), others
    return others


@pytest.mark.parametrize("overwrite", [True, False])
def test_file_writer_killed_at_every_step_keeps_old_or_new_whole(tmp_path, overwrite):
    target = tmp_path / "volume.nii.gz"

    def reset():
        for p in tmp_path.iterdir():
            _atomic.remove_path(p)
        if overwrite:
            target.write_bytes(OLD)

    def write():
        with _atomic.atomic_path(target, overwrite=overwrite) as tmp:
            _write_in_chunks(tmp, NEW)

    points = _kill_points(write, reset)
    assert len(points) >= 50
    outcomes = set()
    for n in points:
        reset()
        killed = _run_traced(write, n) == -1
        content = target.read_bytes() if target.exists() else None
        assert content in ((OLD if overwrite else None), NEW), f"kill point {n}: partial target"
        outcomes.add(content == NEW)
        _hidden_temporaries(tmp_path, {target.name})
        assert killed or n == points[-1]
        # The next writer replaces whatever is there and removes the dead writer's temporaries.
        _atomic.write_bytes_atomic(target, b"next")
        assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_bytes() == b"next"
    assert outcomes == {False, True}  # kills before and after the rename were both exercised


@pytest.fixture(params=["exchange", "two-renames"])
def swap_mode(request, monkeypatch):
    """Folder swaps with renameat2(RENAME_EXCHANGE), and the fallback where the kernel lacks it."""
    if request.param == "two-renames":
        monkeypatch.setattr(_atomic, "exchange", lambda a, b: False)
    elif not _atomic.exchange_supported():
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    return request.param


def _tiny_model(value: float):
    import torch

    model = torch.nn.Linear(64, 32)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_checkpoint_writer_killed_at_every_step_leaves_one_whole_copy(tmp_path, swap_mode):
    import torch  # noqa: F401
    import torch

    from qnkit.train import checkpoint as ckpt

    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    old_model, new_model = _tiny_model(1.0), _tiny_model(2.0)
    state = {"epoch": torch.tensor(3), "rng": torch.arange(1000)}

    def reset():
        _atomic.remove_path(run)
        ckpt.save(run, "last", old_model, {"epoch": 1}, state)

    def write():
        ckpt.save(run, "last", new_model, {"epoch": 2}, state)

    points = _kill_points(write, reset)
    seen = set()
    for n in points:
        reset()
        _run_traced(write, n)
        folder = ckpt.locate(run, "last")
        meta = ckpt.read_meta(folder, verify=True)  # every file whole and matching its hash
        model = _tiny_model(0.0)
        ckpt.load_weights(folder, model)
        assert float(model.weight[0, 0].detach()) == {1: 1.0, 2: 2.0}[meta["epoch"]], f"kill point {n}"
        assert ckpt.load_state(folder)["rng"].equal(state["rng"])
        seen.add(meta["epoch"])
        _hidden_temporaries(root, {"last"})
        ckpt.save(run, "last", new_model, {"epoch": 3}, state)
        assert [p.name for p in root.iterdir()] == ["last"], f"kill point {n}: leftovers"
    assert seen == {1, 2}


# ------------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_keeps_the_old_file_and_leaves_nothing(small_disk):
    target = small_disk / "mask.nii.gz"
    _atomic.write_bytes_atomic(target, OLD)
    with pytest.raises(OSError) as exc:
        with _atomic.atomic_path(target) as tmp:
            _write_in_chunks(tmp, os.urandom(1_000_000))
    assert exc.value.errno == errno.ENOSPC
    assert target.read_bytes() == OLD
    assert [p.name for p in small_disk.iterdir()] == [target.name]
    with pytest.raises(OSError):
        _atomic.write_bytes_atomic(small_disk / "new.bin", os.urandom(1_200_000))
    assert [p.name for p in small_disk.iterdir()] == [target.name]


def test_full_disk_checkpoint_keeps_the_previous_one(small_disk):
    import torch  # noqa: F401
    import torch

    from qnkit.train import checkpoint as ckpt

    ckpt.save(small_disk, "last", _tiny_model(1.0), {"epoch": 1}, {"x": torch.zeros(10)})
    with pytest.raises(Exception, match="No space left"):  # OSError, or safetensors' own error type
        ckpt.save(small_disk, "last", torch.nn.Linear(512, 512), {"epoch": 2}, {"x": torch.zeros(200_000)})
    folder = ckpt.locate(small_disk, "last")
    assert ckpt.read_meta(folder)["epoch"] == 1
    assert [p.name for p in (small_disk / "checkpoints").iterdir()] == ["last"]


# ------------------------------------------------------------------ protocol details
def test_no_overwrite_loses_to_a_writer_that_published_meanwhile(tmp_path):
    target = tmp_path / "mask.nii.gz"
    with pytest.raises(FileExistsError):
        with _atomic.atomic_path(target, overwrite=False) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")  # another writer publishes between the check and the rename
    assert target.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_data_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    target = tmp_path / "stats.json"
    _atomic.write_text_atomic(target, "{}")
    kinds = [e[0] for e in events]
    rename = kinds.index("replace")
    assert ("fsync", events[rename][1]) in events[:rename]  # the temporary's data, before
    assert ("fsync", str(tmp_path)) in events[rename + 1:]  # the folder entry, after


def test_modes_follow_the_umask_without_touching_it(tmp_path, monkeypatch):
    mask = os.umask(0o027)
    try:
        def forbidden(_):
            raise AssertionError("os.umask is process-wide: other threads would create files with it")

        monkeypatch.setattr(os, "umask", forbidden)
        _atomic.write_bytes_atomic(tmp_path / "a.bin", b"x")
        folder = _atomic.temp_dir(tmp_path / "bundle")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
        assert folder.stat().st_mode & 0o777 == 0o750
    finally:
        monkeypatch.undo()
        os.umask(mask)


def test_temporaries_of_live_writers_are_kept(tmp_path):
    target = tmp_path / "x.bin"
    live = _atomic._temp_name(target)
    live.write_bytes(b"")  # ours: this process is alive
    foreign = tmp_path / f".{target.name}.otherhost-1-abcd.tmp"
    foreign.write_bytes(b"")  # another machine's writer (shared file system): not ours to judge
    _atomic.write_bytes_atomic(target, b"x")
    assert live.exists() and foreign.exists()
