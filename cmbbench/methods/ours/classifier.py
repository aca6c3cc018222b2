"""Second-stage candidate classifier (false-positive reduction) of ``ours``.

The U-Net's candidates (components of its probability map, :func:`.infer.extract_candidates`)
are described by hand-made features measured on the working grid (1 mm isotropic RAS,
normalised image of :mod:`.preprocess`) and re-scored by a small multilayer perceptron. The
features target what separates a microbleed from its mimics on magnitude images alone:

- **network evidence**: peak log-odds, component volume (mm^3);
- **shape of the dark spot**: Hessian eigenvalue ratios of the smoothed image at 1 and 2 mm
  (a blob has three comparable positive curvatures, a vein one near zero), and the elongation,
  volume and box-border contact of the dark region at half contrast (veins and flow voids run
  out of a 15 mm box, a CMB does not);
- **contrast and surroundings**: darkest value, contrast against a 3-6 mm shell, the shell's
  median and spread (CSF-bright ventricles around choroid-plexus calcifications);
- **location**: depth below the brain-mask surface (mm), the CSF fraction of a 5 mm ball,
  and the peak's position relative to the brain-mask centroid in units of the mask's RMS
  extent (RAS axes; left-right as a distance from the midline);
- **symmetry**: the darkest value and the network's peak probability in a 7 mm box at the
  mirror position across the mask's mid-sagittal plane (physiological calcifications of the
  pallidum and choroid plexus are bilateral; microbleeds rarely are);
- **acquisition**: the scan's in-plane and slice voxel sizes (mm).

All functions are pure (arrays in, arrays out); the classifier is a torch module whose
state (weights, feature names, standardisation) is stored inside the ``ours`` checkpoint and
loaded with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .infer import extract_candidates
from .postprocess import TissueMaps, tissue_maps

__all__ = ["FEATURES", "CandidateClassifier", "candidate_features", "component_scales",
           "describe_candidates", "fit_classifier", "rescore_map"]

#: feature names, in column order (units in :func:`candidate_features`)
FEATURES: tuple[str, ...] = (
    "logit", "log_vol_p50", "log_vol",
    "i_min", "contrast", "shell_med", "shell_iqr",
    "hess1_blob", "hess1_plate", "hess1_str", "hess2_blob", "hess2_plate", "hess2_str",
    "dark_log_vol", "dark_elong", "dark_border",
    "depth_mm", "csf5",
    "x_abs", "y", "z",
    "mirror_min", "mirror_prob",
    "inplane_mm", "slice_mm",
)

_BOX = 7            # half-width (voxels) of the 15^3 box of the dark-region features
_LOGIT_CLIP = (-20.0, 40.0)


def _crop(a: np.ndarray, c: tuple[int, ...], r: int, fill: float) -> np.ndarray:
    """The (2r+1)^3 box of ``a`` centred on ``c``, padded with ``fill`` outside the array."""
    out = np.full((2 * r + 1,) * 3, fill, dtype=a.dtype)
    lo = [v - r for v in c]
    src = tuple(slice(max(lv, 0), min(lv + 2 * r + 1, n)) for lv, n in zip(lo, a.shape))
    dst = tuple(slice(s.start - lv, s.stop - lv) for s, lv in zip(src, lo))
    if all(s.stop > s.start for s in src):
        out[dst] = a[src]
    return out


def _hessian_ratios(box: np.ndarray, sigma: float) -> tuple[float, float, float]:
    """(|l1|/|l3|, |l2|/|l3|, sigma^2 l3) of the Hessian at the box centre, eigenvalues sorted
    by magnitude; signs kept on the strength (positive: a dark spot)."""
    c = tuple(s // 2 for s in box.shape)
    h = np.zeros((3, 3))
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            v = ndimage.gaussian_filter(box, sigma, order=order, mode="nearest")[c]
            h[a, b] = h[b, a] = v
    ev = np.linalg.eigvalsh(h)
    ev = ev[np.argsort(np.abs(ev))]
    l3 = ev[2] if abs(ev[2]) > 1e-9 else 1e-9
    return (float(ev[0] / l3), float(ev[1] / l3), float(sigma ** 2 * ev[2]))


def _dark_region(box: np.ndarray, level: float) -> tuple[float, float, float]:
    """Log volume (voxels), elongation and box-border contact of the region below ``level``
    connected (26) to the box centre."""
    c = tuple(s // 2 for s in box.shape)
    below = box <= level
    if not below[c]:
        return 0.0, 1.0, 0.0
    lab, _ = ndimage.label(below, structure=np.ones((3, 3, 3), bool))
    reg = lab == lab[c]
    idx = np.argwhere(reg).astype(float)
    border = float(reg[0].any() or reg[-1].any() or reg[:, 0].any() or reg[:, -1].any()
                   or reg[:, :, 0].any() or reg[:, :, -1].any())
    if len(idx) < 3:
        return float(np.log1p(len(idx))), 1.0, border
    ev = np.linalg.eigvalsh(np.cov(idx.T) + np.eye(3) / 12.0)  # + a voxel's own spread
    return float(np.log1p(len(idx))), float(np.sqrt(ev[-1] / ev[0])), border


@dataclass(frozen=True)
class BrainFrame:
    """Centroid (voxels) and RMS extent (voxels) of a brain mask per RAS axis."""

    centre: np.ndarray
    extent: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> BrainFrame:
        idx = np.argwhere(mask)
        if not len(idx):
            shape = np.array(mask.shape, float)
            return cls(shape / 2, shape / 4)
        step = max(1, len(idx) // 200_000)
        sub = idx[::step].astype(float)
        return cls(sub.mean(0), np.maximum(sub.std(0), 1.0))


def candidate_features(image: np.ndarray, mask: np.ndarray, prob: np.ndarray,
                       logodds: np.ndarray, labels: np.ndarray, rows: list[dict], *,
                       csf: np.ndarray | None = None, spacing_mm: float = 1.0,
                       native_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
                       ) -> np.ndarray:
    """Feature matrix (n_candidates x len(:data:`FEATURES`), float32) of candidate ``rows``.

    Parameters
    ----------
    image, mask
        Normalised image and brain mask on the working grid (RAS axes, ``spacing_mm``
        isotropic), as :func:`.preprocess.preprocess` returns them.
    prob, logodds
        The network's mean probability and mean log-odds on the same grid.
    labels, rows
        The candidate label map and rows of :func:`.infer.extract_candidates` (peak voxel
        ``i, j, k`` in working-grid voxels, ``label``).
    csf
        CSF map of :func:`.postprocess.tissue_maps` (None: no CSF feature, 0).
    native_spacing_mm
        The scan's voxel sizes (mm), any order (the smallest is taken as in-plane).

    Returns
    -------
    numpy.ndarray
        One row per candidate; distances in mm, intensities in normalised units
        (median 0, robust SD 1), volumes as log(1 + mm^3).
    """
    n = len(rows)
    out = np.zeros((n, len(FEATURES)), np.float32)
    if not n:
        return out
    vox_mm3 = spacing_mm ** 3
    frame = BrainFrame.of(mask)
    depth = ndimage.distance_transform_edt(mask) * spacing_mm
    lab_ids = np.array([r["label"] for r in rows])
    n_lab = int(labels.max()) + 1
    vol = np.bincount(labels.ravel(), minlength=n_lab)
    vol50 = np.bincount(labels.ravel(), weights=(prob > 0.5).ravel(), minlength=n_lab)
    peak_logit = ndimage.maximum(logodds, labels, lab_ids) if n_lab > 1 else np.zeros(n)
    fill = float(np.median(image[mask])) if mask.any() else 0.0
    sp = np.sort(np.asarray(native_spacing_mm, float))
    r_shell = int(round(6.0 / spacing_mm))
    zz = np.indices((2 * r_shell + 1,) * 3) - r_shell
    rad = np.sqrt((zz ** 2).sum(0)) * spacing_mm
    shell = (rad >= 3.0) & (rad <= 6.0)
    ball5 = rad <= 5.0
    r_mir = int(round(3.0 / spacing_mm))
    for q, r in enumerate(rows):
        c = (int(r["i"]), int(r["j"]), int(r["k"]))
        big = _crop(image, c, r_shell, fill)
        mid = r_shell
        near = big[mid - 1:mid + 2, mid - 1:mid + 2, mid - 1:mid + 2]
        i_min = float(near.min())
        # re-centre the shape features on the darkest voxel next to the peak (of the image
        # smoothed at 1 mm, so that noise and flat-bottomed spots do not move it off-centre)
        near_s = ndimage.gaussian_filter(big.astype(np.float64), 1.0 / spacing_mm)[
            mid - 1:mid + 2, mid - 1:mid + 2, mid - 1:mid + 2]
        d = np.unravel_index(int(np.argmin(near_s)), near_s.shape)
        cd = tuple(v + dv - 1 for v, dv in zip(c, d))
        sh = big[shell]
        med = float(np.median(sh))
        iqr = float(np.subtract(*np.percentile(sh, [75, 25])))
        box = _crop(image, cd, _BOX + 4, fill).astype(np.float64)
        h1 = _hessian_ratios(box, 1.0 / spacing_mm)
        h2 = _hessian_ratios(box, 2.0 / spacing_mm)
        inner = box[4:-4, 4:-4, 4:-4]
        dv, de, db = _dark_region(inner, 0.5 * (i_min + med))
        csf5 = float(_crop(csf, c, r_shell, False)[ball5].mean()) if csf is not None else 0.0
        rel = (np.array(c, float) - frame.centre) / frame.extent
        mirror = (int(round(2 * frame.centre[0] - c[0])), c[1], c[2])
        m_img = _crop(image, mirror, r_mir, fill)
        m_prob = _crop(prob, mirror, r_mir, 0.0)
        out[q] = (
            np.clip(peak_logit[q], *_LOGIT_CLIP), np.log1p(vol50[r["label"]] * vox_mm3),
            np.log1p(vol[r["label"]] * vox_mm3),
            i_min, i_min - med, med, iqr,
            *h1, *h2,
            dv + np.log(vox_mm3), de, db,
            min(float(depth[c]), 40.0), csf5,
            abs(rel[0]), rel[1], rel[2],
            float(m_img.min()) - med, float(m_prob.max()),
            sp[0], sp[-1])
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def describe_candidates(prob: np.ndarray, logodds: np.ndarray, pre, *,  # noqa: ANN001
                        threshold: float = 0.1, surface_mm: float = 0.0
                        ) -> tuple[np.ndarray, list[dict], TissueMaps, np.ndarray]:
    """The U-Net's candidates on the working grid of ``pre`` (a :class:`.preprocess.
    Preprocessed`) and their features: candidate label map and rows
    (:func:`.infer.extract_candidates` of ``prob > threshold``), the tissue maps of
    :func:`.postprocess.tissue_maps` (``surface_mm`` band) and :func:`candidate_features`.
    Shared by the plugin and the classifier's training so that both see the same features."""
    lab, rows = extract_candidates(prob, threshold=threshold, min_score=min(0.05, threshold))
    tissue = tissue_maps(pre.image, pre.mask, pre.work_mm, surface_mm=surface_mm)
    feats = candidate_features(pre.image, pre.mask, prob, logodds, lab, rows, csf=tissue.csf,
                               spacing_mm=pre.work_mm,
                               native_spacing_mm=tuple(float(v) for v in pre.spacing_ras))
    return lab, rows, tissue, feats


class CandidateClassifier(torch.nn.Module):
    """Standardisation + ``members`` small MLPs (``hidden`` units per layer; ``()`` = logistic
    regression) over :data:`FEATURES`; ``forward`` returns the members' mean log-odds of
    "a CMB"."""

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (16,),
                 members: int = 1) -> None:
        super().__init__()
        self.hidden = tuple(int(h) for h in hidden)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))

        def mlp() -> torch.nn.Sequential:
            layers: list[torch.nn.Module] = []
            width = n_features
            for h in self.hidden:
                layers += [torch.nn.Linear(width, h), torch.nn.LeakyReLU(0.01)]
                width = h
            layers.append(torch.nn.Linear(width, 1))
            return torch.nn.Sequential(*layers)

        self.nets = torch.nn.ModuleList([mlp() for _ in range(max(1, int(members)))])

    @property
    def members(self) -> int:
        return len(self.nets)

    def forward(self, x: torch.Tensor, member: int | None = None) -> torch.Tensor:
        z = (x - self.mean) / self.scale
        if member is not None:
            return self.nets[member](z)[:, 0]
        return torch.stack([net(z)[:, 0] for net in self.nets]).mean(0)

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(CMB) per row of ``x`` (float64)."""
        if not len(x):
            return np.zeros(0)
        self.eval()
        z = self(torch.as_tensor(np.asarray(x, np.float32)))
        return torch.sigmoid(z.double()).numpy()


def fit_classifier(x: np.ndarray, y: np.ndarray, *, hidden: tuple[int, ...] = (16,),
                   members: int = 1, epochs: int = 1500, lr: float = 0.01,
                   weight_decay: float = 1e-3, seed: int = 0) -> CandidateClassifier:
    """Fit :class:`CandidateClassifier` on features ``x`` and 0/1 labels ``y``: full-batch
    Adam on class-balanced binary cross-entropy; with ``members`` > 1 each member is fitted
    on its own bootstrap resample (bagging). Deterministic for a given ``seed``."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    if len(np.unique(y)) < 2:
        raise ValueError("the classifier needs candidates of both classes")
    g = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    clf = CandidateClassifier(x.shape[1], hidden, members)
    clf.mean.copy_(torch.as_tensor(x.mean(0)))
    clf.scale.copy_(torch.as_tensor(np.maximum(x.std(0), 1e-3)))
    for p in clf.nets.parameters():  # seeded init independent of the global RNG's history
        if p.dim() > 1:
            torch.nn.init.kaiming_uniform_(p, a=0.01, generator=g)
        else:
            torch.nn.init.zeros_(p)
    for m, net in enumerate(clf.nets):
        idx = np.arange(len(y)) if clf.members == 1 else rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            idx = np.arange(len(y))
        xt, yt = torch.as_tensor(x[idx]), torch.as_tensor(y[idx])
        pos = float(yt.mean())
        w = torch.where(yt > 0.5, torch.tensor(0.5 / pos), torch.tensor(0.5 / (1 - pos)))
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        clf.train()
        for _ in range(int(epochs)):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                clf(xt, member=m), yt, weight=w)
            loss.backward()
            opt.step()
    clf.eval()
    return clf


def component_scales(labels: np.ndarray, peaks: np.ndarray, scores: np.ndarray,
                     n_labels: int) -> np.ndarray:
    """Per-label factors (float32, ``n_labels`` entries, 0 for unlisted labels) that move
    component ``labels[q]``'s peak probability ``peaks[q]`` onto ``scores[q]``."""
    scale = np.zeros(int(n_labels), np.float32)
    peaks = np.asarray(peaks, float)
    if len(peaks):
        scale[np.asarray(labels, int)] = np.where(
            peaks > 0, np.asarray(scores, float) / np.maximum(peaks, 1e-12), 0.0)
    return scale


def rescore_map(prob: np.ndarray, labels: np.ndarray, rows: list[dict],
                scores: np.ndarray) -> np.ndarray:
    """The map whose component ``rows[q]['label']`` is rescaled so that its peak equals
    ``scores[q]`` (shape kept); voxels outside the listed components are 0."""
    scale = component_scales([r["label"] for r in rows], [r["score"] for r in rows], scores,
                             int(labels.max()) + 1)
    return (prob * scale[labels]).astype(np.float32)
