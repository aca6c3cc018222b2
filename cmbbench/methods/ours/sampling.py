"""CMB-centred patch sampling with negatives (numpy; patches cut from working-grid volumes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Case", "PatchSampler"]


@dataclass
class Case:
    """One preprocessed training scan on the working grid."""

    scan_id: str
    image: np.ndarray      # float32 normalised
    labels: np.ndarray     # int instance map (0 = background)
    mask: np.ndarray       # bool brain mask
    sequence: str = "unknown"
    cmb_voxels: np.ndarray = field(default=None)  # (N, 3) voxel indices of CMB voxels
    brain_voxels: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        if self.cmb_voxels is None:
            self.cmb_voxels = np.argwhere(self.labels > 0)
        if self.brain_voxels is None:
            bv = np.argwhere(self.mask)
            self.brain_voxels = bv[:: max(1, len(bv) // 50_000)]


def _crop(arr: np.ndarray, centre: np.ndarray, size: int, fill: float) -> np.ndarray:
    lo = np.asarray(centre, int) - size // 2
    out = np.full((size,) * 3, fill, dtype=arr.dtype)
    src = tuple(slice(max(l, 0), min(l + size, s)) for l, s in zip(lo, arr.shape))
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
    out[dst] = arr[src]
    return out


class PatchSampler:
    """Draws ``(image, target)`` crops of ``size`` voxels: a share ``pos_fraction`` centred
    (with jitter of up to ``size // 4``) on a random CMB voxel of a random positive case, the
    rest centred on a random brain voxel of any case (negatives: mimics, veins, CSF, edges)."""

    def __init__(self, cases: list[Case], size: int, *, pos_fraction: float = 0.67,
                 seed: int = 0) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.size = int(size)
        self.pos_fraction = float(pos_fraction)
        self.rng = np.random.default_rng(seed)
        self.positive = [c for c in cases if len(c.cmb_voxels)]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        if self.positive and rng.random() < self.pos_fraction:
            case = self.positive[rng.integers(len(self.positive))]
            centre = case.cmb_voxels[rng.integers(len(case.cmb_voxels))]
            centre = centre + rng.integers(-(self.size // 4), self.size // 4 + 1, size=3)
        else:
            case = self.cases[rng.integers(len(self.cases))]
            pool = case.brain_voxels if len(case.brain_voxels) else np.argwhere(
                np.ones(case.image.shape, bool))[:1000]
            centre = pool[rng.integers(len(pool))]
        img = _crop(case.image, centre, self.size, float(case.image.min()))
        lab = _crop((case.labels > 0).astype(np.uint8), centre, self.size, 0)
        return img, lab

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.sample() for _ in range(n)]
        return (np.stack([p[0] for p in pairs])[:, None].astype(np.float32),
                np.stack([p[1] for p in pairs]).astype(np.int64))
