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


def _random_slice(h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, h, w, generator=g)
    y = (torch.rand(1, h, w, generator=g) > 0.7).float()
    wt = torch.rand(1, h, w, generator=g) + 0.5
    return x, y, wt


def _padded_window(t, row: int, col: int, size: int):
    """Plain reference: the size x size window whose centre pixel is (row - 0.5, col - 0.5) for even sizes,
    i.e. rows row - size/2 .. row + size/2 - 1, zeros outside the slice."""
    out = torch.zeros(t.shape[0], size, size)
    r0, c0 = row - size // 2, col - size // 2
    for i in range(size):
        for j in range(size):
            r, c = r0 + i, c0 + j
            if 0 <= r < t.shape[1] and 0 <= c < t.shape[2]:
                out[:, i, j] = t[:, r, c]
    return out


def test_window_without_geometry_is_the_slice_region_with_zeros_outside(monkeypatch):
    x, y, w = _random_slice()
    aug = Augment.crop_only(16)
    for row, col in ((20, 28), (3, 5), (38, 54), (0, 0)):
        # centre (row - 0.5, col - 0.5): the window's pixel grid falls exactly on the slice's
        monkeypatch.setattr(Augment, "window_centre", lambda self, x_, y_, r=row, c=col: (r - 0.5, c - 0.5))
        x2, y2, w2 = aug(x, y, w)
        assert x2.shape == y2.shape == w2.shape == (1, 16, 16)
        for got, source in ((x2, x), (y2, y), (w2, w)):
            torch.testing.assert_close(got, _padded_window(source, row, col, 16), atol=1e-5, rtol=0)


def test_window_centres_on_kidney_or_body():
    h, w_ = 64, 80
    x = torch.zeros(1, h, w_)
    x[0, 8:56, 10:70] = 0.5  # body
    y = torch.zeros(1, h, w_)
    y[0, 30:36, 50:58] = 1.0  # kidney
    torch.manual_seed(0)
    kidney_first = Augment.crop_only(16, kidney_p=1.0)
    for _ in range(20):
        r, c = kidney_first.window_centre(x, y)
        assert 30 - 4 <= r <= 35 + 4 and 50 - 4 <= c <= 57 + 4
    body_only = Augment.crop_only(16, kidney_p=0.0)
    for _ in range(20):
        r, c = body_only.window_centre(x, y)
        assert 8 <= r < 56 and 10 <= c < 70
    r, c = body_only.window_centre(torch.zeros(1, h, w_), y)  # no body: anywhere in the slice
    assert 0 <= r <= h - 1 and 0 <= c <= w_ - 1


def test_windows_with_geometry_keep_target_and_image_together():
    x, y, w = _slice(64, 64)
    aug = Augment(p_intensity=0.0, p_blur=0.0, p_lowres=0.0, p_noise=0.0, p_geometry=1.0, crop=32, crop_kidney_p=1.0)
    torch.manual_seed(3)
    for _ in range(5):
        x2, y2, w2 = aug(x, y, w)
        assert x2.shape == (1, 32, 32)
        assert (y2 > 0.5).any(), "a kidney-centred window holds kidney"
        torch.testing.assert_close(x2, 0.8 * y2, atol=1e-6, rtol=0)  # one sampling grid for both
        assert set(torch.unique(w2).tolist()) <= {0.0, 1.0}


def test_context_planes_get_one_transform():
    """A 2.5-D slice's planes move, blur and change contrast alike: three copies of a slice come out as three
    copies of what the slice alone comes out as (noise, drawn per plane, off), in windows and whole slices."""
    x, y, w = _slice()
    x[0, 30:40, 5:20] = 0.4  # body beside the kidney, for the window's centre
    for crop in (0, 32):
        for seed in range(3):
            aug = Augment(**{**OFF, "p_geometry": 1.0, "p_intensity": 1.0, "p_blur": 1.0, "p_lowres": 1.0},
                          crop=crop, crop_kidney_p=0.5)
            torch.manual_seed(seed)
            one = aug(x.clone(), y.clone(), w.clone())
            torch.manual_seed(seed)
            three = aug(x.repeat(3, 1, 1), y.clone(), w.clone())
            assert three[0].shape == (3, *one[0].shape[1:])
            # (the blur's convolution may round the last bit differently for a batch of three planes)
            assert all(torch.allclose(plane, one[0][0], rtol=0, atol=1e-6) for plane in three[0])
            assert torch.equal(three[1], one[1]) and torch.equal(three[2], one[2])
