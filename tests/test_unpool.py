"""Mask-based (export-friendly) max pool/unpool == native MaxPool2d/MaxUnpool2d, ties included."""
import pytest

import torch
import torch.nn.functional as F  # noqa: E402

from qnkit.nn.unpool import (  # noqa: E402
    MaskMaxPool2d, MaskMaxUnpool2d, first_max_masks, mask_unpool2d, window_max,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPE = (3, 5, 12, 18)  # divisible by 2 and 3


def _native(x, u, k):
    pooled, idx = F.max_pool2d(x, k, k, return_indices=True)
    return pooled, F.max_unpool2d(u, idx, k, k, output_size=x.shape[-2:])


def _inputs(g):
    rnd = torch.randn(SHAPE, generator=g)
    yield "random", rnd
    yield "int-small-range", torch.randint(-1, 2, SHAPE, generator=g).float()
    yield "constant", torch.full(SHAPE, 0.5)
    yield "relu-zeros", torch.relu(rnd)
    yield "signed-zeros", torch.where(torch.rand(SHAPE, generator=g) < 0.5, -0.0, 0.0)
    inf = float("inf")
    yield "with-inf", torch.where(rnd > 1.0, inf, torch.where(rnd < -1.0, -inf, rnd))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_keeps_first_maximum_in_row_major_order(dtype):
    """The tie rule the mask form reproduces (empirical check of PyTorch's max_pool2d)."""
    cases = {0: [[1, 1], [1, 1]], 1: [[0, 1], [1, 1]], 2: [[0, 0], [1, 1]], 3: [[0, 0], [0, 1]]}
    for want, window in cases.items():
        x = torch.tensor(window, dtype=dtype).view(1, 1, 2, 2)
        assert F.max_pool2d(x, 2, 2, return_indices=True)[1].item() == want
        masks = first_max_masks(x)[1]
        assert [int(m.item()) for m in masks] == [int(i == want) for i in range(4)]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_unpool_equals_native(dtype, k):
    g = torch.Generator().manual_seed(0)
    for name, x in _inputs(g):
        x = x.to(dtype)
        u = torch.randn(SHAPE[0], SHAPE[1], SHAPE[2] // k, SHAPE[3] // k, generator=g).to(dtype)
        pooled, ref = _native(x, u, k)
        assert torch.equal(window_max(x, k), pooled), name
        assert torch.equal(mask_unpool2d(u, x, k), ref), name
        assert mask_unpool2d(u, x, k).dtype == dtype


def test_onehot_masks_and_layouts():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (2, 4, 8, 8), generator=g).float()
    m, masks = first_max_masks(x)
    assert torch.stack(masks).sum(0).eq(1).all()  # exactly one position per window
    cl = x.contiguous(memory_format=torch.channels_last)
    u = torch.randn(2, 4, 4, 4, generator=g)
    assert torch.equal(mask_unpool2d(u, cl), _native(x, u, 2)[1])
    assert torch.equal(MaskMaxPool2d(2)(x), F.max_pool2d(x, 2))
    assert torch.equal(MaskMaxUnpool2d(2)(u, x), _native(x, u, 2)[1])


def test_gradient_wrt_unpooled_input_matches_native():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-1, 2, (2, 3, 8, 8), generator=g).float()
    u1 = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    u2 = u1.detach().clone().requires_grad_(True)
    w = torch.randn(2, 3, 8, 8, generator=g)
    (_native(x, u1, 2)[1] * w).sum().backward()
    (mask_unpool2d(u2, x) * w).sum().backward()
    assert torch.equal(u1.grad, u2.grad)


@pytest.mark.parametrize("shape", [(1, 1, 7, 8), (1, 1, 8, 9), (8, 8)])
def test_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="divisible"):
        window_max(torch.zeros(shape))
