"""End-to-end row of `qnkit bench`: `qnkit segment`'s default path against eager PyTorch FP32, on one CT.

Both paths run `qnkit segment`'s pipeline (:func:`qnkit.segment.segment_file`: .nii.gz load, then the
one path from a CT to its mask, :func:`qnkit.segment.segment_ct`: HU window and resampling to the
model's millimetre grid, inference, back to the input's grid, post-processing; .nii.gz write) with the
same model (the shipped one unless ``--model``), the same batch size and the same threads; they differ
only where the default differs from the card's baseline:

- ``default``: what ``qnkit segment CT`` does: backend ``auto`` (ONNX Runtime on the CPU, INT8 only
  where the bundle's real-CT evidence chose it), the kidney slab (a coarse pass, then every slice
  of the slab only);
- ``eager``: eager PyTorch FP32 on every slice (``--backend torch --all-slices``);
- ``uncertainty``: the default path with the per-kidney quality verdict and N Monte-Carlo dropout
  samples (``--quality --uncertainty N``; N = :data:`UNCERTAINTY_SAMPLES`, fewer in a quick run): what
  the verdict costs, as ``cost_vs_plain`` (its wall time over the default path's). One timed run,
  whatever the mode: it does the default path's work and about N + 1 more passes over the kidneys' box.

Each path runs in a fresh process (``python -m qnkit.benchmarks.e2e``), so its peak memory is its
own and neither inherits the other's thread pools or caches: backend opened, one warm-up batch,
then ``repeats`` timed runs of the whole case, the paths taking turns one case at a time
(:func:`interleaved`: a shared machine whose speed drifts slows both alike); the figures are medians. The speed-up is the ratio
of the per-case wall times (load to written file); opening the backend (imports, session) is
reported beside it. The masks written by both are compared (Dice), and each with the phantom's
true labels. An optional memory row segments a 1,000-slice CT with the default path in its own
process and records its peak RSS.

On a machine with an NVIDIA GPU (``gpu``), the GPU rows run on the same CT: eager PyTorch FP32 on
every slice on the GPU (their baseline), PyTorch FP16 with CUDA graphs and, where installed,
TensorRT FP16 (both on the kidney slab), each with its speed-up over the GPU's eager FP32 and its
mask Dice against it.

Preprocessing runs in a worker thread ahead of inference, so its time overlaps inference; the
share of time outside inference is taken from the wall clock: (wall - inference) / wall.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qnkit.segment import STAGES

#: Monte-Carlo samples of the ``uncertainty`` row: the calibration's (benchmarks/quality_calibration.py);
#: `qnkit segment --uncertainty` has no default N.
UNCERTAINTY_SAMPLES = 8
PATHS = {
    "default": {"backend": "auto", "precision": "auto", "slab": True,
                "what": "qnkit segment's defaults: backend auto (ONNX Runtime on the CPU; INT8 only where the "
                        "bundle's real-CT evidence chose it), kidney slab"},
    "eager": {"backend": "torch", "precision": "fp32", "slab": False,
              "what": "eager PyTorch FP32 on every slice (qnkit segment --backend torch --all-slices): same model, "
                      "millimetre resampling, post-processing and .nii.gz I/O"},
    "uncertainty": {"backend": "auto", "precision": "auto", "slab": True,
                    "what": "the default path with the quality verdict (qnkit segment --quality --uncertainty N): "
                            "a mirror pass and N Monte-Carlo dropout samples over the kidneys' box"},
}

#: The GPU rows (issue 13, point 7); ``needs``: a package without which the row is skipped, and why.
GPU_PATHS = {
    "gpu_eager": {"backend": "torch", "precision": "fp32", "slab": False, "device": "cuda:0",
                  "what": "eager PyTorch FP32 on every slice, on the GPU (the GPU rows' baseline)"},
    "gpu_fp16_cuda_graphs": {"backend": "torch", "precision": "fp16", "slab": True, "device": "cuda:0",
                             "options": {"cuda_graphs": True},
                             "what": "PyTorch FP16 with CUDA graphs on the GPU, kidney slab"},
    "gpu_tensorrt_fp16": {"backend": "tensorrt", "precision": "fp16", "slab": True, "device": "cuda:0",
                          "needs": "tensorrt", "what": "TensorRT FP16 on the GPU, kidney slab"},
}
ALL_PATHS = {**PATHS, **GPU_PATHS}


def synthetic_ct(workdir: Path, *, size: int = 512, slices: int = 100, seed: int = 7) -> Path:
    """A small classic phantom cut (or tiled) to exactly `slices` slices around its kidneys (quick runs)."""
    import nibabel as nib

    from qnkit.synth import make_case

    case = make_case(0, size=size, seed=seed)
    z = case.imaging.shape[0]
    kidney = np.flatnonzero(case.segmentation.any(axis=(1, 2)))
    centre = int(kidney.mean()) if kidney.size else z // 2
    index = np.clip(np.arange(slices) + centre - slices // 2, 0, z - 1)
    folder = workdir / "bench_case"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("imaging.nii.gz", case.imaging), ("segmentation.nii.gz", case.segmentation)):
        image = nib.Nifti1Image(np.ascontiguousarray(data[index]), case.affine)
        image.set_sform(case.affine, code=2)
        nib.save(image, str(folder / name))
    return folder / "imaging.nii.gz"


def _peak_rss_gb() -> float:
    """This process's peak resident memory (GB): VmHWM, which starts afresh at exec. (ru_maxrss does not:
    Linux carries it across exec, so a worker started by a large bench process would report the bench's.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class PathRunner:
    """One path (``job["path"]``) on one CT in this process: opened and warmed up on entry, then one timed
    whole case per :meth:`run`; :meth:`row` is the path's figures over the runs so far (medians)."""

    def __init__(self, job: dict) -> None:
        self.job = job
        self.runs: list[dict] = []
        self.started: list[float] = []  # time.monotonic() at each run's start: one clock for every process
        self.result = None

    def __enter__(self) -> "PathRunner":
        from qnkit import inference
        from qnkit.backends import open_backend, open_sampler, sampling_predict
        from qnkit.bundle import load_bundle
        from qnkit.io import load_geometry
        from qnkit.segment import CaseInput, SegmentOptions, model_arguments

        job, path = self.job, ALL_PATHS[self.job["path"]]
        self.what = path["what"]
        started = time.perf_counter()
        self.bundle = bundle = load_bundle(job["bundle"])
        self.backend = open_backend(bundle, path["backend"], precision=path["precision"],
                                    device=path.get("device", "cpu"), batch_size=job["batch_size"],
                                    log=lambda *a: None, **path.get("options", {}))
        segment = job.get("segment", {})  # SegmentOptions beyond the defaults: the uncertainty row's quality pass
        dropout = model_arguments(bundle)["dropout"] if segment.get("uncertainty") else None
        self.sampler = open_sampler(bundle, self.backend, log=lambda *a: None) if dropout else None
        self.predict = sampling_predict(lambda: self.backend, lambda: self.sampler)
        self.open_s = time.perf_counter() - started
        image = Path(job["image"])
        geometry = load_geometry(image)
        grid = inference.model_grid_shape(geometry.internal_shape[1:], geometry.spacing[1:],
                                          inference.model_pixel_spacing(bundle))
        arguments = model_arguments(bundle)
        channels, pad_multiple = arguments["context"][0], arguments["pad_multiple"]
        warm = np.zeros((job["batch_size"], channels, *(inference.padded_size(n, pad_multiple) for n in grid)),
                        np.float32)
        self.backend.predict(warm)  # first-call allocations and thread pools, the same for both paths
        if self.sampler is not None:
            self.sampler.predict(warm, np.ones((len(warm), dropout["sites"], dropout["filters"]), np.float32))
        self.case = CaseInput(name="bench", image=image, source=image)
        self.options = SegmentOptions(batch_size=job["batch_size"], slab=path["slab"], **segment)
        return self

    def run(self) -> dict:
        """One timed whole case (load to written mask); its stage timings. The job's last run is profiled
        when the job asks for a profile."""
        from qnkit.segment import segment_file

        profiler = None
        if self.job.get("profile") and len(self.runs) == max(1, self.job["repeats"]) - 1:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.005)
            profiler.start()
        self.started.append(time.monotonic())
        self.result = segment_file(self.case, Path(self.job["out"]), self.predict, bundle=self.bundle,
                                   options=self.options, overwrite=True)
        if profiler is not None:
            profiler.stop()
            Path(self.job["profile"]).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        self.runs.append(self.result.timings)
        return self.result.timings

    def row(self) -> dict:
        runs, result = self.runs, self.result
        describe = self.backend.describe()
        if self.sampler is not None and self.sampler is not self.backend:
            describe["sampler"] = self.sampler.describe()
        stages = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in (*STAGES, "wall")}
        row = {"what": self.what, "backend": describe, "open_s": self.open_s, "stages_s": stages,
               "wall_s": stages["wall"], "runs_wall_s": [r["wall"] for r in runs], "repeats": len(runs),
               "runs_started_s": self.started,
               "share_outside_inference": (stages["wall"] - stages["inference"]) / stages["wall"],
               "slab": (result.model_grid or {}).get("slab"), "model_grid": result.model_grid,
               "kidneys_ml": {side: result.stats[side]["volume_ml"] for side in ("right", "left")},
               "peak_rss_gb": _peak_rss_gb()}
        if self.options.quality:
            verdicts = {side: result.stats[side].get("quality") for side in ("right", "left")}
            row["quality"] = {side: q and {k: q[k] for k in ("verdict", "score", "samples")}
                              for side, q in verdicts.items()}
        return row

    def __exit__(self, *exc) -> None:
        if self.sampler is not None and self.sampler is not self.backend:
            self.sampler.close()
        self.backend.close()


def measure_path(job: dict) -> dict:
    """One path on one CT in this process: open, warm up, time ``repeats`` whole cases; the path's row."""
    with PathRunner(job) as runner:
        for _ in range(max(1, job["repeats"])):
            runner.run()
        return runner.row()


def _in_subprocess(job: dict) -> dict:
    """:func:`measure_path` in a fresh interpreter; its peak RSS is the worker's own."""
    proc = subprocess.run([sys.executable, "-m", "qnkit.benchmarks.e2e"], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"e2e {job['path']} worker failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved(jobs: dict[str, dict], repeats: int) -> dict[str, dict]:
    """Several paths timed in turn, one whole case each per round, each in its own fresh process (opened and
    warmed up before the first round): a machine whose speed drifts (a shared virtual machine) slows every
    path alike, so their ratio holds. Rounds alternate which path goes first. Returns each path's row."""
    workers = {}
    try:
        for name, job in jobs.items():
            workers[name] = subprocess.Popen([sys.executable, "-m", "qnkit.benchmarks.e2e", "--serve"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                             stderr=tempfile.TemporaryFile(mode="w+"))
            _ask(workers[name], name, json.dumps(job))
        order = list(jobs)
        for round_ in range(max(1, repeats)):
            for name in (order if round_ % 2 == 0 else order[::-1]):
                _ask(workers[name], name, "run")
        return {name: json.loads(_ask(worker, name, "row")) for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.stdin.close()
                worker.wait()


def _ask(worker: subprocess.Popen, name: str, line: str) -> str:
    """Send one line to a serving worker and return its one-line answer."""
    worker.stdin.write(line + "\n")
    worker.stdin.flush()
    answer = worker.stdout.readline()
    if not answer:
        code = worker.wait()
        worker.stderr.seek(0)
        lines = [text for text in worker.stderr.read().strip().splitlines() if text.strip()]
        raise RuntimeError(f"e2e {name} worker failed: {lines[-1] if lines else code}")
    return answer.strip()


def cache_folder(workdir: Path | None) -> Path:
    """Where the synthetic CTs are kept between runs: ``--workdir``, else qnkit's cache folder."""
    if workdir is not None:
        return Path(workdir)
    from qnkit.backends.onnxruntime_backend import cache_dir

    return cache_dir() / "bench"


def gpu_rows(bundle_path: Path, image: Path, truth: np.ndarray, work: Path, *, batch_size: int, repeats: int,
             progress=lambda what: None) -> dict:
    """:data:`GPU_PATHS` on one CT, each in its own process; speed-ups and mask Dice against the GPU's eager FP32."""
    import importlib.util

    from qnkit import io as qio
    from qnkit.kernels import mask_dice

    rows, masks = {}, {}
    for name, path in GPU_PATHS.items():
        if path.get("needs") and importlib.util.find_spec(path["needs"]) is None:
            rows[name] = {"what": path["what"], "skipped": f"{path['needs']} is not installed"}
            continue
        progress(f"end to end: {name} ({path['backend']} {path['precision']}), {repeats} run(s)")
        out = work / f"mask_{name}.nii.gz"
        rows[name] = _in_subprocess({"path": name, "bundle": str(bundle_path), "image": str(image), "out": str(out),
                                     "batch_size": batch_size, "repeats": repeats})
        masks[name] = qio.load_labels(out)[0] > 0
        rows[name]["dice_vs_truth"] = mask_dice(masks[name], truth)
        out.unlink(missing_ok=True)
    base = rows["gpu_eager"]
    for name, row in rows.items():
        if name in masks:
            row["speedup_vs_gpu_eager"] = base["wall_s"] / row["wall_s"]
            row["mask_dice_vs_gpu_eager"] = mask_dice(masks[name], masks["gpu_eager"])
    return rows


def run(model, *, workdir: Path | None = None, cache: Path | None = None, whole: bool = True, repeats: int = 2,
        batch_size: int = 16, memory_slices: int = 0, quick_size: int = 128, quick_slices: int = 24,
        profile: bool = False, gpu: bool | None = None, uncertainty_samples: int = UNCERTAINTY_SAMPLES,
        baseline=None, progress=lambda what: None) -> dict:
    """Both paths on the whole CT (or, with ``whole`` False, a small phantom), side by side, and the default
    path with the quality verdict and `uncertainty_samples` Monte-Carlo samples; see the module.
    ``gpu`` None: the GPU rows run where an NVIDIA GPU is present. ``baseline``: another model (name or bundle)
    whose default path is timed on the same CT in the same run (``seconds_vs_baseline``: this model's time over
    its; a new default model against the one it replaces)."""
    from qnkit import io as qio
    from qnkit.bundle import load_bundle
    from qnkit.kernels import mask_dice
    from qnkit.models import resolve_model

    from .whole_ct import stretch_to, whole_ct_in_subprocess

    bundle_path = Path(resolve_model(model))
    bundle = load_bundle(bundle_path, verify=False)
    cache = Path(cache or cache_folder(workdir))
    work = Path(tempfile.mkdtemp(prefix="qnkit-bench-e2e-", dir=workdir))
    made = time.perf_counter()
    if whole:
        progress("end to end: the whole CT (generated once, then cached)")
        image, labels, meta = whole_ct_in_subprocess(cache, log=progress)
        case = {"kind": "anatomy phantom, whole abdominal CT", "cache": str(image), **meta}
    else:
        image = synthetic_ct(work, size=quick_size, slices=quick_slices)
        labels, case = image.with_name("segmentation.nii.gz"), {"kind": "classic phantom (quick run)"}
    case["prepare_s"] = time.perf_counter() - made
    geometry = qio.load_geometry(image)
    case.update(shape=list(geometry.internal_shape), spacing_mm=[round(s, 4) for s in geometry.spacing])
    truth, _ = qio.load_labels(labels)
    truth = truth > 0
    jobs, masks = {}, {}
    for name in ("default", "eager"):
        jobs[name] = {"path": name, "bundle": str(bundle_path), "image": str(image),
                      "out": str(work / f"mask_{name}.nii.gz"), "batch_size": batch_size, "repeats": repeats}
        if profile:
            jobs[name]["profile"] = str(work / f"profile_{name}.txt")
    other = Path(resolve_model(baseline)) if baseline is not None else None
    if other is not None:
        jobs["baseline"] = {"path": "default", "bundle": str(other), "image": str(image),
                            "out": str(work / "mask_baseline.nii.gz"), "batch_size": batch_size, "repeats": repeats}
    progress(f"end to end: {', '.join(jobs)} in turn, {repeats} run(s) each")
    paths = interleaved(jobs, repeats)
    for name, job in jobs.items():
        out = Path(job["out"])
        if profile:
            paths[name]["profile"] = job["profile"]
        masks[name] = qio.load_labels(out)[0] > 0
        paths[name]["dice_vs_truth"] = mask_dice(masks[name], truth)
        out.unlink(missing_ok=True)
    default, eager = paths["default"], paths["eager"]
    compared = paths.get("baseline")
    if compared is not None:
        compared.update(model=other.name, mask_dice_vs_default=mask_dice(masks["baseline"], masks["default"]))
    progress(f"end to end: default path with --quality --uncertainty {uncertainty_samples}, 1 run")
    out = work / "mask_uncertainty.nii.gz"
    uncertainty = _in_subprocess({"path": "uncertainty", "bundle": str(bundle_path), "image": str(image),
                                  "out": str(out), "batch_size": batch_size, "repeats": 1,
                                  "segment": {"quality": True, "uncertainty": uncertainty_samples}})
    uncertainty.update(samples_asked=uncertainty_samples, cost_vs_plain=uncertainty["wall_s"] / default["wall_s"],
                       mask_dice_vs_default=mask_dice(qio.load_labels(out)[0] > 0, masks["default"]))
    out.unlink(missing_ok=True)
    report = {
        "case": case, "model": {"path": str(bundle_path), "name": bundle_path.name,
                                "network": bundle.network, "pixel_spacing_mm": (bundle.domain or {}).get("pixel_spacing_mm"),
                                "cpu_precision": bundle.cpu_precision},
        "batch_size": batch_size, "repeats": repeats, "default": default, "eager": eager, "uncertainty": uncertainty,
        "speedup_vs_eager": eager["wall_s"] / default["wall_s"],
        "speedup_vs_eager_with_open": (eager["wall_s"] + eager["open_s"]) / (default["wall_s"] + default["open_s"]),
        "mask_dice_vs_eager": mask_dice(masks["default"], masks["eager"]),
        "seconds": default["wall_s"], "eager_seconds": eager["wall_s"],
        "peak_rss_gb": default["peak_rss_gb"], "peak_rss_gb_by_slices": {str(case["shape"][0]): default["peak_rss_gb"]},
        **({"baseline": compared, "seconds_vs_baseline": default["wall_s"] / compared["wall_s"]} if compared else {}),
        "note": "seconds: per-case wall time of the default path (load to written mask, median); speedup: eager's "
                "over it; speedup_vs_eager_with_open adds each backend's opening (imports, session); peak RSS: "
                "the default path's worker process; uncertainty.cost_vs_plain: the default path with --quality "
                f"--uncertainty {uncertainty_samples} (one run), its wall time over the default path's",
    }
    if gpu is None:
        from qnkit.backends import nvidia_gpu_present

        gpu = nvidia_gpu_present()
    if gpu:
        report["gpu"] = gpu_rows(bundle_path, image, truth, work, batch_size=batch_size, repeats=repeats,
                                 progress=progress)
    if memory_slices:
        progress(f"end to end: memory, default path on a {memory_slices}-slice CT")
        folder = cache / "whole_ct" if whole else work
        big = stretch_to(image, folder / f"imaging_{memory_slices}_v2.nii.gz", memory_slices, labels)
        out = work / "mask_memory.nii.gz"
        row = _in_subprocess({"path": "default", "bundle": str(bundle_path), "image": str(big), "out": str(out),
                              "batch_size": batch_size, "repeats": 1})
        out.unlink(missing_ok=True)
        shape = list(qio.load_geometry(big).internal_shape)
        report["memory"] = {"shape": shape, "peak_rss_gb": row["peak_rss_gb"], "wall_s": row["wall_s"],
                            "stages_s": row["stages_s"], "slab": row["slab"], "backend": row["backend"]}
        report["peak_rss_gb_by_slices"][str(shape[0])] = row["peak_rss_gb"]
        report["peak_rss_gb"] = max(report["peak_rss_gb"], row["peak_rss_gb"])
    return report


def _worker() -> None:
    """`python -m qnkit.benchmarks.e2e`: one measure_path job as JSON on stdin, the result as JSON on stdout.

    With ``--serve`` (:func:`interleaved`): a job as the first line, answered ``ready`` once the path is open
    and warm; then ``run`` (one timed case, answered with its timings) and ``row`` (the path's row) lines."""
    if "--serve" not in sys.argv[1:]:
        job = json.loads(sys.stdin.read())
        print(json.dumps(measure_path(job)))
        return
    with PathRunner(json.loads(sys.stdin.readline())) as runner:
        print("ready", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "run":
                print(json.dumps(runner.run()), flush=True)
            elif command == "row":
                print(json.dumps(runner.row()), flush=True)
                return


if __name__ == "__main__":
    _worker()
