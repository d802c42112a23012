"""Training logs: TensorBoard writers for train / validation / evaluation plus RUN_DIR/metrics.jsonl.

As in the report's Logger, each writer gets the mean loss and mean Dice per epoch (step = epoch
number, 1-based) and images of the best and worst batch (input | label | prediction side by side).
Only rank 0 logs; other ranks get a disabled logger. On resume the writers purge events from epochs
after the checkpoint, and metrics.jsonl drops its lines for them, so logs match an uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WRITERS = ("train", "validation", "evaluation")


def tensorboard_dir(run_dir: Path, log_dir: str = "") -> Path:
    return Path(run_dir) / (log_dir or "tensorboard")


def panel(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, count: int) -> torch.Tensor:
    """(n, 1, h, 3w) in [0, 1]: input | label | prediction for the first `count` slices (of a 2.5-D model's
    input planes the centre one, the slice itself)."""
    n = min(count, image.shape[0])
    centre = image.shape[1] // 2
    parts = [t[:n].detach().float().cpu().clamp(0, 1) for t in (image[:, centre:centre + 1], label, pred)]
    return torch.cat(parts, dim=3)


class Logger:
    def __init__(self, run_dir: Path, *, log_dir: str = "", enabled: bool = True, purge_after: int | None = None,
                 writers=WRITERS):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.writers = {}
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        root = tensorboard_dir(self.run_dir, log_dir)
        purge = None if purge_after is None else purge_after + 1
        for name in writers:
            self.writers[name] = SummaryWriter(str(root / name), purge_step=purge)
        if purge_after is not None:
            self._truncate_metrics(purge_after)

    def _truncate_metrics(self, last_epoch: int) -> None:
        if not self.metrics_path.is_file():
            return
        from qnkit._atomic import write_text_atomic

        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] <= last_epoch:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
        write_text_atomic(self.metrics_path, "".join(f"{line}\n" for line in keep))

    def scalars(self, writer: str, step: int, values: dict) -> None:
        if self.enabled:
            for key, value in values.items():
                self.writers[writer].add_scalar(key, value, step)

    def images(self, writer: str, tag: str, step: int, grid: torch.Tensor) -> None:
        if self.enabled and grid is not None and grid.numel():
            self.writers[writer].add_images(tag, grid, step, dataformats="NCHW")

    def text(self, writer: str, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writers[writer].add_text(tag, text, step)

    def epoch_record(self, record: dict) -> None:
        """Append one JSON line per epoch to metrics.jsonl (flushed, so a kill loses at most this line)."""
        if self.enabled:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            self.flush()

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}
