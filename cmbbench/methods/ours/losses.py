"""Losses for tiny objects: focal Tversky + class-weighted cross-entropy (the poster's configs:
Tversky alpha = beta = 0.5, focal exponent from gamma, CE class weights 0.1 / 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["combined_loss", "focal_tversky"]


def focal_tversky(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.5,
                  beta: float = 0.5, gamma: float = 4 / 3, eps: float = 1.0) -> torch.Tensor:
    """``(1 - TI) ** (1 / gamma)`` on the foreground class, TI pooled over the batch.

    ``alpha`` weighs false positives and ``beta`` false negatives; ``eps`` smooths batches
    without foreground (their loss is then ~ proportional to the predicted foreground).
    """
    p = torch.softmax(logits, dim=1)[:, 1]
    t = target.float()
    tp = (p * t).sum()
    fp = (p * (1 - t)).sum()
    fn = ((1 - p) * t).sum()
    ti = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    return (1 - ti).clamp_min(0) ** (1.0 / gamma)


def combined_loss(logits, target: torch.Tensor, *, ce_weights=(0.1, 5.0), alpha: float = 0.5,
                  beta: float = 0.5, gamma: float = 4 / 3, ce_factor: float = 1.0):
    """Focal Tversky + weighted CE; ``logits`` may be a deep-supervision list (finest first,
    weights halving per level, targets max-pooled)."""
    if isinstance(logits, (list, tuple)):
        total, wsum = 0.0, 0.0
        for n, lg in enumerate(logits):
            t = target
            if lg.shape[2:] != target.shape[1:]:
                t = (F.adaptive_max_pool3d(target[:, None].float(), lg.shape[2:])[:, 0] > 0)
            w = 0.5 ** n
            total = total + w * combined_loss(lg, t.long(), ce_weights=ce_weights, alpha=alpha,
                                              beta=beta, gamma=gamma, ce_factor=ce_factor)
            wsum += w
        return total / wsum
    w = torch.tensor(ce_weights, dtype=logits.dtype, device=logits.device)
    ce = F.cross_entropy(logits, target.long(), weight=w)
    return focal_tversky(logits, target, alpha=alpha, beta=beta, gamma=gamma) + ce_factor * ce
