"""The one small interface every inference backend implements, and the batching they share.

A backend maps preprocessed slices, float32 ``(N, C, h, w)`` in [0, 1] (C = ``channels``: 1, or a
2.5-D model's context planes per slice), to float32 kidney probabilities ``(N, 1, h, w)``.
:meth:`Backend.predict` accepts any ``N`` and any ``h, w``
that are multiples of the bundle's size divisor: it checks the input, zero-pads ``h, w`` up to
a fixed-size model's grid (bottom/right, as :mod:`qnkit.inference` pads), splits ``N`` into
chunks of ``batch_size`` (padding the last chunk when the backend needs a fixed batch, e.g.
CUDA graphs), calls :meth:`Backend._run` per chunk and crops the result back. A backend whose
``concurrent_runs`` exceeds 1 has that many chunks in :meth:`Backend._run` at once, each on its own
thread (ONNX Runtime on the CPU: single-threaded calls side by side beat one call's threads
working together on a small network's many small operators).
"""
from __future__ import annotations

import abc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qnkit.errors import QnkitInputError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class Backend(abc.ABC):
    """Base class: subclasses set the attributes and implement :meth:`_run` on one chunk."""

    name: str = "?"
    precision: str = "fp32"
    device: str = "cpu"
    batch_size: int = 16
    size_divisor: int = 16
    channels: int = 1  # input planes per slice (the network's num_channels)
    fixed_hw: tuple[int, int] | None = None  # a model that only runs on this grid (inputs are padded to it)
    fixed_batch: bool = False  # pad the last chunk to batch_size (static shapes, CUDA graphs)
    max_run_slices: int | None = None  # most slices per _run call, whatever the batch size
    concurrent_runs: int = 1  # _run calls in flight at once, each on its own thread (_run must be thread-safe)
    _pool: ThreadPoolExecutor | None = None

    @abc.abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (n, 1, H, W) for one contiguous float32 chunk (n <= batch_size, channels, H, W)."""

    @property
    def slices_per_call(self) -> int:
        """Slices the network runs per call: ``batch_size``, or fewer where the backend caps it
        (``max_run_slices``), which is what a user's --batch-size actually gets."""
        if self.max_run_slices and not self.fixed_batch:
            return min(self.batch_size, self.max_run_slices)
        return self.batch_size

    def describe(self) -> dict:
        return {"name": self.name, "precision": self.precision, "device": self.device,
                "batch_size": self.batch_size, "slices_per_call": self.slices_per_call,
                "concurrent_runs": self.concurrent_runs, **self._details()}

    def _details(self) -> dict:
        return {}

    def close(self) -> None:
        """Release device memory and sessions (the backend is unusable afterwards)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.predict(batch)

    def _run_sampled(self, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Probabilities of one chunk with the Dropout2d masks ``keep`` (n, sites, filters): a backend
        that can draw Monte-Carlo samples (:mod:`qnkit.uncertainty`) overrides this."""
        raise QnkitInputError(f"the {self.name} backend ({getattr(self, 'model_name', 'this graph')}) "
                              f"cannot draw Monte-Carlo dropout samples")

    def predict(self, batch: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """float32 (N, channels, h, w) in [0, 1] -> float32 probabilities (N, 1, h, w).

        ``keep``: float32 (N, sites, filters) Dropout2d masks, one per slice (Monte-Carlo dropout,
        :meth:`_run_sampled`); None runs the eval-mode network."""
        x = np.asarray(batch)
        if keep is not None:
            keep = np.ascontiguousarray(keep, dtype=np.float32)
            if keep.ndim != 3 or len(keep) != len(x):
                raise ValueError(f"dropout masks must be (N, sites, filters) with N = {len(x)}, got {keep.shape}")
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{self.name} backend expects slices (N, {self.channels}, h, w), got shape {x.shape}")
        n, c, h, w = x.shape
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(f"{self.name} backend needs h and w divisible by {d}, got {h}x{w}")
        hh, ww = h, w
        if self.fixed_hw is not None:
            hh, ww = self.fixed_hw
            if h > hh or w > ww:
                raise QnkitInputError(
                    f"slices of {h}x{w} do not fit the {self.name} model's {hh}x{ww} input grid "
                    f"(use the onnxruntime or torch backend, or re-export with a larger --input-size)")
        out = np.empty((n, 1, h, w), dtype=np.float32)
        bs = self.slices_per_call

        def run_chunk(start: int) -> None:
            chunk = x[start:start + bs]
            m = len(chunk)
            rows = bs if self.fixed_batch else m
            if (rows, hh, ww) != (m, h, w) or chunk.dtype != np.float32 or not chunk.flags.c_contiguous:
                buf = np.zeros((rows, c, hh, ww), dtype=np.float32)
                buf[:m, :, :h, :w] = chunk
                chunk = buf
            if keep is None:
                y = self._run(chunk)
            else:
                part = keep[start:start + m]
                if rows != m:
                    part = np.concatenate([part, np.ones((rows - m, *part.shape[1:]), np.float32)])
                y = self._run_sampled(chunk, part)
            out[start:start + m] = y[:m, :, :h, :w]

        starts = range(0, n, bs)
        if self.concurrent_runs > 1 and len(starts) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrent_runs, thread_name_prefix=f"qnkit-{self.name}")
            for future in [self._pool.submit(run_chunk, start) for start in starts]:
                future.result()
        else:
            for start in starts:
                run_chunk(start)
        return out


def batch_words(asked: int, runs: int, name: str, concurrent: int = 1) -> str:
    """How a backend's batch is echoed: what runs per call (and how many calls at once), and what was
    asked when that differs."""
    words = f"batch {runs}" + (f" x {concurrent} concurrent calls" if concurrent > 1 else "")
    if runs == asked:
        return words
    return f"{words}, not {asked}: {name} runs at most {runs} slice{'s' if runs > 1 else ''} per call here"


def check_precision(precision: str, allowed: tuple[str, ...], kind: str) -> str:
    if precision not in allowed:
        raise QnkitInputError(f"the {kind} backend supports precision {' | '.join(allowed)}, not {precision!r}")
    return precision

