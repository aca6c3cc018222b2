"""Sliding-window inference on the working grid (Gaussian-weighted overlap, optional flip TTA),
restricted to the brain mask's bounding box, and candidate extraction."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["LOGIT_FLOOR", "LOGIT_TEMPERATURE", "extract_candidates", "gaussian_weight",
           "sliding_window", "tempered", "tempered_threshold"]

#: log-odds written outside the brain's bounding box (``output="logit"``): p ~ 2e-22
LOGIT_FLOOR = -50.0
#: score of a voxel with log-odds d under ``score=logit``: sigmoid(d / T). A float32
#: sigmoid(d) is exactly 1 from d ~ 17 on, so a saturated network's confident candidates tie;
#: with T = 4 the scores stay distinct up to d ~ 66.
LOGIT_TEMPERATURE = 4.0


def tempered(logodds: np.ndarray | float, temperature: float = LOGIT_TEMPERATURE
             ) -> np.ndarray:
    """sigmoid(logodds / temperature) as float32 (a monotone score in [0, 1])."""
    d = np.asarray(logodds, dtype=np.float64) / float(temperature)
    return (0.5 * (1.0 + np.tanh(0.5 * d))).astype(np.float32)


def tempered_threshold(p: float, temperature: float = LOGIT_TEMPERATURE) -> float:
    """The tempered score of probability ``p``: thresholding sigmoid(d / T) there selects
    the same voxels as thresholding sigmoid(d) at ``p``."""
    p = float(np.clip(p, 1e-12, 1 - 1e-12))
    return float(tempered(np.log(p / (1 - p)), temperature))


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
                   margin: int = 4, output: str = "prob"
                   ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted mean over tiles (and flips) of the network's foreground output.

    ``output="prob"``: the probability (float32, image shape; 0 outside the brain mask's
    bounding box). ``output="logit"``: the log-odds log(p1 / p0) instead (:data:`LOGIT_FLOOR`
    outside the box), which keeps its ranking where probabilities saturate at 1.
    ``output="both"``: the tuple (probability, log-odds) from one pass.

    Tiles run on the device of the model's parameters (CPU or CUDA); the map is assembled on
    the CPU.
    """
    if output not in ("prob", "logit", "both"):
        raise ValueError(f"output must be 'prob', 'logit' or 'both', not {output!r}")
    kinds = ("prob", "logit") if output == "both" else (output,)
    model.eval()
    torch.set_flush_denormal(True)
    dev = next(model.parameters()).device
    div = getattr(model, "divisor", 4)
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
    acc = {kind: torch.zeros(xt.shape[2:]) for kind in kinds}
    wsum = torch.zeros(xt.shape[2:])
    w = gaussian_weight(int(p.max()))
    w = w[tuple(slice((int(p.max()) - int(q)) // 2, (int(p.max()) - int(q)) // 2 + int(q))
                for q in p)]
    steps = [max(1, int(q * (1 - overlap))) for q in p]
    flips = [()] + ([(2,), (3,), (4,)] if tta else [])
    for i in _starts(xt.shape[2], int(p[0]), steps[0]):
        for j in _starts(xt.shape[3], int(p[1]), steps[1]):
            for k in _starts(xt.shape[4], int(p[2]), steps[2]):
                tile = xt[:, :, i:i + p[0], j:j + p[1], k:k + p[2]].to(dev)
                tot = {kind: 0 for kind in kinds}
                for f in flips:
                    t = torch.flip(tile, f) if f else tile
                    z = model(t)
                    for kind in kinds:
                        v = (z[:, 1:2] - z[:, 0:1]) if kind == "logit" else torch.softmax(
                            z, 1)[:, 1:2]
                        tot[kind] = tot[kind] + (torch.flip(v, f) if f else v)
                sl = (slice(i, i + p[0]), slice(j, j + p[1]), slice(k, k + p[2]))
                for kind in kinds:
                    acc[kind][sl] += (tot[kind][0, 0] / len(flips)).float().cpu() * w
                wsum[sl] += w
    maps = []
    for kind in kinds:
        out = np.full(image.shape, LOGIT_FLOOR if kind == "logit" else 0.0, np.float32)
        res = (acc[kind] / wsum.clamp_min(1e-6)).numpy()[:shape[0], :shape[1], :shape[2]]
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = res
        maps.append(out)
    return maps[0] if len(maps) == 1 else tuple(maps)


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
