"""Sliding-window inference on the working grid (Gaussian-weighted overlap, optional flip TTA),
restricted to the brain mask's bounding box, and candidate extraction."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["gaussian_weight", "sliding_window", "extract_candidates"]


def gaussian_weight(size: int, sigma_scale: float = 0.125) -> torch.Tensor:
    c = (size - 1) / 2
    g = torch.exp(-0.5 * ((torch.arange(size) - c) / (sigma_scale * size)) ** 2)
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    w = w / w.max()
    return w.clamp_min(1e-3)


def _starts(n: int, p: int, step: int) -> list[int]:
    """The fewest tile starts, evenly spread, whose stride is at most ``step``."""
    if n <= p:
        return [0]
    count = int(np.ceil((n - p) / step)) + 1
    return sorted(set(int(round(v)) for v in np.linspace(0, n - p, count)))


@torch.no_grad()
def sliding_window(model: torch.nn.Module, image: np.ndarray, mask: np.ndarray | None = None, *,
                   patch: int = 96, overlap: float = 0.15, tta: bool = False,
                   margin: int = 4) -> np.ndarray:
    """Foreground probability (float32, image shape); zero outside the mask's bounding box."""
    model.eval()
    torch.set_flush_denormal(True)
    div = getattr(model, "divisor", 4)
    out = np.zeros(image.shape, np.float32)
    if mask is not None and mask.any():
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - margin, 0)
        hi = np.minimum(idx.max(0) + margin + 1, image.shape)
    else:
        lo, hi = np.zeros(3, int), np.array(image.shape)
    sub = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shape = np.array(sub.shape)
    # patch no larger than needed, a multiple of the network divisor
    p = np.minimum(patch, ((shape + div - 1) // div) * div)
    pad = np.maximum(p - shape, 0)
    x = np.pad(sub, [(0, int(q)) for q in pad], mode="edge")
    xt = torch.from_numpy(np.ascontiguousarray(x))[None, None]
    acc = torch.zeros(xt.shape[2:])
    wsum = torch.zeros(xt.shape[2:])
    w = gaussian_weight(int(p.max()))
    w = w[tuple(slice((int(p.max()) - int(q)) // 2, (int(p.max()) - int(q)) // 2 + int(q))
                for q in p)]
    steps = [max(1, int(q * (1 - overlap))) for q in p]
    flips = [()] + ([(2,), (3,), (4,)] if tta else [])
    for i in _starts(xt.shape[2], int(p[0]), steps[0]):
        for j in _starts(xt.shape[3], int(p[1]), steps[1]):
            for k in _starts(xt.shape[4], int(p[2]), steps[2]):
                tile = xt[:, :, i:i + p[0], j:j + p[1], k:k + p[2]]
                prob = 0
                for f in flips:
                    t = torch.flip(tile, f) if f else tile
                    pr = torch.softmax(model(t), 1)[:, 1:2]
                    prob = prob + (torch.flip(pr, f) if f else pr)
                prob = prob[0, 0] / len(flips)
                acc[i:i + p[0], j:j + p[1], k:k + p[2]] += prob * w
                wsum[i:i + p[0], j:j + p[1], k:k + p[2]] += w
    res = (acc / wsum.clamp_min(1e-6)).numpy()[:shape[0], :shape[1], :shape[2]]
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = res
    return out


def extract_candidates(prob: np.ndarray, *, threshold: float = 0.1,
                       min_score: float = 0.05) -> tuple[np.ndarray, list[dict]]:
    """Components of ``prob > threshold`` (26-connectivity): label map and one row per
    component (peak voxel ``i, j, k`` and ``score`` = peak probability)."""
    lab, n = ndimage.label(prob > threshold, structure=np.ones((3, 3, 3), bool))
    rows = []
    if n:
        objs = ndimage.find_objects(lab)
        for c, sl in enumerate(objs, start=1):
            sub = np.where(lab[sl] == c, prob[sl], 0)
            peak = np.unravel_index(int(np.argmax(sub)), sub.shape)
            score = float(sub[peak])
            if score < min_score:
                continue
            rows.append({"label": c, "i": peak[0] + sl[0].start, "j": peak[1] + sl[1].start,
                         "k": peak[2] + sl[2].start, "score": score,
                         "n_voxels": int((lab[sl] == c).sum())})
    return lab, rows
