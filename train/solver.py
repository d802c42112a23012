"""The training loop (the report's Solver): loss, Adam + StepLR (or poly), gradient accumulation, validation,
early stopping, best/last checkpoints, and exact resume.

Determinism: every epoch reseeds python/numpy/torch from (seed, epoch, rank) and the sampler is a
DistributedSampler (also with one process) whose permutation depends only on (seed, epoch), so an
epoch computes the same thing whether the run was interrupted before it or not. The RNG states are
still saved in the last checkpoint and restored on resume, as a second line of defence.

Gradient accumulation: micro-batches of `micro_batch` slices are accumulated into one optimiser step
of about `effective_batch` slices counted over all ranks; each micro-loss is divided by the size of
its group, and under DDP the all-reduce runs only on the last micro-step of a group (`no_sync`).

Metrics per epoch: training loss/Dice are running values over the epoch's micro-batches (Dice per
volume from accumulated voxel counts, averaged over volumes); validation loss is the mean over
slices and validation Dice is per volume on the half-resolution grid, averaged over volumes.
"""
from __future__ import annotations

import contextlib
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from qnkit.train import checkpoint as ckpt
from qnkit.train import distributed as dist
from qnkit.train.losses import CombinedLoss
from qnkit.train.tb_logging import Logger, panel


class EpochSubsetSampler(torch.utils.data.Sampler):
    """`per_epoch` slices each epoch, drawn afresh from (seed, epoch) only and shared out over ranks.

    Fewer than the data set: a random subset, for data sets far larger than what one epoch can afford
    (phantoms are cheap to multiply). More: whole shuffled passes and then a subset, so that a small
    data set still gives an epoch enough optimiser steps. Every slice is seen as evenly as the count allows.
    """

    def __init__(self, size: int, per_epoch: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.size, self.per_epoch = int(size), int(per_epoch)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        passes = -(-self.per_epoch // self.size)
        picked = torch.cat([torch.randperm(self.size, generator=g) for _ in range(passes)])[: self.per_epoch]
        return iter(picked[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.per_epoch, self.num_replicas))


def slices_per_epoch(t, available: int) -> int:
    """Training slices per epoch: [TRAINING] slices_per_epoch (0: all), raised to min_steps_per_epoch
    optimiser steps of effective_batch slices."""
    chosen = t.slices_per_epoch or available
    return max(chosen, t.min_steps_per_epoch * t.effective_batch) if available else 0


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed python, numpy and torch from (seed, epoch, rank)."""
    import random

    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def volume_dice(counts: np.ndarray, smooth: float = 1.0) -> np.ndarray:
    """Per-volume Dice from rows (intersection, predicted, target) voxel counts."""
    inter, pred, target = counts[:, 0], counts[:, 1], counts[:, 2]
    return (2.0 * inter + smooth) / (pred + target + smooth)


def _counts(pred: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(N, 3) per-slice (intersection, predicted, target) counts, ignoring padding (weight 0)."""
    valid = w > 0
    p, t = pred & valid, (y >= 0.5) & valid  # a soft target counts where half the block is kidney
    return torch.stack([(p & t).flatten(1).sum(1), p.flatten(1).sum(1), t.flatten(1).sum(1)], 1).double()


SCHEDULE_KEYS = (("TRAINING", "lr"), ("TRAINING", "schedule"), ("TRAINING", "step_size"), ("TRAINING", "gamma"))
#: What a checkpoint written before a schedule key existed was trained with.
_SCHEDULE_BEFORE = {"schedule": "step"}
POLY_EXPONENT = 0.9


class Solver:
    def __init__(self, model: torch.nn.Module, settings, *, device: torch.device, info: dist.DistInfo,
                 run_dir: Path, meta: dict, logger: Logger | None = None, teacher: torch.nn.Module | None = None):
        self.s, self.device, self.info, self.run_dir = settings, device, info, Path(run_dir)
        self.meta = meta  # network / preprocessing / data description stored in every checkpoint
        self.net = model.to(device)
        t = settings.training
        self.opt = torch.optim.Adam(self.net.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                    weight_decay=t.weight_decay)
        self._schedule_start = 0  # the epoch the learning-rate schedule (re)started at
        self.sched = self._scheduler()
        self.amp_dtype = amp_dtype(bool(t.amp), device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = CombinedLoss(t.alpha, t.beta)
        self.accum = max(1, round(t.effective_batch / (t.micro_batch * info.world_size)))
        self.logger = logger or Logger(run_dir, enabled=False)
        self.loop = {"epoch": 0, "best_dice": -1.0, "best_epoch": 0, "prev_val_loss": None, "rises": 0,
                     "stopped_early": False}
        self.model = self.net
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        # [TRAINING] qat_teacher: the FP32 network whose sigmoid is the target (frozen, evaluation mode, FP32)
        self.teacher = teacher.to(device).eval().requires_grad_(False) if teacher is not None else None
        if t.qat:  # before compiling: the step traces the fake-quantised convolutions
            from qnkit.train.qat import quantisation_aware

            quantisation_aware(self.net)
        # the training step's network; checkpoints and validation use self.net, the module itself
        self.step_model = torch.compile(self.model) if t.compile else self.model

    @property
    def amp(self) -> bool:
        """Whether the step runs under autocast ([TRAINING] amp where this device and CPU allow it)."""
        return self.amp_dtype is not None

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(), "loop": dict(self.loop),
                "sampler_epoch": self.loop["epoch"]}

    def resume_from(self, folder: Path) -> bool:
        """Restore weights, optimiser, scheduler, scaler, RNG and loop state from a last checkpoint;
        True when the settings' schedule differs from the checkpoint's and was restarted here."""
        ckpt.load_weights(folder, self.net)
        state = ckpt.load_state(folder)
        self.opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.loop.update(state["loop"])
        saved = ckpt.read_meta(folder).get("settings", {}).get("TRAINING", {})
        now = self.s.to_dict()["TRAINING"]
        restart = any(saved.get(key, _SCHEDULE_BEFORE.get(key)) != now[key] for _, key in SCHEDULE_KEYS)
        if restart:
            self._restart_schedule()
        else:
            restarts = self.loop.get("restarts") or [{"epoch": 0}]
            self._schedule_start = int(restarts[-1]["epoch"])
            self.sched.load_state_dict(state["scheduler"])
            if self.s.training.schedule == "poly":  # --epochs may have moved the decay's end: this epoch's lr
                for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
                    group["lr"] = base * self._poly_factor(self.sched.last_epoch)
        return restart

    def _scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """[TRAINING] schedule from [TRAINING] lr, counted from the epoch it (re)started at."""
        t = self.s.training
        if t.schedule == "poly":
            return torch.optim.lr_scheduler.LambdaLR(self.opt, self._poly_factor)
        return torch.optim.lr_scheduler.StepLR(self.opt, step_size=t.step_size, gamma=t.gamma)

    def _poly_factor(self, step: int) -> float:
        """(1 - step / span)^0.9, span = the epochs from the schedule's start to the run's last (read
        when used, so that --resume --epochs N stretches the decay to the new end)."""
        span = max(1, self.s.training.epochs - self._schedule_start)
        return max(0.0, 1.0 - step / span) ** POLY_EXPONENT

    def _restart_schedule(self) -> None:
        """A warm restart: the learning-rate schedule starts again from [TRAINING] lr at this epoch.

        Resuming with another lr, schedule, step_size or gamma than the checkpoint's continues the weights
        and Adam's moments but not the old decay, so a run can be trained on for longer than first planned.
        """
        t = self.s.training
        for group in self.opt.param_groups:
            group["lr"] = group["initial_lr"] = t.lr
        self._schedule_start = self.loop["epoch"]
        self.sched = self._scheduler()
        restarts = list(self.loop.get("restarts", []))
        restarts.append({"epoch": self.loop["epoch"], "lr": t.lr, "schedule": t.schedule, "step_size": t.step_size,
                         "gamma": t.gamma})
        self.loop["restarts"] = restarts

    def _save(self, kind: str, record: dict) -> None:
        if self.info.is_main:
            meta = {**self.meta, "epoch": self.loop["epoch"], "metrics": record, "settings": self.s.to_dict()}
            ckpt.save(self.run_dir, kind, self.net, meta, self.state() if kind == "last" else None)

    # ---------------------------------------------------------------- loop
    def fit(self, train_ds, val_ds, console=None, reference_ds=None) -> dict:
        """Train to [TRAINING] epochs (or an early stop); `reference_ds`, a fixed held-out set scored after
        every epoch beside the validation split, so that runs on other data compare on the same cases."""
        s, info = self.s, self.info
        per_epoch = slices_per_epoch(s.training, len(train_ds))
        if per_epoch != len(train_ds):
            sampler = EpochSubsetSampler(len(train_ds), per_epoch, num_replicas=info.world_size,
                                         rank=info.rank, seed=s.common.seed)
        else:
            sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                         seed=s.common.seed, drop_last=False)
        loader = DataLoader(train_ds, batch_size=s.training.micro_batch, sampler=sampler,
                            num_workers=s.common.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        while self.loop["epoch"] < s.training.epochs and not self.loop["stopped_early"]:
            epoch = self.loop["epoch"] + 1
            started, cpu_started = time.perf_counter(), cpu_seconds()
            seed_everything(s.common.seed, epoch, info.rank)
            sampler.set_epoch(epoch)
            train = self.train_epoch(loader, len(train_ds.entries), epoch, console)
            val = self.validate(val_ds, epoch)
            # the reference set measures the run, it is not part of it: its time is kept apart
            reference_started, reference_cpu_started = time.perf_counter(), cpu_seconds()
            due = epoch % s.eval.reference_every == 0 or epoch == s.training.epochs
            reference = self.validate(reference_ds, epoch) if reference_ds is not None and due else None
            reference_s, reference_cpu = time.perf_counter() - reference_started, cpu_seconds() - reference_cpu_started
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step()
            self._early_stopping(val["loss"])
            improved = val["dice"] > self.loop["best_dice"]
            if improved:
                self.loop["best_dice"], self.loop["best_epoch"] = val["dice"], epoch
            self.loop["epoch"] = epoch
            seconds = time.perf_counter() - started - reference_s
            cpu = cpu_seconds() - cpu_started - reference_cpu
            # CPU time of this process and its finished children (data loader workers), all ranks of this
            # machine alike: the cost of the run whatever else shared the cores
            self.loop["cpu_hours"] = self.loop.get("cpu_hours", 0.0) + cpu * info.world_size / 3600
            self.loop["wall_hours"] = self.loop.get("wall_hours", 0.0) + seconds / 3600
            record = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_dice": train["dice"],
                      "val_loss": val["loss"], "val_dice": val["dice"], "best_val_dice": self.loop["best_dice"],
                      "best_epoch": self.loop["best_epoch"], "rises": self.loop["rises"],
                      "stopped_early": self.loop["stopped_early"],
                      "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 1), "step": describe_step(self),
                      "cpu_hours": round(self.loop["cpu_hours"], 4), "wall_hours": round(self.loop["wall_hours"], 4),
                      "train_slice_side": s.training.crop_size or None}
            if reference is not None:
                record.update(reference_loss=reference["loss"], reference_dice=reference["dice"],
                              reference_seconds=round(reference_s, 1))
            self._log_epoch(epoch, train, val, lr, reference)
            self.logger.epoch_record(record)
            if improved:
                self._save("best", record)
            self._save("last", record)
            if console is not None and info.is_main:
                ref = f" | reference dice {reference['dice']:.4f}" if reference is not None else ""
                console.print(f"epoch {epoch}: train loss {train['loss']:.4f} dice {train['dice']:.4f} | "
                              f"val loss {val['loss']:.4f} dice {val['dice']:.4f}{ref}"
                              f"{'  (best)' if improved else ''}")
        return dict(self.loop)

    def _early_stopping(self, val_loss: float) -> None:
        """Stop when the validation loss rose for more than `early_stop_patience` epochs in a row."""
        prev = self.loop["prev_val_loss"]
        self.loop["rises"] = self.loop["rises"] + 1 if prev is not None and val_loss > prev else 0
        self.loop["prev_val_loss"] = val_loss
        if self.loop["rises"] > self.s.training.early_stop_patience:
            self.loop["stopped_early"] = True

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp)

    def train_epoch(self, loader, num_volumes: int, epoch: int, console=None) -> dict:
        self.model.train()
        n, accum = len(loader), self.accum
        counts = torch.zeros(num_volumes, 3, dtype=torch.float64)
        loss_sum, seen = 0.0, 0
        extremes = _Extremes(self.s.training.log_images if self.info.is_main else 0)
        self.opt.zero_grad(set_to_none=True)
        with _progress(console, self.info.is_main and self.s.common.progress, f"epoch {epoch}", n) as advance:
            for k, (x, y, w, vol) in enumerate(loader):
                x, y, w = (t.to(self.device, non_blocking=True) for t in (x, y, w))
                if self.teacher is not None:
                    with torch.no_grad():
                        y = torch.sigmoid(self.teacher(x).float())
                start = (k // accum) * accum
                group = min(accum, n - start)
                last = k - start == group - 1
                sync = contextlib.nullcontext() if (last or not self.info.enabled) else self.model.no_sync()
                with sync:
                    with self._autocast():
                        logits = self.step_model(x).float()
                    loss = self.loss_fn(logits, y, w)
                    self.scaler.scale(loss / group).backward()
                if last:
                    self.scaler.step(self.opt)
                    self.scaler.update()
                    self.opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    pred = logits.detach() > 0
                    counts.index_add_(0, vol, _counts(pred, y, w).cpu())
                    loss_sum += float(loss) * len(x)
                    seen += len(x)
                    extremes.offer(float(loss), x, y, pred)
                advance()
        counts = torch.tensor(dist.all_reduce_sum(counts.flatten().tolist(), self.device)).view(-1, 3).numpy()
        loss_sum, seen = dist.all_reduce_sum([loss_sum, seen], self.device)
        present = counts.sum(1) > 0  # volumes this epoch's slices came from
        dice = float(volume_dice(counts[present]).mean()) if present.any() else float("nan")
        return {"loss": loss_sum / max(seen, 1), "dice": dice, "extremes": extremes}

    @torch.no_grad()
    def validate(self, val_ds, epoch: int) -> dict:
        """Validation loss (mean over slices) and per-volume Dice averaged over volumes (half-res grid).

        Volumes are shared round-robin between ranks; sums are all-reduced.
        """
        self.net.eval()
        bs = self.s.eval.batch_size
        extremes = _Extremes(self.s.training.log_images if self.info.is_main else 0)
        dice_sum, n_vol, loss_sum, seen = 0.0, 0, 0.0, 0
        for v in range(self.info.rank, len(val_ds.entries), self.info.world_size):
            counts = torch.zeros(3, dtype=torch.float64)
            idx = val_ds.volume_slices(v)
            for start in range(idx.start, idx.stop, bs):
                items = [val_ds[i] for i in range(start, min(start + bs, idx.stop))]
                x, y, w = (torch.stack([it[j] for it in items]).to(self.device) for j in range(3))
                with self._autocast() if self.amp_dtype == torch.float16 else contextlib.nullcontext():
                    logits = self.net(x).float()  # bf16 trains; the model is scored in FP32, as it ships
                loss = float(self.loss_fn(logits, y, w))
                pred = logits > 0
                counts += _counts(pred, y, w).sum(0).cpu()
                loss_sum += loss * len(x)
                seen += len(x)
                extremes.offer(loss, x, y, pred)
            dice_sum += float(volume_dice(counts.numpy()[None])[0])
            n_vol += 1
        dice_sum, n_vol, loss_sum, seen = dist.all_reduce_sum([dice_sum, n_vol, loss_sum, seen], self.device)
        return {"loss": loss_sum / max(seen, 1), "dice": dice_sum / max(n_vol, 1), "extremes": extremes}

    def _log_epoch(self, epoch: int, train: dict, val: dict, lr: float, reference: dict | None = None) -> None:
        lg = self.logger
        lg.scalars("train", epoch, {"loss": train["loss"], "dice": train["dice"], "lr": lr})
        lg.scalars("validation", epoch, {"loss": val["loss"], "dice": val["dice"]})
        if reference is not None:
            lg.scalars("validation", epoch, {"reference_loss": reference["loss"], "reference_dice": reference["dice"]})
        for writer, stats in (("train", train), ("validation", val)):
            ex = stats["extremes"]
            lg.images(writer, "best_batch", epoch, ex.best)
            lg.images(writer, "worst_batch", epoch, ex.worst)
        lg.flush()


class _Extremes:
    """Keeps image panels of the lowest- and highest-loss batches (input | label | prediction)."""

    def __init__(self, count: int):
        self.count = count
        self.best = self.worst = None
        self.lo, self.hi = math.inf, -math.inf

    def offer(self, loss: float, x, y, pred) -> None:
        if self.count <= 0:
            return
        if loss < self.lo:
            self.lo, self.best = loss, panel(x, y, pred.float(), self.count)
        if loss > self.hi:
            self.hi, self.worst = loss, panel(x, y, pred.float(), self.count)


@contextlib.contextmanager
def _progress(console, enabled: bool, description: str, total: int):
    """A rich progress bar (rank 0 only); yields an `advance()` callable."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def amp_dtype(asked: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of [TRAINING] amp on `device`: float16 on CUDA, bfloat16 on a CPU that has it
    natively (:func:`qnkit.cpus.native_bf16`), None (FP32) otherwise or when not asked."""
    if not asked:
        return None
    if device.type == "cuda":
        return torch.float16
    from qnkit.cpus import native_bf16

    return torch.bfloat16 if device.type == "cpu" and native_bf16()[0] else None


def describe_step(solver) -> str:
    """'bf16 autocast (AVX512-BF16), torch.compile' / 'FP32 (amp: no AVX512-BF16 ...)': how the step runs."""
    from qnkit.cpus import native_bf16

    t = solver.s.training
    if solver.amp_dtype is not None:
        why = native_bf16()[1] if solver.device.type == "cpu" else "CUDA"
        precision = f"{str(solver.amp_dtype).removeprefix('torch.')} autocast ({why})"
    elif t.amp:
        precision = f"FP32 (amp asked: {native_bf16()[1]})" if solver.device.type == "cpu" else "FP32"
    else:
        precision = "FP32"
    return (precision + (", torch.compile" if t.compile else "")
            + (", quantisation-aware (INT8 convolutions)" if t.qat else "")
            + (", towards the FP32 network's own output" if solver.teacher is not None else ""))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


