"""Mixed precision and torch.compile in the training step ([TRAINING] amp, compile; issue 25 point 1): bf16
autocast only on a CPU that computes bf16 natively, float16 on CUDA, FP32 otherwise; the step runs and the
weights stay float32; compile wraps the step's network, not the module that is checkpointed and validated."""
from __future__ import annotations

import pytest
import torch

from qnkit import cpus
from qnkit.train import distributed as dist
from qnkit.train import solver as S
from qnkit.train.checkpoint import build_model
from qnkit.train.runner import network_config
from qnkit.train.solver import describe_step
from qnkit.train.settings import load_settings


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    assert cpus.native_bf16(_cpuinfo(tmp_path, "avx512f avx512_vnni avx512_bf16")) == (True, "AVX512-BF16")
    assert cpus.native_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16")) == (True, "AMX-BF16")
    native, why = cpus.native_bf16(_cpuinfo(tmp_path, "avx512f avx512_vnni"))
    assert not native and "AVX512-BF16" in why
    assert cpus.native_bf16(tmp_path / "missing")[0] is False


@pytest.mark.parametrize("asked, device, native, expected", [
    (False, "cpu", True, None), (True, "cpu", True, torch.bfloat16), (True, "cpu", False, None),
    (True, "cuda", False, torch.float16), (False, "cuda", True, None)])
def test_amp_dtype_follows_the_device_and_the_cpu(monkeypatch, asked, device, native, expected):
    monkeypatch.setattr(cpus, "native_bf16", lambda: (native, "AVX512-BF16" if native else "no bf16"))
    assert S.amp_dtype(asked, torch.device(device)) is expected


def _solver(tmp_path, *, amp: bool = False, compile_step: bool = False):
    settings = load_settings(None)
    for key, value in (("amp", amp), ("compile", compile_step), ("micro_batch", 4), ("effective_batch", 4)):
        settings.set("TRAINING", key, value, "test")
    settings.set("NETWORK", "num_filters", 4, "test")
    settings.validate("test")
    torch.manual_seed(0)
    model = build_model(network_config(settings).to_dict())
    return S.Solver(model, settings, device=torch.device("cpu"), info=dist.DistInfo(), run_dir=tmp_path, meta={})


def _batches(count: int = 2):
    g = torch.Generator().manual_seed(1)
    for _ in range(count):
        x = torch.rand(4, 1, 32, 32, generator=g)
        y = (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float()
        yield x, y, torch.ones_like(y), torch.zeros(4, dtype=torch.long)


def test_a_bf16_step_trains_and_keeps_float32_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "native_bf16", lambda: (True, "AVX512-BF16"))
    solver = _solver(tmp_path, amp=True)
    assert solver.amp_dtype is torch.bfloat16 and not solver.scaler.is_enabled()
    assert describe_step(solver) == "bfloat16 autocast (AVX512-BF16)"
    before = [p.detach().clone() for p in solver.net.parameters()]
    result = solver.train_epoch(list(_batches()), num_volumes=1, epoch=1)
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert all(p.dtype == torch.float32 for p in solver.net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, solver.net.parameters()))


def test_amp_on_a_cpu_without_bf16_is_fp32_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "native_bf16", lambda: (False, "no AVX512-BF16, AMX-BF16 or ARM BF16"))
    solver = _solver(tmp_path, amp=True)
    assert solver.amp_dtype is None and not solver.amp
    assert describe_step(solver) == "FP32 (amp asked: no AVX512-BF16, AMX-BF16 or ARM BF16)"


def test_compile_wraps_the_step_not_the_checkpointed_module(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    solver = _solver(tmp_path, compile_step=True)
    assert compiled == [solver.model] and solver.net is solver.model
    assert describe_step(solver) == "FP32, torch.compile"
    plain = _solver(tmp_path)
    assert plain.step_model is plain.model and len(compiled) == 1
