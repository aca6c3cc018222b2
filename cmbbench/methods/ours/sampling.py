"""CMB-centred patch sampling with negatives and synthetic CMBs (numpy; patches cut from
working-grid volumes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .synthetic_cmbs import CMBBank, insert_cmb

__all__ = ["Case", "PatchSampler", "crop_to_brain", "dark_spots"]


@dataclass
class Case:
    """One preprocessed training scan on the working grid."""

    scan_id: str
    image: np.ndarray      # normalised (float32, or float16 to save memory)
    labels: np.ndarray     # CMB label map (0 = background; instance ids or binary)
    mask: np.ndarray       # bool brain mask
    sequence: str = "unknown"
    cmb_voxels: np.ndarray = field(default=None)  # (N, 3) voxel indices of CMB voxels
    brain_voxels: np.ndarray = field(default=None)
    hard_voxels: np.ndarray = field(default=None)  # (M, 3) centres of hard negatives
    intensity_offset: float = 0.0  # median / scale of the normalisation (synthetic CMBs)
    noise_sd: float = 0.0          # noise sd, normalised units (synthetic CMBs)
    slice_mm: float = 1.0          # native slice thickness (mm) (synthetic CMBs)

    def __post_init__(self) -> None:
        if self.cmb_voxels is None:
            self.cmb_voxels = np.argwhere(self.labels > 0)
        if self.brain_voxels is None:
            bv = np.argwhere(self.mask)
            self.brain_voxels = bv[:: max(1, len(bv) // 50_000)]
        if self.hard_voxels is None:
            self.hard_voxels = np.zeros((0, 3), int)
        # padding value of crops that leave the volume (computed once: a float16 min() over a
        # whole volume costs ~0.3 s)
        self.fill = float(self.image.min())


def crop_to_brain(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, margin: int,
                  extra: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Crop working-grid arrays to the brain mask's bounding box plus ``margin`` voxels
    (training memory: about half of a whole-head field of view is outside the brain)."""
    if not mask.any():
        return (image, labels, mask) + (() if extra is None else (extra,))
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out = (image[sl], labels[sl], mask[sl])
    return out + (() if extra is None else (extra[sl],))


def dark_spots(image: np.ndarray, mask: np.ndarray, labels: np.ndarray, *,
               z_max: float = -2.0, exclude_vox: int = 4, limit: int = 3000,
               seed: int = 0) -> np.ndarray:
    """Hard-negative centres: local intensity minima (3x3x3, after a 0.7-voxel Gaussian)
    inside the brain mask (dilated by 4 voxels) darker than ``z_max`` robust z-units and farther than
    ``exclude_vox`` voxels (Chebyshev) from any CMB voxel -- veins, iron, calcifications,
    flow voids and dark edges, whatever the dataset. Returns (M, 3) voxel indices."""
    sm = ndimage.gaussian_filter(image.astype(np.float32), 0.7)
    near = ndimage.binary_dilation(mask, iterations=4)  # just outside the mask too
    minima = (sm == ndimage.minimum_filter(sm, size=3)) & near & (sm < z_max)
    if labels.any():
        minima &= ~ndimage.binary_dilation(labels > 0, np.ones((3, 3, 3), bool),
                                            iterations=exclude_vox)
    pts = np.argwhere(minima)
    if len(pts) > limit:
        pts = pts[np.random.default_rng(seed).choice(len(pts), limit, replace=False)]
    return pts


def _crop(arr: np.ndarray, centre: np.ndarray, size: int, fill: float) -> np.ndarray:
    lo = np.asarray(centre, int) - size // 2
    out = np.full((size,) * 3, fill, dtype=arr.dtype)
    src = tuple(slice(max(l, 0), min(l + size, s)) for l, s in zip(lo, arr.shape))
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
    out[dst] = arr[src]
    return out


class PatchSampler:
    """Draws ``(image, target)`` crops of ``size`` voxels: a share ``pos_fraction`` centred
    (with jitter of up to ``size // 4``) on a random CMB voxel of a random positive case, a
    share ``hard_fraction`` centred (same jitter) on a hard negative of a random case
    (:attr:`Case.hard_voxels`: dark spots and, on synthetic data, the inserted mimics), the
    rest centred on a random brain voxel of any case (negatives: veins, CSF, edges).
    ``hard_fraction`` falls back to random brain voxels for cases without hard negatives.

    With a ``bank`` (:class:`.synthetic_cmbs.CMBBank`), a share ``synth_fraction`` of all
    crops, whatever their kind, also receives 1 to ``synth_max`` synthetic CMBs of the case's
    sequence and slice thickness, each at a random brain voxel of the crop's central part
    (``synth_margin`` voxels from every face) whose 3x3x3 mean lies in ``synth_z`` (parenchyma:
    neither CSF nor a vessel) and that is at least 4 voxels from any labelled CMB voxel."""

    def __init__(self, cases: list[Case], size: int, *, pos_fraction: float = 0.67,
                 hard_fraction: float = 0.0, seed: int = 0, bank: CMBBank | None = None,
                 synth_fraction: float = 0.0, synth_max: int = 2, synth_margin: int = 10,
                 synth_z: tuple[float, float] = (-2.0, 2.0)) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.size = int(size)
        self.pos_fraction = float(pos_fraction)
        self.hard_fraction = float(hard_fraction)
        self.rng = np.random.default_rng(seed)
        self.positive = [c for c in cases if len(c.cmb_voxels)]
        self.bank = bank
        self.synth_fraction = float(synth_fraction) if bank is not None else 0.0
        self.synth_max = max(1, int(synth_max))
        self.synth_margin = int(synth_margin)
        self.synth_z = (float(synth_z[0]), float(synth_z[1]))
        self.n_synthetic = 0  # CMBs inserted so far

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        u = rng.random()
        jitter = self.size // 4
        case = self.cases[rng.integers(len(self.cases))]
        if self.positive and u < self.pos_fraction:
            case = self.positive[rng.integers(len(self.positive))]
            centre = case.cmb_voxels[rng.integers(len(case.cmb_voxels))]
            centre = centre + rng.integers(-jitter, jitter + 1, size=3)
        elif u < self.pos_fraction + self.hard_fraction and len(case.hard_voxels):
            centre = case.hard_voxels[rng.integers(len(case.hard_voxels))]
            centre = centre + rng.integers(-jitter, jitter + 1, size=3)
        else:
            pool = case.brain_voxels if len(case.brain_voxels) else np.argwhere(
                np.ones(case.image.shape, bool))[:1000]
            centre = pool[rng.integers(len(pool))]
        img = _crop(case.image, centre, self.size, case.fill)
        lab = _crop((case.labels > 0).astype(np.uint8), centre, self.size, 0)
        if self.synth_fraction > 0 and rng.random() < self.synth_fraction:
            img = img.astype(np.float32)
            mask = _crop(case.mask, centre, self.size, False)
            for _ in range(int(rng.integers(1, self.synth_max + 1))):
                self._insert(case, img, lab, mask)
        return img, lab

    def _insert(self, case: Case, img: np.ndarray, lab: np.ndarray, mask: np.ndarray) -> bool:
        """One synthetic CMB into the crop (in place); False when no voxel qualifies."""
        rng, m = self.rng, self.synth_margin
        lo, hi = m, self.size - m
        for _ in range(12):
            c = rng.integers(lo, max(hi, lo + 1), size=3)
            if not mask[tuple(c)]:
                continue
            near = tuple(slice(max(v - 4, 0), v + 5) for v in c)
            if lab[near].any():
                continue
            local = float(img[tuple(slice(v - 1, v + 2) for v in c)].mean())
            if not self.synth_z[0] <= local <= self.synth_z[1]:
                continue
            entry = self.bank.draw(rng, case.sequence, case.slice_mm)
            insert_cmb(img, lab, entry, c, offset=case.intensity_offset, noise=case.noise_sd,
                       swi=str(case.sequence).upper() == "SWI", rng=rng)
            self.n_synthetic += 1
            return True
        return False

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.sample() for _ in range(n)]
        return (np.stack([p[0] for p in pairs])[:, None].astype(np.float32),
                np.stack([p[1] for p in pairs]).astype(np.int64))
