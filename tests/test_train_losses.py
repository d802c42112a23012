"""Loss: alpha * Dice (smooth 1, on sigmoid probabilities) + beta * weighted BCE (mean)."""
import math

import torch

from qnkit.train.losses import CombinedLoss, dice_loss, weighted_bce


def test_dice_loss_values():
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert dice_loss(perfect, target).item() < 1e-6
    empty = torch.zeros_like(target)
    # all-background slice predicted as background: (0 + 1) / (0 + 0 + 1) -> loss 0 thanks to smooth
    assert abs(dice_loss(torch.full_like(target, -50.0), empty).item()) < 1e-6
    half = torch.zeros_like(target)  # p = 0.5 everywhere
    expected = 1 - (2 * 1.0 + 1) / (2.0 + 2.0 + 1)
    assert math.isclose(dice_loss(half, target).item(), expected, rel_tol=1e-6)


def test_weighted_bce_matches_formula_and_ignores_zero_weights():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    weights = torch.rand(2, 1, 4, 4)
    p = torch.sigmoid(logits)
    manual = (-(weights * (target * p.log() + (1 - target) * (1 - p).log()))).mean()
    assert torch.allclose(weighted_bce(logits, target, weights), manual, atol=1e-6)
    weights[..., 0] = 0
    changed = logits.clone()
    changed[..., 0] += 100
    assert torch.allclose(weighted_bce(changed, target, weights), weighted_bce(logits, target, weights))


def test_combined_loss_weights_and_gradient():
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    weights = torch.ones_like(target)
    loss = CombinedLoss(alpha=1.0, beta=0.5)(logits, target, weights)
    expected = dice_loss(logits, target) + 0.5 * weighted_bce(logits, target, weights)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
