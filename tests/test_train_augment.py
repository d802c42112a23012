"""Training augmentation: geometry moves image, target and weights together; intensity touches the image only."""
from __future__ import annotations

import torch

from qnkit.train.augment import Augment

OFF = dict(p_geometry=0.0, p_intensity=0.0, p_blur=0.0, p_lowres=0.0, p_noise=0.0)


def _slice(h=48, w=64):
    x = torch.zeros(1, h, w)
    y = torch.zeros(1, h, w)
    x[0, 10:22, 30:46] = 0.8
    y[0, 10:22, 30:46] = 1.0
    wt = torch.ones(1, h, w)
    return x, y, wt


def _centroid(t):
    idx = torch.nonzero(t[0] > 0.5).float()
    return idx.mean(0)


def test_all_off_is_identity():
    x, y, w = _slice()
    x2, y2, w2 = Augment(**OFF)(x.clone(), y.clone(), w.clone())
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(w, w2)


def test_geometry_moves_image_and_target_together():
    torch.manual_seed(3)
    aug = Augment(**{**OFF, "p_geometry": 1.0})
    moved = 0
    for _ in range(10):
        x, y, w = _slice()
        x2, y2, w2 = aug(x, y, w)
        assert x2.shape == x.shape and y2.shape == y.shape and w2.shape == w.shape
        cx, cy = _centroid(x2 / 0.8), _centroid(y2)
        assert torch.allclose(cx, cy, atol=0.5)
        moved += int(not torch.allclose(cy, _centroid(y), atol=0.5))
        assert set(torch.unique(w2).tolist()) <= {0.0, 1.0}  # weights are resampled, never blended
    assert moved >= 5


def test_intensity_changes_only_the_image():
    torch.manual_seed(0)
    aug = Augment(**{**OFF, "p_intensity": 1.0, "p_noise": 1.0, "p_blur": 1.0, "p_lowres": 1.0})
    x, y, w = _slice()
    x2, y2, w2 = aug(x.clone(), y.clone(), w.clone())
    assert torch.equal(y, y2) and torch.equal(w, w2)
    assert not torch.equal(x, x2)
    assert float(x2.min()) >= 0.0 and float(x2.max()) <= 1.0


def test_same_seed_same_slices():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(Augment()(*_slice()))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_epoch_subset_sampler_is_a_fresh_seeded_subset_per_epoch():
    from qnkit.train.solver import EpochSubsetSampler

    s = EpochSubsetSampler(100, 30, seed=1)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    second = list(s)
    assert len(first) == len(second) == len(s) == 30 and len(set(first)) == 30
    assert first != second and all(0 <= i < 100 for i in first + second)
    s.set_epoch(1)
    assert list(s) == first
    ranks = [EpochSubsetSampler(100, 30, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(first)


def test_a_small_data_set_repeats_its_slices_up_to_the_minimum_steps_per_epoch():
    """16 cases' 370 slices at effective batch 16 are 23 optimiser steps: min_steps_per_epoch raises an
    epoch to 100 steps by whole shuffled passes (every slice 4 or 5 times), a large data set keeps one pass."""
    from collections import Counter

    from qnkit.train.settings import TrainingSettings
    from qnkit.train.solver import EpochSubsetSampler, slices_per_epoch

    t = TrainingSettings()
    assert (t.min_steps_per_epoch, t.effective_batch) == (100, 16)
    assert slices_per_epoch(t, 370) == 1600 and slices_per_epoch(t, 20000) == 20000
    assert slices_per_epoch(TrainingSettings(min_steps_per_epoch=0), 370) == 370
    assert slices_per_epoch(TrainingSettings(slices_per_epoch=1000), 20000) == 1600  # the floor wins
    assert slices_per_epoch(t, 0) == 0

    s = EpochSubsetSampler(370, 1600, seed=3)
    s.set_epoch(4)
    drawn = list(s)
    counts = Counter(drawn)
    assert len(drawn) == len(s) == 1600 and set(counts) == set(range(370))
    assert set(counts.values()) == {4, 5}
    ranks = [EpochSubsetSampler(370, 1600, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(4)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(drawn)
