"""Map-style slice dataset over the preprocessed `.npy` cache (the report's NiftiData).

`__len__` is the total number of slices; `__getitem__(i)` finds the volume with a bisect over the
cumulative slice counts and reads just that slice through `np.load(..., mmap_mode='r')`, so memory
stays flat however many volumes there are. Slices are zero-padded to a multiple of 16 exactly as
`qnkit.inference` pads at prediction time; padded pixels get loss weight 0.

A 2.5-D model's image is its C context planes (:func:`qnkit.inference.context_planes`, the function
inference uses, on the cached image: already windowed and on the model grid, as inference interpolates
them); the cache keeps the slices the planes reach beyond the labelled range, so a plane past the
volume's end replicates its end slice here as at inference. Labels and weights are the slice's own.
"""
from __future__ import annotations

import bisect

import numpy as np
import torch
from torch.utils.data import Dataset

from qnkit.inference import context_planes, pad_slices


class SliceDataset(Dataset):
    """Slices of several cached volumes. Items: (image (C,h,w), label (1,h,w), weight (1,h,w), volume index);
    C = 1, or a 2.5-D model's planes per slice (`context` = (C, mm): :func:`qnkit.inference.model_context`)."""

    def __init__(self, entries: list, pad_multiple: int = 16, target: str = "coverage", augment=None,
                 context=(1, None)):
        if target not in ("coverage", "labels"):
            raise ValueError(f"target must be coverage or labels, got {target!r}")
        self.entries = list(entries)
        self.pad_multiple = pad_multiple
        self.target = target  # soft kidney fraction per 2x2 block, or the binary half-resolution mask
        self.augment = augment  # callable (x, y, w) -> (x, y, w) applied to each padded slice, or None
        self.context = (int(context[0]), context[1])
        counts = [int(e.num_slices) for e in self.entries]
        self.offsets = np.cumsum([0] + counts).tolist()  # offsets[v] = first global index of volume v
        self._maps: dict[int, tuple] = {}  # opened lazily, per process (DataLoader workers included)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Global slice index -> (volume index, slice index within the volume)."""
        if not 0 <= index < len(self):
            raise IndexError(f"slice index {index} out of range [0, {len(self)})")
        volume = bisect.bisect_right(self.offsets, index) - 1
        return volume, index - self.offsets[volume]

    def _arrays(self, volume: int) -> tuple:
        maps = self._maps.get(volume)
        if maps is None:
            entry = self.entries[volume]
            maps = tuple(np.load(entry.path(name), mmap_mode="r") for name in ("image", self.target, "weights"))
            self._maps[volume] = maps
        return maps

    def __getitem__(self, index: int):
        volume, z = self.locate(int(index))
        _, labels, weights = self._arrays(volume)
        m = self.pad_multiple
        y, w = (torch.from_numpy(pad_slices(np.array(a[z], dtype=np.float32), m))[None]
                for a in (labels, weights))  # np.array copies out of the read-only map
        x = torch.from_numpy(pad_slices(self.image(volume, z), m))
        if self.augment is not None:
            x, y, w = self.augment(x, y, w)
        return x, y, w, volume

    def image(self, volume: int, z: int) -> np.ndarray:
        """float32 (C, h, w), unpadded: slice `z` of volume `volume` (C = 1), or its context planes."""
        image = self._arrays(volume)[0]
        channels, context_mm = self.context
        if channels == 1:
            return np.array(image[z], dtype=np.float32)[None]
        entry = self.entries[volume]
        reach = entry.stats.get("image_slice_range")
        if reach is None:
            raise ValueError(f"cache entry {entry.case_id} was built without the slices that context planes "
                             f"reach (no image_slice_range): rebuild the cache with the model's context")
        offset = entry.slice_range[0] - reach[0]  # cached image slices before the first labelled one
        return context_planes(image, np.array([z + offset]), float(entry.stats["spacing_mm"][0]), channels,
                              context_mm)[0]

    def __getstate__(self):  # memory maps are not sent to worker processes; they reopen them
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def volume_slices(self, volume: int) -> range:
        return range(self.offsets[volume], self.offsets[volume + 1])
