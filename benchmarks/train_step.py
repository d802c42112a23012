"""Training rows of `qnkit bench` (``--only train``): the recipe's real training loop, old against new.

Each variant runs :meth:`qnkit.train.solver.Solver.train_epoch` itself -- loading slices from the
``.npy`` cache through the DataLoader, augmentation, forward, loss, backward and the optimiser step --
on the same anatomy phantoms, with the shipped recipe's settings (``train/shipped.ini``: 16 filters,
2.5 mm pixels, micro-batch 8, one loader worker). ``whole`` trains on whole slices (the loop of the
kidney-synth models); ``window`` on [TRAINING] crop_size windows (kidney-synth-4's). Seconds are medians
of timed epochs of ``slices`` slices after one warm-up epoch, the variants taking turns repeat by repeat, the
loader process kept between them (steady state: the recipe's epochs are long enough for its start-up not to
count); the fastest repeat of each is recorded too (``best_seconds_per_slice``); FLOPs are counted by PyTorch's FLOP
counter on one forward + backward pass of a micro-batch (convolutions and matrix products; the
element-wise work of BN, PReLU and SE is not in it, so GFLOP/s is the convolution throughput).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

#: (name, [TRAINING] crop_size, amp, compile): the kidney-synth loop's whole slices against windows, and windows
#: with bf16 autocast (where the CPU has it natively; FP32 elsewhere) and torch.compile.
VARIANTS = (("whole", 0, False, False), ("window", 128, False, False), ("window, bf16, compiled", 128, True, True))
#: The whole-slice side of the kidney-synth recipe: its phantoms' largest 2.5 mm grid, to which every slice pads.
RECIPE_SLICE_SIDE = 208


def _phantoms(folder: Path, cases: int, seed: int) -> Path:
    """A few anatomy phantoms near the model's 2.5 mm grid (made once per folder)."""
    from qnkit.synth import write_dataset

    if not (folder / "kits.json").is_file():
        write_dataset(folder, cases=cases, seed=seed, generator="anatomy", pixel_range=(2.2, 2.6), progress=False)
    return folder


def _settings(crop: int, num_filters: int, amp: bool = False, compile_step: bool = False):
    from qnkit.train.settings import load_settings

    settings = load_settings("shipped")
    settings.set("TRAINING", "crop_size", crop, "bench")
    settings.set("TRAINING", "amp", amp, "bench")
    settings.set("TRAINING", "compile", compile_step, "bench")
    settings.set("NETWORK", "num_filters", num_filters, "bench")
    settings.set("COMMON", "progress", False, "bench")
    settings.set("TRAINING", "log_images", 0, "bench")
    settings.validate("bench")
    return settings


def _flops_per_slice(model, shape: tuple) -> float:
    """FLOPs of one forward + backward pass per slice of a micro-batch of `shape` (N, C, H, W), counted on one
    slice (they are linear in the batch; the counter itself is slow)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand((1, *shape[1:]))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run(*, slices: int = 64, repeats: int = 3, cases: int = 2, num_filters: int = 16, workdir: Path | None = None,
        variants=VARIANTS, whole_side: int = RECIPE_SLICE_SIDE, data: Path | None = None,
        loader_workers: int | None = None, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Time each variant's training loop on the same phantoms; per-slice seconds, slices/s, GFLOP/s and the
    speed-up of each variant over the first (whole slices, padded to `whole_side` as in the recipe, or to
    the phantoms' largest grid where that is larger), measured side by side in this run. `data`: a KiTS19-layout
    folder to use instead of `cases` anatomy phantoms made in `workdir`; `loader_workers`: DataLoader processes
    (default: the recipe's)."""
    import time

    import torch

    from qnkit.train import data as D
    from qnkit.train import distributed as dist
    from qnkit.train.checkpoint import build_model
    from qnkit.train.dataset import SliceDataset
    from qnkit.train.runner import network_config, training_view
    from qnkit.train.solver import EpochSubsetSampler, Solver, describe_step, seed_everything

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qnkit-bench-train-"))
    progress("training rows: phantoms")
    data = Path(data) if data is not None else _phantoms(workdir / "train-phantoms", cases, seed=0)
    base = _settings(0, num_filters)
    found = D.discover_cases(data)
    params = D.PreprocessParams.from_settings(base.data, float(base.data.pixel_spacing_mm))
    entries = list(D.build_cache(found, params, workdir / "train-cache").values())
    largest = max(max(e.stats["model_shape"][1:]) for e in entries)
    pad = max(int(whole_side), -(-largest // base.data.pad_multiple) * base.data.pad_multiple)
    loops = []
    for name, crop, amp, compile_step in variants:
        settings = _settings(crop, num_filters, amp, compile_step)
        t = settings.training
        seed_everything(0)
        model = build_model(network_config(settings).to_dict())
        dataset = SliceDataset(entries, pad, "coverage", augment=training_view(t))
        solver = Solver(model, settings, device=torch.device("cpu"), info=dist.DistInfo(), run_dir=workdir / name,
                        meta={})
        sampler = EpochSubsetSampler(len(dataset), slices, seed=0)
        workers = settings.common.num_workers if loader_workers is None else loader_workers
        # one loader process for all the timings (the recipe's restarts each epoch, once per 3,200 windows; here
        # that start-up would be timed once per `slices`)
        loader = torch.utils.data.DataLoader(dataset, batch_size=t.micro_batch, sampler=sampler, num_workers=workers,
                                             persistent_workers=workers > 0)
        side = tuple(dataset[0][0].shape[-2:])
        loops.append({"name": name, "crop": crop, "precision": describe_step(solver),
                      "solver": solver, "sampler": sampler, "loader": loader,
                      "side": side, "micro_batch": t.micro_batch, "workers": workers, "times": [],
                      "flops": _flops_per_slice(model, (t.micro_batch, model.config.num_channels, *side))})
    # the variants take turns, repeat by repeat, so that anything else on the cores weighs on each alike
    for epoch in range(repeats + 1):  # the first is the warm-up
        for loop in loops:
            progress(f"training rows: {loop['name']} {epoch}/{repeats}")
            loop["sampler"].set_epoch(epoch)
            begin = time.perf_counter()
            loop["solver"].train_epoch(loop["loader"], len(entries), epoch)
            if epoch:
                loop["times"].append(time.perf_counter() - begin)
    rows = []
    for loop in loops:
        times, flops = loop["times"], loop["flops"]
        seconds = sorted(times)[len(times) // 2] / slices
        rows.append({"variant": loop["name"], "crop_size": loop["crop"] or None, "step": loop["precision"],
                     "slice_shape": list(loop["side"]),
                     "micro_batch": loop["micro_batch"], "loader_workers": loop["workers"],
                     "seconds_per_slice": seconds, "best_seconds_per_slice": min(times) / slices,
                     "slices_per_s": 1.0 / seconds, "gflop_per_slice": flops / 1e9,
                     "gflop_per_s": flops / 1e9 / seconds, "timings_s": times})
    baseline, best = rows[0]["seconds_per_slice"], rows[0]["best_seconds_per_slice"]
    for row in rows:
        row["speedup_per_slice"] = baseline / row["seconds_per_slice"]
        row["best_speedup_per_slice"] = best / row["best_seconds_per_slice"]  # the fastest repeat of each
    return {"slices_per_timing": slices, "repeats": repeats, "num_filters": num_filters,
            "threads": torch.get_num_threads(), "cases": cases, "rows": rows}
