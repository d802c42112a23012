"""qnkit.cpus: one thread-count rule for kernels, backends and training that never crashes and
counts the CPUs this process may really use (affinity mask, cgroup quota)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qnkit import cpus


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", " "])
def test_a_bad_thread_setting_is_ignored_with_a_warning_not_a_crash(value):
    proc = _python("import qnkit.kernels as k, qnkit.cpus as c; print(k.get_num_threads(), c.available_cpus())",
                   QNKIT_NUM_THREADS=value)
    assert proc.returncode == 0, proc.stderr
    threads, available = proc.stdout.split()
    assert threads == available
    if value.strip():
        assert "QNKIT_NUM_THREADS" in proc.stderr and proc.stderr.count("\n") == 1


def test_the_cli_starts_with_a_bad_thread_setting(run_qnkit):
    proc = run_qnkit("synth", "--help", env={"QNKIT_NUM_THREADS": "abc"})
    assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr


def test_a_valid_setting_wins(monkeypatch):
    monkeypatch.setenv("QNKIT_NUM_THREADS", "3")
    assert cpus.default_threads() == 3
    from qnkit.backends.onnxruntime_backend import session_options

    assert session_options().intra_op_num_threads == 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_kernels_count_the_cpus_of_the_affinity_mask():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "import qnkit.kernels as k; print(k.get_num_threads())")
    proc = _python(code, QNKIT_NUM_THREADS="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_affinity_and_cgroup_quota_cap_the_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    assert cpus.available_cpus() == 8
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 1.5)  # docker --cpus 1.5
    assert cpus.available_cpus() == 2
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 0.2)
    assert cpus.available_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 4.0)
    assert cpus.available_cpus() == 1


def test_cgroup_files_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path / "v1") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit(tmp_path / "v1") is None
    assert cpus.cgroup_cpu_limit(tmp_path / "none") is None


@pytest.mark.parametrize("setting, env, ranks, expected", [
    (0, "3", 1, 3),   # the variable, per process, as for inference
    (0, "3", 2, 3),
    (2, "3", 1, 2),   # [COMMON] num_threads comes first
    (0, "", 2, None),  # neither: the cores shared among this machine's ranks
    (0, "abc", 2, None),  # an unusable value counts as unset
])
def test_training_threads(monkeypatch, setting, env, ranks, expected):
    import torch
    from qnkit.train import distributed as dist
    from qnkit.train.runner import _set_threads
    from qnkit.train.settings import Settings

    monkeypatch.setenv("QNKIT_NUM_THREADS", env)
    settings = Settings()
    settings.common.num_threads = setting
    before = torch.get_num_threads()
    try:
        _set_threads(settings, dist.DistInfo(world_size=ranks, local_world_size=ranks))
        assert torch.get_num_threads() == (expected or max(1, cpus.available_cpus() // ranks))
    finally:
        torch.set_num_threads(before)
