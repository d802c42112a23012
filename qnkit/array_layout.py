"""Copy a 3-D array into C or Fortran order in cache-sized tiles.

NIfTI stores voxels in Fortran order and qnkit works in C order, so every read and write of a
volume whose file has its slices first (KiTS19's layout) transposes it. NumPy's own transposing copy
walks one side of it with a stride of a whole slice and runs 3-4x slower than tiles. A copy that keeps
its dtype goes through the compiled kernel (:func:`qnkit.kernels.copy_transposed`, on every thread);
one that casts goes through NumPy tile by tile. A plain copy is the floor.
"""
from __future__ import annotations

import itertools

import numpy as np

from qnkit.kernels import copy_transposed, fastest_axis

__all__ = ["copy_in_order", "copy_into"]

#: Tile edge along the fastest-varying axis of the source and of the destination (one or more
#: cache lines), and along the other axes (keeps a tile inside L2).
FAST_EDGE, SLOW_EDGE = 64, 8


def copy_in_order(array: np.ndarray, order: str = "C", dtype=None) -> np.ndarray:
    """A new ``order`` ("C" or "F") contiguous copy of ``array``, cast to ``dtype`` when given.

    Arrays that are not 3-D, or whose fastest axis is already the destination's, are copied by
    NumPy directly (no transposition, so nothing to tile).
    """
    array = np.asanyarray(array)
    return copy_into(np.empty(array.shape, dtype=dtype or array.dtype, order=order), array)


def copy_into(out: np.ndarray, array: np.ndarray) -> np.ndarray:
    """``out[...] = array`` (same shape, any strides: e.g. a reoriented view of a volume being filled
    block by block), tiled as :func:`copy_in_order` where the two walk different fastest axes; returns `out`."""
    array = np.asanyarray(array)
    if out.shape != array.shape:
        raise ValueError(f"cannot copy an array of shape {array.shape} into one of shape {out.shape}")
    if array.ndim != 3 or array.size == 0:
        out[...] = array
        return out
    source_fast, target_fast = fastest_axis(array), fastest_axis(out)
    if source_fast == target_fast:
        out[...] = array
        return out
    if out.dtype == array.dtype or (array.dtype == np.bool_ and out.dtype == np.uint8):
        if out.dtype.kind in "biuf" and out.dtype.itemsize in (1, 2, 4, 8) and not np.may_share_memory(out, array):
            return copy_transposed(out, array)
    edges = [FAST_EDGE if axis in (source_fast, target_fast) else SLOW_EDGE for axis in range(3)]
    starts = [range(0, n, edge) for n, edge in zip(array.shape, edges)]
    for corner in itertools.product(*starts):
        tile = tuple(slice(s, s + edge) for s, edge in zip(corner, edges))
        out[tile] = array[tile]
    return out

