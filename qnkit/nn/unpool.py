"""Export-friendly max pooling / max unpooling for non-overlapping k x k windows.

``nn.MaxPool2d(return_indices=True)`` + ``nn.MaxUnpool2d`` export to ONNX
``MaxPool`` (with an ``Indices`` output) and ``MaxUnpool`` / ``ScatterND``,
which TensorRT parses badly (and not at all in FP16).  The unpooling, however,
needs no indices: it only has to know, per window of the *pre-pool* tensor
``x``, which position held the maximum.  The functions here recompute that
from ``x`` with plain operators (strided ``Slice``, ``Max``, ``Equal``,
``And``/``Or``/``Not``, ``Where``, ``Concat``/``Reshape``) and give exactly the
result of the native pair, including its choice among tied maxima: PyTorch's
``max_pool2d`` keeps the FIRST maximum in row-major order within the window
(checked on CPU for float64/32/16 and bfloat16, contiguous and channels-last;
the CUDA kernels use the same ``val > max`` rule).

Only NaN-free inputs are supported: with a NaN in a window the native pooling
returns NaN and points at the NaN, while the mask form puts the decoder value at
the window's last position.  Windows must tile the input exactly (H and W
divisible by ``k``).
"""
from __future__ import annotations

from functools import reduce

import torch

__all__ = ["is_tracing", "window_max", "first_max_masks", "unpool_masked", "mask_unpool2d",
           "MaskMaxPool2d", "MaskMaxUnpool2d"]


def is_tracing() -> bool:
    """True while tracing/compiling/exporting (shape checks are skipped then)."""
    compiler = getattr(torch, "compiler", None)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or getattr(compiler, "is_compiling", lambda: False)()
                or getattr(compiler, "is_exporting", lambda: False)())


def _windows(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Space-to-depth: the k*k strided views of ``x``, in row-major window order."""
    if not is_tracing():
        if x.dim() != 4 or x.shape[2] % k or x.shape[3] % k:
            raise ValueError(
                f"expected (N, C, H, W) with H, W divisible by {k}, got {tuple(x.shape)}")
    return [x[:, :, i::k, j::k] for i in range(k) for j in range(k)]


def window_max(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Max over non-overlapping k x k windows; equals ``F.max_pool2d(x, k, k)``."""
    return reduce(torch.maximum, _windows(x, k))


def first_max_masks(x: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Window max of ``x`` and k*k boolean one-hot masks (N, C, H/k, W/k) marking,
    per window, the first position (row-major) that holds the maximum."""
    parts = _windows(x, k)
    m = reduce(torch.maximum, parts)
    masks: list[torch.Tensor] = []
    found = None
    for p in parts[:-1]:
        hit = p == m
        if found is not None:
            hit = hit & ~found
        found = hit if found is None else found | hit
        masks.append(hit)
    masks.append(~found if found is not None else torch.ones_like(m, dtype=torch.bool))
    return m, masks


def unpool_masked(u: torch.Tensor, masks: list[torch.Tensor], k: int = 2) -> torch.Tensor:
    """Place ``u`` (N, C, h, w) at the positions marked by ``masks`` (from
    :func:`first_max_masks`), zeros elsewhere -> (N, C, h*k, w*k)."""
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    ys = [torch.where(mk, u, zero) for mk in masks]
    # depth-to-space without Transpose: interleave columns per window row, then rows.
    rows = [torch.stack(ys[i * k:(i + 1) * k], dim=-1).flatten(-2) for i in range(k)]
    return torch.stack(rows, dim=3).flatten(2, 3)


def mask_unpool2d(u: torch.Tensor, x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Max-unpool ``u`` (N, C, H/k, W/k) into the argmax positions of ``x`` (N, C, H, W).

    Same result as ``F.max_unpool2d(u, idx, k, k, output_size=x.shape[-2:])`` with
    ``_, idx = F.max_pool2d(x, k, k, return_indices=True)``; zeros elsewhere.
    """
    return unpool_masked(u, first_max_masks(x, k)[1], k)


class MaskMaxPool2d(torch.nn.Module):
    """Drop-in for ``nn.MaxPool2d(k, k)`` (no indices) built from ``Slice``/``Max``."""

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        self.kernel_size = int(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_max(x, self.kernel_size)


class MaskMaxUnpool2d(torch.nn.Module):
    """Max unpooling driven by the pre-pool tensor instead of indices.

    ``forward(u, x)`` == ``nn.MaxUnpool2d(k, k)(u, indices_of_maxpool(x))`` for NaN-free ``x``.
    """

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        self.kernel_size = int(kernel_size)

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return mask_unpool2d(u, x, self.kernel_size)
