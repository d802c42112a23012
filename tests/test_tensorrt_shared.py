"""What the TensorRT backend shares with the tested backends, checked on the CPU (no GPU or TensorRT needed).

TensorRT itself runs in tests/test_backends_gpu.py, skipped without a GPU. Here: the optimisation profile
an engine is built with (dynamic height/width around the export grid), the choice between the bundle's
engine and a rebuild, when a cached rebuild may run, the runtime never importing qnkit.export, and that the
verification every engine passes catches what the old fixed-grid padding did to QuickNAT, with a real
(small) network on the CPU.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qnkit.backends.base import Backend
from qnkit.backends.tensorrt_backend import cached_engine_usable, select_engine
from qnkit.backends.tensorrt_build import engine_profile, profile_covers, profile_is_dynamic
from qnkit.bundle import ENGINE, Bundle, BundleError
from qnkit.errors import QnkitInputError
from qnkit.verification import verification_grids, verify_engine

HERE = {"tensorrt": "10.13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0"}


def test_profile_is_dynamic_around_the_export_grid():
    p = engine_profile((256, 192), 16, (1, 8, 32))
    assert p == {"input": "image", "min": [1, 1, 16, 16], "opt": [8, 1, 256, 192], "max": [32, 1, 512, 384]}
    assert profile_is_dynamic(p)
    for hw in ((16, 16), (256, 192), (240, 368), (512, 384)):  # smaller, export, other shape, largest
        assert profile_covers(p, hw)
    assert not any(profile_covers(p, hw) for hw in ((528, 384), (256, 400), (8, 16)))
    grown = engine_profile((256, 192), 16, (1, 8, 32), cover=(530, 100))
    assert grown["max"] == [32, 1, 576, 384] and profile_covers(grown, (544, 384))  # 530 -> multiple of 64
    with pytest.raises(QnkitInputError, match="min <= opt <= max"):
        engine_profile((256, 256), 16, (8, 4, 32))
    with pytest.raises(QnkitInputError, match="multiples of 16"):
        engine_profile((250, 256), 16, (1, 8, 32))


def _bundle(engine: dict | None) -> Bundle:
    artefacts = {"model.onnx": {"sha256": "0" * 64}}
    if engine is not None:
        artefacts[ENGINE] = {"sha256": "1" * 64}
    meta = {"model": {"input_size": [64, 64], "input": {"name": "image"}},
            "preprocessing": {"size_divisor": 16, "hu_window": [-200, 400]}, "threshold": 0.5,
            "artefacts": artefacts, "engine": engine}
    return Bundle(Path("/nonexistent/bundle"), meta)


def _engine(profile: dict, **kw) -> dict:
    return {"file": ENGINE, "precision": "fp16", "profile": profile, **HERE, **kw}


def test_bundle_engine_runs_only_when_built_here_with_a_dynamic_profile():
    dynamic = engine_profile((64, 64), 16, (1, 8, 16))
    fixed = {"input": "image", "min": [1, 1, 64, 64], "opt": [8, 1, 64, 64], "max": [16, 1, 64, 64]}
    assert select_engine(_bundle(_engine(dynamic)), HERE, "fp16")[0] == "bundle"
    assert select_engine(_bundle(_engine(dynamic)), HERE, "fp16", hw=(32, 128))[0] == "bundle"
    cases = {
        "no TensorRT engine": (_bundle(None), {}),
        "fp32 was asked for": (_bundle(_engine(dynamic)), {"precision": "fp32"}),
        "one fixed slice grid": (_bundle(_engine(fixed)), {}),  # an engine of an older export: padded inputs
        "not 160x64": (_bundle(_engine(dynamic)), {"hw": (160, 64)}),  # larger than its profile
        "TensorRT 10.0.1": (_bundle(_engine(dynamic, tensorrt="10.0.1")), {}),
        "compute capability 8.0": (_bundle(_engine(dynamic, compute_capability="8.0")), {}),
    }
    for reason, (bundle, kw) in cases.items():
        precision = kw.pop("precision", "fp16")
        choice, why = select_engine(bundle, HERE, precision, **kw)
        assert choice == "rebuild" and reason in why, (reason, why)
        with pytest.raises(BundleError, match="not running it"):
            select_engine(bundle, HERE, precision, rebuild=False, **kw)


def test_a_cached_rebuild_runs_only_verified_and_unchanged():
    passed = {"sha256": "ab" * 32, "verification": {"passed": True}}
    assert cached_engine_usable(passed, "ab" * 32)
    assert not cached_engine_usable(passed, "cd" * 32)  # the engine file changed since it was verified
    assert not cached_engine_usable({**passed, "verification": {"passed": False}}, "ab" * 32)
    assert not cached_engine_usable({"sha256": "ab" * 32}, "ab" * 32)  # cached before verification existed
    assert not cached_engine_usable(None, "ab" * 32)


def test_runtime_never_imports_qnkit_export_or_train():
    """Static: no runtime module (the CLI commands that run export or training aside) imports them."""
    root = Path(__file__).resolve().parents[1] / "qnkit"
    offenders = []
    for path in root.rglob("*.py"):
        if "commands" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("qnkit.export", "qnkit.train"))]
    assert offenders == []
    code = "import sys, qnkit.backends.tensorrt_backend; print(sorted(m for m in sys.modules if m == 'torch' " \
           "or m.startswith(('qnkit.export', 'qnkit.train'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_verification_grids_are_smaller_equal_and_larger():
    x = np.random.default_rng(0).random((3, 1, 48, 32), dtype=np.float32)
    grids = verification_grids(x, 16)
    assert {k: v.shape[2:] for k, v in grids.items()} == {"export": (48, 32), "smaller": (32, 16),
                                                          "larger": (64, 64)}
    assert np.array_equal(grids["larger"][:, :, :48, :32], x) and not grids["larger"][:, :, 48:].any()


class _EagerOnGrid(Backend):
    """Eager QuickNAT behind the shared Backend.predict, optionally padding every slice up to one grid,
    as TensorRT engines of one fixed H x W did."""

    name = "eager-on-grid"

    def __init__(self, predict, grid=None):
        self._predict, self.fixed_hw, self.batch_size = predict, grid, 8

    def _run(self, x):
        return self._predict(x)


def test_verification_catches_padding_up_to_a_fixed_grid():
    """QuickNAT's squeeze-excitation averages over the whole slice: running slices padded up to one grid
    is not what ONNX Runtime and `qnkit evaluate` compute, and the engine verification says so; running
    each slice at its own padded size (what the dynamic profile does) passes."""
    torch = pytest.importorskip("torch")
    from qnkit.nn.eager import make_predict_batch
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig
    from qnkit.verification import synthetic_slices

    torch.manual_seed(0)
    reference = make_predict_batch(QuickNAT(QuickNATConfig(num_filters=8)))
    x, _ = synthetic_slices((32, 32), (-200.0, 400.0), per_case=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only contend on a shared 2-core machine
    try:
        _, why = verify_engine(_EagerOnGrid(reference, grid=(64, 64)).predict, reference, x, precision="fp32",
                               threshold=0.5, divisor=16)
        figures, fine = verify_engine(_EagerOnGrid(reference).predict, reference, x, precision="fp32",
                                      threshold=0.5, divisor=16)
    finally:
        torch.set_num_threads(threads)
    assert why is not None and "grid" in why
    why = fine
    assert why is None and figures["passed"]
    assert all(figures[g]["max_abs_diff"] == 0.0 for g in ("export", "smaller", "larger"))
