"""Location-based post-processing without an atlas (numpy/scipy only).

The poster drops a predicted component whose dominant SynthSeg label is not brain parenchyma.
Here the method segments the scan itself, on the working grid:

- **brain mask**: the image-derived mask of :mod:`.preprocess`;
- **surface band**: voxels within ``surface_mm`` (0: no band) of the mask's border (sulcal/cortical
  surface, meninges, skull-base air-tissue interfaces where susceptibility artefacts sit);
- **CSF**: a 3-class intensity split (quantile-initialised 1D k-means over the smoothed,
  normalised image in the mask); on T2*-weighted GRE and SWI magnitude, CSF is the brightest
  class (long T2*). Small CSF islands (< 20 mm^3) are discarded; the remaining CSF is dilated
  by 1 mm.

A candidate is dropped when its peak is outside the mask (rule ``mask``), inside the surface
band (``surface``), or when more than ``csf_fraction`` of a 3 mm ball around its peak is CSF
(``csf``: ventricles, cisterns, sulci). Any subset of :data:`RULES` can be applied.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["RULES", "TissueMaps", "keep_candidate", "parse_rules", "tissue_maps"]

#: the location rules, in the order they are checked
RULES: tuple[str, ...] = ("mask", "surface", "csf")


def parse_rules(rules: str | tuple | list | None) -> tuple[str, ...]:
    """``"mask,csf"`` or a sequence -> the rules in :data:`RULES` order (None: all).

    Raises
    ------
    ValueError
        An unknown rule name.
    """
    if rules is None:
        return RULES
    names = [r.strip() for r in (rules.split(",") if isinstance(rules, str) else rules)]
    names = [r for r in names if r]
    bad = [r for r in names if r not in RULES]
    if bad:
        raise ValueError(f"unknown location rule(s) {', '.join(bad)}; known: {', '.join(RULES)}")
    return tuple(r for r in RULES if r in names)


class TissueMaps:
    def __init__(self, mask: np.ndarray, surface: np.ndarray, csf: np.ndarray,
                 spacing_mm: float) -> None:
        self.mask, self.surface, self.csf, self.spacing_mm = mask, surface, csf, spacing_mm


def _kmeans1d(v: np.ndarray, k: int = 3, iters: int = 20) -> np.ndarray:
    c = np.quantile(v, np.linspace(0.15, 0.85, k))
    for _ in range(iters):
        a = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        c = np.array([v[a == i].mean() if (a == i).any() else c[i] for i in range(k)])
    return np.sort(c)


def tissue_maps(image: np.ndarray, mask: np.ndarray, spacing_mm: float = 1.0, *,
                surface_mm: float = 2.0) -> TissueMaps:
    sm = ndimage.gaussian_filter(image, 0.7 / spacing_mm)
    vals = sm[mask]
    if vals.size < 1000:
        return TissueMaps(mask, np.zeros_like(mask), np.zeros_like(mask), spacing_mm)
    c = _kmeans1d(vals[:: max(1, vals.size // 200_000)])
    thr = 0.5 * (c[1] + c[2])
    csf = mask & (sm > thr)
    lab, n = ndimage.label(csf)
    if n:
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, np.arange(1, n + 1))
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes * spacing_mm ** 3 >= 20
        csf = keep[lab]
    csf = ndimage.binary_dilation(csf, iterations=max(1, int(round(1.0 / spacing_mm))))
    r = int(round(surface_mm / spacing_mm))
    if r <= 0:
        return TissueMaps(mask, np.zeros_like(mask), csf, spacing_mm)
    inner = ndimage.binary_erosion(mask, iterations=r, border_value=1)
    return TissueMaps(mask, mask & ~inner, csf, spacing_mm)


def keep_candidate(t: TissueMaps, ijk: tuple[int, int, int], *, csf_fraction: float = 0.5,
                   rules: tuple[str, ...] = RULES) -> tuple[bool, str]:
    """Whether a candidate with its peak at working-grid voxel ``ijk`` passes ``rules``, and
    the first rule it fails (``outside_brain``, ``surface``, ``csf``) or ``parenchyma``."""
    i, j, k = (int(v) for v in ijk)
    if "mask" in rules and not t.mask[i, j, k]:
        return False, "outside_brain"
    if "surface" in rules and t.surface[i, j, k]:
        return False, "surface"
    if "csf" not in rules:
        return True, "parenchyma"
    r = max(1, int(round(3.0 / t.spacing_mm)))
    sl = tuple(slice(max(v - r, 0), v + r + 1) for v in (i, j, k))
    ball = t.csf[sl]
    if ball.size and ball.mean() > csf_fraction:
        return False, "csf"
    return True, "parenchyma"
