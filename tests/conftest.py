"""Shared fixtures: small synthetic KiTS19-layout datasets (made once per session) and a small trained run.

- `synth_dataset`: 8 cases, 64x64 in-plane, seed 0 (read-only: copy it before changing files).
- `synth_dataset_factory(cases=, size=, seed=)`: other sizes, cached per session by parameters.
- `trained_run`: RUN_DIR of a tiny QuickNAT trained on `synth_dataset` (SMALL_TRAIN_ARGS: 3 epochs, 8 filters) and
  evaluated once; shared by the training/evaluation tests (read-only).
- `exported_bundle`: a bundle exported once from `trained_run` (FP32 ONNX; read-only).
- `run_qnkit(*args, env=None)`: `python -m qnkit ...` in a subprocess -> CompletedProcess.
- `shared_bundle`: (RUN_DIR, BUNDLE_DIR) of a fitted tiny checkpoint exported with --fp16 --int8 (read-only).
- `mismatched_case_dataset`: a dataset whose one case has labels one slice short of its image.

The suite runs on pytest-xdist workers, one per core up to 4 (pyproject's addopts): each worker and every process it starts
uses one thread (two 2-thread torch processes on two cores spend their time spinning), and the session
fixtures above are built once, by whichever worker asks first, under a file lock (`_built_once`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "" outside xdist
if XDIST_WORKER:
    # Before torch is imported anywhere in this worker: its OpenMP pool reads this once.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["QNKIT_NUM_THREADS"] = "1"
TORCH_THREADS = 1 if XDIST_WORKER else 2


def pytest_collection_modifyitems(config, items):
    """Files with slow tests (training runs) first. xdist hands out whole files in this order (pyproject:
    --dist loadfile --no-loadscope-reorder), so the long files start early and the short ones fill in
    around them, instead of the longest ones ending the run side by side."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per test session, shared by every xdist worker; returns the folder.

    Without xdist it is a plain per-session folder. Under xdist the first worker builds it while holding a
    lock in the session's common temp root, then marks it done; the others wait and reuse it (read-only).
    """
    if not XDIST_WORKER:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent
    folder, done = root / f"shared_{name}", root / f"shared_{name}.done"
    with FileLock(str(root / f"shared_{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder

# Small enough for a 2-core CPU; lr 3e-3 and effective batch 4 (not the report's 1e-3 / 16) so that
# 3 epochs on 5 tiny volumes get well past chance; one pass over the slices per epoch.
SMALL_TRAIN_ARGS = ("--epochs", "3", "--num-filters", "8", "--micro-batch", "4", "--effective-batch", "4",
                    "--lr", "3e-3", "--no-progress", "--device", "cpu", "--seed", "0", "--min-steps-per-epoch", "0")


@pytest.fixture(scope="session")
def synth_dataset_factory(tmp_path_factory):
    made: dict[tuple, Path] = {}

    def make(cases: int = 8, size: int = 64, seed: int = 0) -> Path:
        key = (cases, size, seed)
        if key not in made:
            from qnkit.synth import write_dataset

            made[key] = _built_once(tmp_path_factory, f"synth_{cases}x{size}_s{seed}", lambda out: write_dataset(
                out, cases=cases, size=size, seed=seed, progress=False))
        return made[key]

    return make


@pytest.fixture(scope="session")
def synth_dataset(synth_dataset_factory) -> Path:
    return synth_dataset_factory(8, 64, 0)


def _run_qnkit(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "QNKIT_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qnkit", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def run_qnkit():
    return _run_qnkit


@pytest.fixture(scope="session")
def trained_run(synth_dataset, tmp_path_factory) -> Path:
    def build(folder: Path) -> None:
        run = folder / "run"
        proc = _run_qnkit("train", "--data", synth_dataset, "--out", run, *SMALL_TRAIN_ARGS)
        assert proc.returncode == 0, proc.stderr
        proc = _run_qnkit("evaluate", run, "--json", folder / "evaluation.json")
        assert proc.returncode == 0, proc.stderr

    return _built_once(tmp_path_factory, "trained", build) / "run"


@pytest.fixture(scope="session")
def exported_bundle(trained_run, tmp_path_factory) -> Path:
    """A model bundle (FP32 ONNX) exported once from `trained_run` (read-only)."""
    from qnkit.export.bundle_writer import export_bundle

    return _built_once(tmp_path_factory, "exported",
                       lambda folder: export_bundle(trained_run, folder / "bundle", log=lambda m: None)) / "bundle"


def write_resampled_case(case_dir: Path, out_root: Path, size: int) -> Path:
    """Copy of a KiTS-layout case resampled in-plane to size x size over the same field of view
    (image bilinear, labels by kidney fraction >= 0.5), written in the internal layout with the matching
    affine. Returns the new case folder (same name, under `out_root`)."""
    import nibabel as nib
    import numpy as np

    from qnkit import io as qio
    from qnkit import resample

    ct, geometry = qio.load_image(next(case_dir.glob("imaging.nii*")))
    labels, _ = qio.load_labels(next(case_dir.glob("segmentation.nii*")))
    z, h, w = ct.shape
    image = np.round(resample.probabilities_to_grid(ct.astype(np.float32), (size, size))).astype(np.int16)
    cover = [resample.probabilities_to_grid((labels == k).astype(np.float32), (size, size)) for k in (1, 2)]
    seg = np.where(cover[0] + cover[1] >= 0.5, np.where(cover[1] > cover[0], 2, 1), 0).astype(np.uint8)
    affine = geometry.internal_affine.copy()
    for axis, (old, new) in ((1, (h, size)), (2, (w, size))):
        f = old / new  # old pixels per new pixel; new pixel centre i sits at old index (i + 0.5) * f - 0.5
        affine[:3, 3] += affine[:3, axis] * (0.5 * f - 0.5)
        affine[:3, axis] *= f
    folder = Path(out_root) / case_dir.name
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), folder / "segmentation.nii.gz")
    return folder


# ------------------------------------------------------------------ the exported test bundle
EXPORT_HW = (64, 64)  # the shared bundle's model grid
EXPORT_HU = (-200.0, 400.0)  # and its HU window


def _fitted_checkpoint_run(root: Path) -> Path:
    """RUN_DIR with a 'best' checkpoint of a tiny QuickNAT (8 filters) briefly fitted on synthetic slices
    (cases of size 128, so 64x64 model slices), saved with the training code's checkpoint writer."""
    import numpy as np
    import torch

    from qnkit import kernels
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig
    from qnkit.synth import make_case
    from qnkit.train import checkpoint as ckpt

    xs, ys = [], []
    for i in range(3):
        case = make_case(i, size=2 * EXPORT_HW[0], seed=5)
        span = kernels.kidney_slice_range(case.segmentation, margin=3)
        ct = np.ascontiguousarray(case.imaging[span[0]:span[1]])
        xs.append(kernels.downsample_image(ct, *EXPORT_HU))
        ys.append((case.segmentation[span[0]:span[1], ::2, ::2] > 0).astype(np.float32))
    x, y = torch.from_numpy(np.concatenate(xs)[:, None]), torch.from_numpy(np.concatenate(ys)[:, None])
    torch.manual_seed(0)
    torch.set_num_threads(TORCH_THREADS)
    cfg = QuickNATConfig(num_filters=8, drop_out=0.0)
    model = QuickNAT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(x), (8,), generator=gen)
        p = torch.sigmoid(model(x[idx]))
        inter = (p * y[idx]).sum()
        loss = 1 - (2 * inter + 1) / (p.sum() + y[idx].sum() + 1) + torch.nn.functional.binary_cross_entropy(p, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    run = root / "run"
    meta = {"network": cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters()), "epoch": 1,
            "metrics": {"epoch": 1, "train_loss": float(loss.detach()), "val_dice": None},
            "preprocessing": {"hu_lo": EXPORT_HU[0], "hu_hi": EXPORT_HU[1], "slice_margin": 20, "omega0": 2.0,
                              "downsample": 2, "pad_multiple": 16, "pad_value": 0.0, "threshold": 0.5}}
    ckpt.save(run, "best", model, meta)
    return run


@pytest.fixture(scope="session")
def shared_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(RUN_DIR, BUNDLE_DIR): a fitted tiny checkpoint and its bundle exported once per session through the
    CLI with --fp16 --int8 on a 64x64 grid; shared read-only by the export, backend and bundle tests."""
    import torch  # noqa: F401
    import onnxruntime  # noqa: F401  (segmenting needs it: missing is an error, not a skip)

    def build(root: Path) -> None:
        run = _fitted_checkpoint_run(root)
        proc = _run_qnkit("export", run, "--out", root / "bundle", "--fp16", "--int8", "--input-size", "64x64")
        assert proc.returncode == 0, proc.stderr

    root = _built_once(tmp_path_factory, "export", build)
    return root / "run", root / "bundle"


@pytest.fixture
def export_reusing_shared_graph(shared_bundle, monkeypatch) -> tuple[Path, Path]:
    """`shared_bundle`, with export_bundle patched to take the FP32 graph of its checkpoint from the shared
    bundle instead of running torch.onnx.export again (about 20 s): for tests of what export does around the
    graph (verification bars, INT8 and its evidence, the record), called in-process on ``shared_bundle[0]``."""
    import json
    import shutil

    from qnkit.export import onnx_export

    record = json.loads((shared_bundle[1] / "qnkit.json").read_text())["export"]["fp32"]

    def exported_already(model, path, input_size):
        shutil.copyfile(shared_bundle[1] / "model.onnx", path)
        return dict(record)

    monkeypatch.setattr(onnx_export, "export_fp32", exported_already)
    return shared_bundle


@pytest.fixture
def mismatched_case_dataset(synth_dataset, tmp_path) -> Path:
    """A dataset folder holding a copy of case_00000 whose labels lack the last slice (image and labels
    shapes differ)."""
    import shutil

    import nibabel as nib
    import numpy as np

    data = tmp_path / "mismatched"
    shutil.copytree(synth_dataset / "case_00000", data / "case_00000")
    seg = data / "case_00000" / "segmentation.nii.gz"
    img = nib.load(seg)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-1], img.affine, img.header), seg)
    return data

