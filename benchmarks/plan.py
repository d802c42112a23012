"""What one `qnkit bench` run measures: the sizes, batch sizes and repeats of each mode.

- ``quick``: a smoke run on small volumes and a tiny network (the tests use it);
- ``default``: every section and every performance target on the full-size network, sized to
  finish within 10 minutes and 4 GB on a 2-core machine. The backend rows stop at batch 4 (eager
  FP32 holds about 0.4 GB per slice of a batch: batch 32 alone held 12.5 GB), so do the export
  checks of the random-weight bundle, whose FP16 graph (the GPU's) is made and timed only on a GPU
  machine; the kernels run on a 48-slice volume, enough for every
  thread count to get whole slices. The end-to-end section runs the shipped model on the whole CT
  (default path against eager FP32 on every slice, once each after a warm-up batch, at qnkit
  segment's batch 16) and a 1,000-slice CT for peak memory;
- ``full``: the complete sweep (batch 1 to 32, 100-slice kernel volume, more repeats, three end-to-end runs
  of each path).

The JSON report records the mode, so that figures of different modes are never compared unknowingly.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("quick", "default", "full")


@dataclass(frozen=True)
class BenchPlan:
    mode: str
    kernel_shape: tuple[int, int, int]
    kernel_repeats: int
    numpy_repeats: int
    batch_sizes: tuple[int, ...]
    backend_repeats: int
    e2e_size: int
    e2e_slices: int
    e2e_repeats: int
    e2e_batch: int  # slices per inference batch of the end-to-end run (both paths; qnkit segment's default is 16)
    e2e_whole_ct: bool  # the whole CT (512 x 512 x >= 300, 0.7 mm), else a small phantom
    e2e_memory_slices: int  # also segment a CT this long for its peak memory (0: not)
    io_shape: tuple[int, int, int]  # (slices, rows, cols) of the CT and mask written and read back
    io_repeats: int


PLANS = {
    "quick": BenchPlan("quick", kernel_shape=(8, 128, 128), kernel_repeats=2, numpy_repeats=1, batch_sizes=(1, 4),
                       backend_repeats=2, e2e_size=128, e2e_slices=24, e2e_repeats=1, e2e_batch=4,
                       e2e_whole_ct=False, e2e_memory_slices=0, io_shape=(24, 128, 128),
                       io_repeats=1),
    "default": BenchPlan("default", kernel_shape=(48, 512, 512), kernel_repeats=5, numpy_repeats=2,
                         batch_sizes=(1, 4), backend_repeats=3, e2e_size=512, e2e_slices=100, e2e_repeats=1,
                         e2e_batch=16, e2e_whole_ct=True, e2e_memory_slices=1000, io_shape=(300, 512, 512),
                         io_repeats=3),
    "full": BenchPlan("full", kernel_shape=(100, 512, 512), kernel_repeats=7, numpy_repeats=3,
                      batch_sizes=(1, 4, 16, 32), backend_repeats=3, e2e_size=512, e2e_slices=100, e2e_repeats=3,
                      e2e_batch=16, e2e_whole_ct=True, e2e_memory_slices=1000, io_shape=(300, 512, 512),
                      io_repeats=5),
}
