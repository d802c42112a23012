"""The report's loss: alpha * Dice loss + beta * weighted binary cross entropy (section 5.5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth) over the whole batch, p = sigmoid(logits)."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + t.sum() + smooth)


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean(weights * BCE(sigmoid(logits), target)), computed from logits for numerical stability."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), weight=weights.float())


class CombinedLoss(torch.nn.Module):
    """alpha * Dice + beta * weighted BCE; weights are the per-pixel QuickNAT border weights."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, smooth: float = 1.0):
        super().__init__()
        self.alpha, self.beta, self.smooth = alpha, beta, smooth

    def forward(self, logits, target, weights):
        return self.alpha * dice_loss(logits, target, self.smooth) + self.beta * weighted_bce(logits, target, weights)
