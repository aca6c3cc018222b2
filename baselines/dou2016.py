"""Dou et al. 2016: a two-stage 3D CNN cascade (screening FCN + discrimination CNN).

Reimplementation of Q. Dou, H. Chen, L. Yu, L. Zhao, J. Qin, D. Wang, V. C. Mok, L. Shi,
P.-A. Heng, "Automatic detection of cerebral microbleeds from MR images via 3D convolutional
neural networks", IEEE TMI 35(5):1182-1195, 2016, retrained in cmbbench
(``cmbbench train --method dou2016 --recipe dou2016-synth-v1``). Networks:
:mod:`cmbbench_baselines.dou2016_nets`; training: :mod:`cmbbench_baselines.dou2016_train`.

Pipeline (:meth:`Dou2016.predict`)
----------------------------------
1. **Working grid** (:mod:`cmbbench_baselines.grid`): the original works on the native voxel
   grid of its data (0.449 x 0.449 x 1.0 mm, 2 mm slices). Here each axis stays native when its
   spacing is within a factor 1.25 of the checkpoint's reference grid and is resampled to it
   otherwise; the shipped recipe's reference grid is 0.9 x 0.9 x 2.0 mm, the DOU grid binned
   2 x 2 x 2 (8x fewer voxels, for CPU training and inference; a 3 mm CMB spans ~3 voxels
   in-plane).
2. **Normalisation**: robust z-score (median, 1.4826 MAD) inside an image-derived foreground
   mask (:func:`cmbbench_baselines.log.foreground_mask`, no erosion), clipped to [-8, 8] (the
   paper: "normalised"; details ours).
3. **Screening** (:func:`~cmbbench_baselines.dou2016_nets.screen_volume`): the stage-1 network
   (trained on 16 x 16 x 10 patches) applied fully convolutionally to the mask's bounding box;
   score map of stride 2.
4. **Candidates** (:func:`screening_candidates`): local maxima of the score map (3 x 3 x 3
   score-map neighbourhood) with P(CMB) > ``threshold`` = 0.64 (the original demo's value),
   inside the mask, mapped back to the input voxel at the centre of their patch; at most
   ``max_candidates`` = 300 (highest scores; ours, a CPU bound -- the original had none).
5. **Discrimination** (:func:`~cmbbench_baselines.dou2016_nets.discriminate`): the stage-2
   network on 20 x 20 x 16 patches centred on the candidates; its P(CMB) is the score.
6. **Merging** (:func:`merge_close`): candidates closer than ``merge_vox`` = 10 voxels are
   merged, keeping the best-scoring one. Distances are measured in voxels of the original DOU
   grid (0.449 x 0.449 x 1.0 mm: 4.5 mm in-plane, 10 mm through-plane), so the rule means
   the same physical neighbourhood at every resolution.
7. **Output**: detections scoring >= ``min_score`` = 0.05, mapped to native voxels: the
   candidate table (``i, j, k, score, stage1``) and a probability map painting a ball of
   ``ball_mm`` = 1.5 mm radius with each score (capped at 0.999 so that the map is read as a
   probability map).

Training (:mod:`cmbbench_baselines.dou2016_train`): stage 1 on 16 x 16 x 10 patches (CMB
centres with jitter, flips and in-plane 90 degree rotations vs random brain positions); stage 1
is then run over the training scans and its **false positives** (local maxima > threshold with
no reference CMB within 5 mm, the cmbbench rule's distance, :func:`split_stage1`) are the hard
negatives of stage 2, trained on 20 x 20 x 16 patches; model selection on SYNTH-val.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from cmbbench.methods.api import Method, Prediction, Requirements, ScanInput

from .grid import GridRule, WorkGrid
from .log import (
    ball_labels,
    candidate_table,
    clean_image,
    foreground_mask,
    probability_from_labels,
    robust_normalise,
)
from .records import checkpoint_summary

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DOU_GRID_MM",
    "Dou2016",
    "merge_close",
    "mine_hard_negatives",
    "prepare_image",
    "screening_box",
    "screening_candidates",
    "split_stage1",
]

log = logging.getLogger(__name__)

#: Voxel spacing (mm) of the DOU data the original was developed on.
DOU_GRID_MM = (0.449, 0.449, 1.0)
DEFAULT_CHECKPOINT = Path(__file__).with_name("weights") / "dou2016-synth-v1.pt"
CLIP = 8.0


# ---------------------------------------------------------------------------------------------
# numpy steps (no torch)
# ---------------------------------------------------------------------------------------------

def prepare_image(image: np.ndarray, spacing_mm: Sequence[float], rule: GridRule
                  ) -> tuple[WorkGrid, np.ndarray, np.ndarray]:
    """Working grid, normalised working-grid image and foreground mask of a scan.

    Parameters
    ----------
    image
        Native image ``[i, j, k]`` (non-finite values are replaced by the finite median).
    spacing_mm
        Native voxel spacing (mm).
    rule
        The method's :class:`~cmbbench_baselines.grid.GridRule`.
    """
    img = clean_image(image)
    if img.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {img.shape}")
    grid = WorkGrid.for_scan(img.shape, spacing_mm, rule)
    work = grid.to_work(img)
    mask = foreground_mask(work, grid.work_spacing, erode_mm=0.0)
    norm = np.clip(robust_normalise(work, mask), -CLIP, CLIP).astype(np.float32)
    return grid, norm, mask


def screening_candidates(score_map: np.ndarray, *, threshold: float = 0.64,
                         mask: np.ndarray | None = None, max_candidates: int = 300,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 candidates: local maxima of the stride-2 score map above ``threshold``.

    Parameters
    ----------
    score_map
        Output of :func:`~cmbbench_baselines.dou2016_nets.screen_volume` (P(CMB), stride 2).
    threshold
        Candidates need a score strictly above it (original: 0.64).
    mask
        Optional working-grid (input) mask: candidates whose centre voxel is outside are dropped.
    max_candidates
        Keep at most this many, highest scores first.

    Returns
    -------
    centres, scores
        ``(N, 3)`` int working-grid voxel coordinates of the patch centres
        (:meth:`ScreeningFCN.centre_of <cmbbench_baselines.dou2016_nets.ScreeningFCN>`) and
        their scores, best first (ties in raster order).
    """
    s = np.asarray(score_map, dtype=np.float32)
    if s.size == 0:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.float32)
    mx = ndimage.maximum_filter(s, size=3, mode="constant", cval=-np.inf)
    peak = (s >= mx) & (s > threshold)
    # a plateau keeps its first voxel only
    lab, n = ndimage.label(peak, structure=np.ones((3, 3, 3), dtype=bool))
    idx = np.argwhere(peak)
    if n:
        _, first = np.unique(lab[tuple(idx.T)], return_index=True)
        idx = idx[np.sort(first)]
    centres = 2 * idx + np.array((8, 8, 5), dtype=np.int64)
    scores = s[tuple(idx.T)] if len(idx) else np.zeros(0, dtype=np.float32)
    if mask is not None and len(centres):
        inside = np.all(centres < np.array(mask.shape), axis=1)
        centres, scores = centres[inside], scores[inside]
        keep = mask[tuple(centres.T)]
        centres, scores = centres[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:max_candidates]
    return centres[order], scores[order].astype(np.float32)


def screening_box(mask: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """The box stage 1 is run on: the mask's bounding box widened by half a screening patch
    (so that border voxels can be patch centres), starting on an even voxel.

    Returns
    -------
    start, box
        Start voxel of the box and the box as slices of the working grid.
    """
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - np.array((8, 8, 5)), 0)
    lo -= lo % 2
    hi = np.minimum(idx.max(axis=0) + np.array((9, 9, 6)), mask.shape)
    return lo, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def split_stage1(centres: np.ndarray, references: np.ndarray, spacing_mm: Sequence[float], *,
                 match_mm: float = 5.0) -> np.ndarray:
    """Which stage-1 candidates are false positives: no reference CMB within ``match_mm``.

    Parameters
    ----------
    centres
        ``(N, 3)`` candidate voxel coordinates (working grid).
    references
        ``(M, 3)`` reference CMB centres, same grid (may be empty).
    spacing_mm
        Voxel spacing (mm) of that grid.
    match_mm
        Euclidean distance (mm) within which a candidate counts as a hit (default 5 mm, the
        distance of cmbbench's default matching rule; not one-to-one: several candidates may
        hit one CMB, none of them is a false positive).

    Returns
    -------
    numpy.ndarray
        Boolean ``(N,)``: True where the candidate is a false positive (a hard negative).
    """
    c = np.atleast_2d(np.asarray(centres, dtype=np.float64)).reshape(-1, 3)
    r = np.atleast_2d(np.asarray(references, dtype=np.float64)).reshape(-1, 3)
    if len(r) == 0:
        return np.ones(len(c), dtype=bool)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    d = np.sqrt((((c[:, None, :] - r[None, :, :]) * sp) ** 2).sum(axis=-1))
    return d.min(axis=1) > match_mm


def mine_hard_negatives(score_map: np.ndarray, references: np.ndarray,
                        spacing_mm: Sequence[float], *, offset: Sequence[int] = (0, 0, 0),
                        threshold: float = 0.64, mask: np.ndarray | None = None,
                        max_candidates: int = 300, match_mm: float = 5.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 false positives of one scan: the hard negatives of stage 2.

    The stage-1 candidates of ``score_map`` (:func:`screening_candidates`, shifted by
    ``offset`` voxels when the map was computed on a sub-volume starting there) are split by
    :func:`split_stage1` against the reference CMB centres.

    Returns
    -------
    hard, hits
        ``(H, 3)`` candidates with no reference CMB within ``match_mm`` and ``(N - H, 3)``
        candidates that hit one (working-grid voxels).
    """
    centres, _ = screening_candidates(score_map, threshold=threshold, mask=mask,
                                      max_candidates=max_candidates)
    centres = centres + np.asarray(offset, dtype=np.int64)
    fp = split_stage1(centres, references, spacing_mm, match_mm=match_mm)
    return centres[fp], centres[~fp]


def merge_close(centres: np.ndarray, scores: np.ndarray, spacing_mm: Sequence[float], *,
                merge_vox: float = 10.0, reference_mm: Sequence[float] = DOU_GRID_MM
                ) -> np.ndarray:
    """Greedy merging of detections closer than ``merge_vox`` voxels of the reference grid.

    The best-scoring detection is kept and every other one closer than ``merge_vox`` (distance
    in voxels of ``reference_mm``, i.e. ``sqrt(sum((d_mm / reference_mm)^2))``) is dropped;
    then the next best remaining one, and so on.

    Returns
    -------
    numpy.ndarray
        Indices into ``centres`` of the kept detections, best first.
    """
    c = np.atleast_2d(np.asarray(centres, dtype=np.float64)).reshape(-1, 3)
    sc = np.asarray(scores, dtype=np.float64)
    scale = np.asarray(spacing_mm, dtype=np.float64) / np.asarray(reference_mm, np.float64)
    pos = c * scale  # in reference-grid voxels
    order = np.argsort(-sc, kind="stable")
    alive = np.ones(len(c), dtype=bool)
    kept = []
    for n in order:
        if not alive[n]:
            continue
        kept.append(n)
        d = np.sqrt(((pos - pos[n]) ** 2).sum(axis=1))
        alive &= d >= merge_vox
    return np.asarray(kept, dtype=np.int64)


def _grid_rule(config: dict) -> GridRule:
    g = config.get("grid", {})
    return GridRule(tuple(float(v) for v in g.get("grid_mm", (0.9, 0.9, 2.0))),
                    float(g.get("tolerance", 1.25)))


# ---------------------------------------------------------------------------------------------
# the plugin
# ---------------------------------------------------------------------------------------------

class Dou2016(Method):
    """Dou et al. 2016 two-stage 3D CNN cascade, retrained in cmbbench.

    Keyword parameters (all optional)
    ---------------------------------
    checkpoint : str
        Checkpoint bundle (default: the shipped ``weights/dou2016-synth-v1.pt``), sha256-checked.
    threshold : float
        Stage-1 candidate threshold (default 0.64, the original's).
    max_candidates : int
        Most stage-1 candidates per scan (default 300).
    merge_vox : float
        Merging distance in voxels of the DOU grid (default 10).
    min_score : float
        Detections scoring below it are not reported (default 0.05).
    ball_mm : float
        Radius (mm) of the ball painted per detection in the probability map (default 1.5).
    threads : int
        torch threads (0: leave as set by the runner).
    """

    name = "dou2016"
    version = "1"
    citation = ("Dou Q, Chen H, Yu L, Zhao L, Qin J, Wang D, Mok VC, Shi L, Heng PA. Automatic "
                "detection of cerebral microbleeds from MR images via 3D convolutional neural "
                "networks. IEEE Trans Med Imaging 2016;35(5):1182-1195 (reimplemented and "
                "retrained in cmbbench)")
    description = (
        "Two-stage 3D CNN cascade. Stage 1: a screening network (conv 5x5x3, max-pool 2, conv "
        "3x3x3, FC as a 4x4x2 conv, 2 classes; valid convolutions) trained on 16x16x10-voxel "
        "patches and applied fully convolutionally to the whole volume (score map of stride "
        "2); local maxima (3x3x3) with P > 0.64 are candidates (at most 300 per scan). Stage "
        "2: a discrimination CNN (conv 5x5x3, pool 2, conv 3x3x3, conv 3x3x1, FC, FC, 2 "
        "classes) on 20x20x16-voxel patches at the candidates, trained with stage 1's false "
        "positives (no reference CMB within 5 mm) as hard negatives; its probability is the "
        "score. Detections closer than 10 voxels of the original DOU grid (0.449 x 0.449 x "
        "1.0 mm, i.e. 4.5 mm in-plane, 10 mm through-plane) are merged, keeping the best. "
        "Resolution rule: each array axis stays on its native grid when its spacing is within "
        "a factor 1.25 of the checkpoint's reference grid, else it is resampled to it (linear, "
        "Gaussian anti-aliasing when downsampling); the shipped checkpoint's reference grid is "
        "0.9 x 0.9 x 2.0 mm (the DOU grid binned 2x2x2; axis k = slice axis). Input: robust "
        "z-score inside an image-derived foreground mask, clipped to [-8, 8]. Output: balls "
        "of 1.5 mm painted with the detection scores, and the detections as a candidate table.")
    limitations = (
        "Layer widths of the shipped checkpoint are narrower than the paper's (stage 1: 32/32 "
        "channels, FC 64 instead of 64/64/150; stage 2: 32 channels, FC 96/48 instead of "
        "64, 500/100) and it was trained for minutes on 2 shared CPU cores with Adam instead of "
        "SGD with momentum, on synthetic CMBs only (SYNTH-train), so it is a weak "
        "reproduction of the method, not of its published performance. The reference grid is "
        "2x coarser than the original's (0.9 vs 0.45 mm in-plane): CMBs under ~2 mm are near "
        "the resolution limit and localisation is to ~1 voxel. Layer structure follows the "
        "commonly reproduced table of the paper (not checked against TMI Table I). The 0.64 "
        "stage-1 threshold is the original's, not re-tuned for this checkpoint. Candidates are "
        "searched only inside an image-derived foreground mask, the cap of 300 candidates per "
        "scan is ours. The 10-voxel merge can fuse two real CMBs closer than 4.5 mm in-plane. "
        "Array axis 2 is assumed to be the slice axis. No phase information is used, so "
        "calcifications and vessels seen end-on remain hard negatives to learn.")
    requirements = Requirements(sequences=("SWI", "T2S"), trainable=True, torch=True)

    def __init__(self, checkpoint: str | None = None, threshold: float = 0.64,
                 max_candidates: int = 300, merge_vox: float = 10.0, min_score: float = 0.05,
                 ball_mm: float = 1.5, threads: int = 0, **params: object) -> None:
        if params:
            raise TypeError(f"unknown parameter(s): {', '.join(params)}")
        super().__init__(checkpoint=checkpoint, threshold=float(threshold),
                         max_candidates=int(max_candidates), merge_vox=float(merge_vox),
                         min_score=float(min_score), ball_mm=float(ball_mm),
                         threads=int(threads))
        self.checkpoint = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
        self.threshold = float(threshold)
        self.max_candidates = int(max_candidates)
        self.merge_vox = float(merge_vox)
        self.min_score = float(min_score)
        self.ball_mm = float(ball_mm)
        self.threads = int(threads)
        self.screen = None
        self.discr = None
        self.config: dict = {}
        self.meta: dict = {}

    # -- weights ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the checkpoint bundle (sha256-checked, ``weights_only=True``) once."""
        import torch

        from .deep_common import load_bundle, load_state
        from .dou2016_nets import DiscriminationCNN, ScreeningFCN

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        if self.screen is not None:
            return
        state, meta = load_bundle(self.checkpoint)
        cfg = state["config"]
        self.screen = load_state(ScreeningFCN(**cfg["screen"]), state["nets"]["screen"],
                                 self.checkpoint)
        self.discr = load_state(DiscriminationCNN(**cfg["discr"]), state["nets"]["discr"],
                                self.checkpoint)
        self.config, self.meta = cfg, meta

    @property
    def rule(self) -> GridRule:
        return _grid_rule(self.config)

    # -- prediction ------------------------------------------------------------------------

    def detect_work(self, norm: np.ndarray, mask: np.ndarray, spacing_mm: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cascade on a prepared working-grid image.

        Returns
        -------
        centres, scores, stage1
            Merged detections (working-grid voxels, ``(N, 3)``), their stage-2 scores and
            their stage-1 scores, best first (before the ``min_score`` cut).
        """
        from .dou2016_nets import discriminate, screen_volume

        self.load()
        if not mask.any():
            return np.zeros((0, 3), np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
        lo, box = screening_box(mask)
        smap = screen_volume(self.screen, norm[box])
        centres, s1 = screening_candidates(smap, threshold=self.threshold, mask=mask[box],
                                           max_candidates=self.max_candidates)
        centres = centres + lo
        if not len(centres):
            return centres, np.zeros(0, np.float32), s1
        s2 = discriminate(self.discr, norm, centres)
        keep = merge_close(centres, s2, spacing_mm, merge_vox=self.merge_vox)
        return centres[keep], s2[keep], s1[keep]

    def predict(self, scan: ScanInput) -> Prediction:
        """Detect CMBs on one scan (pipeline in the module docstring)."""
        t0 = time.perf_counter()
        self.load()
        grid, norm, mask = prepare_image(scan.image, scan.spacing_mm, self.rule)
        centres, s2, s1 = self.detect_work(norm, mask, grid.work_spacing)
        ok = s2 >= self.min_score
        centres, s2, s1 = centres[ok], s2[ok], s1[ok]
        shape = grid.native_shape
        native = grid.work_to_native(centres) if len(centres) else np.zeros((0, 3))
        native = np.clip(native, 0, np.array(shape) - 1)
        scores = np.minimum(s2.astype(np.float64), 0.999)
        vox = np.rint(native).astype(np.int64)
        labels = ball_labels(shape, grid.native_spacing, vox, [self.ball_mm] * len(vox))
        prob = probability_from_labels(labels, scores)
        table = candidate_table(native, scores, stage1=s1.astype(np.float64))
        log.debug("dou2016: %s in %.1f s, %d detection(s)", scan.scan_id,
                  time.perf_counter() - t0, len(table))
        return Prediction(probability=prob, candidates=table)

    def info(self) -> dict:
        out = super().info()
        out["resolution_rule"] = GridRule((0.9, 0.9, 2.0), 1.25).describe() + (
            " (reference grid of the shipped checkpoint; a checkpoint records its own)")
        out["checkpoint"] = checkpoint_summary(self.checkpoint)
        return out

    @classmethod
    def train_recipe(cls, recipe: str, **kwargs: object) -> Path:
        """``cmbbench train --method dou2016``: see :func:`.dou2016_train.train`."""
        from .dou2016_train import train

        return train(recipe, **kwargs)

