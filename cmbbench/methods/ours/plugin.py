"""The ``ours`` method plugin: prediction on the scan's native grid with a checkpoint
(loaded by :mod:`.checkpoint`: sha256-checked, ``weights_only=True``), and the training entry
point used by ``cmbbench train --method ours`` (:mod:`.train`, :mod:`.train_classifier`).

Pipeline of :meth:`Ours.predict`: :func:`.preprocess.preprocess` (validation, RAS, 1 mm
isotropic working grid, image-derived brain mask, robust normalisation) ->
:func:`.infer.sliding_window` (96^3 tiles, >= 15 % overlap, Gaussian weights, optional flip TTA)
-> components of ``p > threshold`` scored by their peak probability, or, with a checkpoint that
holds a second-stage classifier (:mod:`.classifier`), by that classifier ->
location post-processing (:mod:`.postprocess`; components outside parenchyma are zeroed) ->
the probability map resampled back to the native grid, plus a candidate table in native voxels.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...errors import ConfigurationError
from ..api import Method, Prediction, Requirements, ScanInput
from . import DEFAULT_CHECKPOINT
from .checkpoint import load_ours
from .classifier import CandidateClassifier, describe_candidates, rescore_map
from .infer import extract_candidates, sliding_window, tempered, tempered_threshold
from .postprocess import keep_candidate, parse_rules, tissue_maps
from .preprocess import preprocess, to_native, work_to_native_index
from .unet import UNet3D

__all__ = ["INFER_DEFAULTS", "Ours", "operating_remap"]

log = logging.getLogger(__name__)

#: voxel scores: mean probability, or tempered mean log-odds (:func:`.infer.tempered`)
SCORES = ("prob", "logit")
# inference settings of a checkpoint whose JSON records none (``recipe.infer``): candidate
# probability threshold, sliding-window tile edge (working-grid voxels), tile overlap (fraction)
INFER_DEFAULTS = {"threshold": 0.1, "patch": 96, "overlap": 0.15}


def operating_remap(p: np.ndarray | float, threshold: float | None) -> np.ndarray:
    """Monotone piecewise-linear map of probabilities with ``threshold -> 0.5``.

    ``[0, t] -> [0, 0.5]`` and ``[t, 1] -> [0.5, 1]`` linearly; the identity when
    ``threshold`` is None or 0.5. Order (hence FROC, CPM, AP) is preserved; what changes is
    which candidates count at the benchmark's default operating threshold of 0.5.
    """
    # a Gaussian-weighted average of probabilities may exceed 1 by a rounding error, which a
    # threshold near 1 would magnify past 1
    # (float32 throughout: a whole-scan map, and p - t is exact for p near t)
    p = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)
    if threshold is None or abs(float(threshold) - 0.5) < 1e-9:
        return p
    t = np.float32(np.clip(threshold, 1e-6, 1 - 1e-6))  # saturated networks: near 1
    q = np.where(p < t, p * np.float32(0.5 / float(t)),
                 (p - t) * np.float32(0.5 / (1.0 - float(t))) + np.float32(0.5))
    return np.clip(q, 0.0, 1.0).astype(np.float32, copy=False)


class Ours(Method):
    """Sequence-agnostic 3D U-Net with location-based post-processing."""

    name = "ours"
    version = "8"
    citation = ("del Pozo Lerida et al., Automatic Detection of Cerebral Microbleeds: a "
                "Clinically Robust Deep Learning Framework (poster); re-implemented and trained "
                "in cmbbench")
    description = (
        "3D U-Net (instance norm, leaky ReLU) on a 1 mm isotropic RAS working grid "
        "with an image-derived brain mask and robust (median/MAD) normalisation; trained on "
        "SYNTH-train with focal Tversky + weighted CE on CMB-centred and hard-negative patches, "
        "synthetic CMBs rendered with the generator's physics inserted on the fly, and heavy "
        "spatial, intensity, resolution and contrast augmentation; sliding-window inference "
        "with Gaussian weighting; components re-scored by a second-stage candidate "
        "classifier (10 bagged MLPs on 25 shape, contrast, location and acquisition features, "
        "trained on the U-Net's candidates on SYNTH-train2, SYNTH-train3 and SYNTH-train4, "
        "480 scans the U-Net never saw), "
        "remapped so that the operating threshold chosen on SYNTH-val lands on 0.5; location "
        "post-processing (drop components outside the brain mask, near its surface or in "
        "CSF), each rule on or off as chosen on SYNTH-val (ours-synth-v8: the brain-mask rule "
        "only).")
    limitations = (
        "Trained on synthetic data only (the shipped checkpoint); 1 mm working grid (the "
        "poster uses 0.5 mm) so CMBs under ~2 mm are near the resolution limit; voxel sizes "
        "beyond 6.5 mm or coarser than 1.5 mm in-plane are outside the training envelope "
        "(handled with a warning); voxel sizes outside [0.1, 10] mm, non-3D images and "
        "all-NaN images are refused.")
    requirements = Requirements(sequences=("SWI", "T2S"), trainable=True, torch=True)

    def __init__(self, checkpoint: str | None = None, tta: bool = False,
                 postprocess: bool | None = None, threshold: float | None = None,
                 patch: int | None = None, overlap: float | None = None, threads: int = 0,
                 surface_mm: float | None = None,
                 operating_threshold: float | None = None, rules: str | None = None,
                 score: str | None = None, classifier: bool | None = None,
                 **params: object) -> None:
        super().__init__(checkpoint=checkpoint, tta=tta, postprocess=postprocess,
                         threshold=threshold, patch=patch, overlap=overlap, threads=threads,
                         surface_mm=surface_mm, operating_threshold=operating_threshold,
                         rules=rules, score=score, classifier=classifier, **params)
        if params:
            raise TypeError(f"unknown parameter(s): {', '.join(params)}")
        self.checkpoint = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
        self.tta = _as_bool(tta)
        self.postprocess = None if postprocess is None else _as_bool(postprocess)
        # None: the inference settings the checkpoint was calibrated with (``recipe.infer`` in
        # its JSON), else INFER_DEFAULTS
        self._threshold = None if threshold is None else float(threshold)
        self._patch = None if patch is None else int(patch)
        self._overlap = None if overlap is None else float(overlap)
        self.threads = int(threads)
        # None: the checkpoint's validated choice (``operating`` in its JSON), else 2 mm / 0.5
        self._surface_mm = None if surface_mm is None else float(surface_mm)
        self._operating = None if operating_threshold is None else float(operating_threshold)
        if score is not None and str(score) not in SCORES:
            raise ConfigurationError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
        self._score = None if score is None else str(score)
        try:
            self._rules = None if rules is None else parse_rules(rules)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        # None: the checkpoint's validated choice (its second-stage classifier, if any)
        self._classifier = None if classifier is None else _as_bool(classifier)
        self.model: UNet3D | None = None
        self.clf: CandidateClassifier | None = None
        self.meta: dict = {}

    def load(self) -> None:
        if self.model is None:
            self.model, self.clf, self.meta = load_ours(self.checkpoint)
            if self._classifier and self.clf is None:
                raise ConfigurationError("classifier=true, but this checkpoint has no "
                                         "second-stage classifier", self.checkpoint)
            if self._score == "logit" and self.use_classifier:
                raise ConfigurationError("score=logit applies to the U-Net's own scores; the "
                                         "second-stage classifier scores candidates itself "
                                         "(add classifier=false)", self.checkpoint)
        if self.threads > 0:
            torch.set_num_threads(self.threads)

    def _infer_setting(self, key: str) -> float:
        recorded = self.meta.get("recipe", {}).get("infer") or {}
        return float(recorded.get(key, INFER_DEFAULTS[key]))

    @property
    def threshold(self) -> float:
        """Probability above which connected voxels form a candidate (default: the one the
        checkpoint's operating threshold and classifier were calibrated with, else 0.1)."""
        return self._threshold if self._threshold is not None else self._infer_setting(
            "threshold")

    @property
    def patch(self) -> int:
        """Sliding-window tile edge (working-grid voxels; default: the checkpoint's, else
        96)."""
        return self._patch if self._patch is not None else int(self._infer_setting("patch"))

    @property
    def overlap(self) -> float:
        """Sliding-window tile overlap (fraction of the tile; default: the checkpoint's, else
        0.15)."""
        return self._overlap if self._overlap is not None else self._infer_setting(
            "overlap")

    @property
    def use_classifier(self) -> bool:
        """Whether candidates are re-scored by the checkpoint's second-stage classifier
        (default: the choice made on its calibration scans)."""
        if self.clf is None:
            return False
        if self._classifier is not None:
            return self._classifier
        return bool((self.meta.get("operating") or {}).get("classifier", True))

    @property
    def use_postprocess(self) -> bool:
        """Whether the location rules drop candidates (default: the checkpoint's validated
        choice, else on)."""
        if self.postprocess is not None:
            return self.postprocess
        return bool((self.meta.get("operating") or {}).get("postprocess", True))

    @property
    def surface_mm(self) -> float:
        """Width (mm) of the brain-surface band whose candidates are dropped (0: none)."""
        if self._surface_mm is not None:
            return self._surface_mm
        return float((self.meta.get("operating") or {}).get("surface_mm", 2.0))

    @property
    def rules(self) -> tuple[str, ...]:
        """Location rules applied when post-processing is on (default: the checkpoint's
        validated choice, else all of :data:`.postprocess.RULES`)."""
        if self._rules is not None:
            return self._rules
        return parse_rules((self.meta.get("operating") or {}).get("rules"))

    @property
    def operating_threshold(self) -> float | None:
        """Probability mapped to score 0.5 (None: no remapping)."""
        if self._operating is not None:
            return self._operating
        op = self.meta.get("operating") or {}
        if "classifier" in op and self.use_classifier != bool(op["classifier"]):
            # the other variant of a classifier checkpoint: its own calibrated threshold
            other = (op.get("variants") or {}).get("classifier" if self.use_classifier
                                                    else "unet")
            if other:
                return other["threshold"]
        return op.get("threshold")

    @property
    def score(self) -> str:
        """How voxels are scored: ``prob`` (mean probability over tiles) or ``logit``
        (sigmoid of the mean log-odds / :data:`.infer.LOGIT_TEMPERATURE`, which does not
        saturate); default: the checkpoint's validated choice, else ``prob``."""
        if self._score is not None:
            return self._score
        return str((self.meta.get("operating") or {}).get("score", "prob"))

    def _level(self, p: float) -> float:
        """Probability ``p`` in the units of the score map (thresholds select the same voxels
        under either score)."""
        return tempered_threshold(p) if self.score == "logit" else float(p)

    @property
    def work_mm(self) -> float:
        return float(self.meta.get("recipe", {}).get("work_mm", 1.0))

    def infer_work(self, pre) -> np.ndarray:
        """Raw score map on the working grid (sliding window, optional flip TTA), in
        :attr:`score` units."""
        self.load()
        if self.score == "logit":
            return tempered(sliding_window(self.model, pre.image, pre.mask, patch=self.patch,
                                           overlap=self.overlap, tta=self.tta, output="logit"))
        return sliding_window(self.model, pre.image, pre.mask, patch=self.patch,
                              overlap=self.overlap, tta=self.tta)

    def postprocess_work(self, raw: np.ndarray, pre) -> tuple[np.ndarray, list[dict], np.ndarray]:
        """Candidates of a raw working-grid map and the location rules: the map after
        post-processing (when enabled), every candidate row (with ``kept``/``reason``), and the
        map before post-processing."""
        lab, rows = extract_candidates(raw, threshold=self._level(self.threshold),
                                       min_score=self._level(min(0.05, self.threshold)))
        tissue = tissue_maps(pre.image, pre.mask, pre.work_mm, surface_mm=self.surface_mm)
        before = raw.copy()
        before[raw < self._level(0.5 * self.threshold)] = 0
        return self._apply_rules(lab, rows, before, tissue)

    def classify_work(self, prob: np.ndarray, logodds: np.ndarray, pre
                      ) -> tuple[np.ndarray, list[dict], np.ndarray]:
        """As :meth:`postprocess_work`, with each candidate re-scored by the second-stage
        classifier (``score``; the U-Net's peak probability stays as ``unet_score``) and its
        component rescaled so that its peak equals the new score; voxels outside the
        candidates are 0."""
        lab, rows, tissue, feats = describe_candidates(prob, logodds, pre,
                                                       threshold=self.threshold,
                                                       surface_mm=self.surface_mm)
        scores = self.clf.predict(feats)
        before = rescore_map(prob, lab, rows, scores)
        for r, s in zip(rows, scores):
            r["unet_score"], r["score"] = r["score"], float(s)
        return self._apply_rules(lab, rows, before, tissue)

    def _apply_rules(self, lab: np.ndarray, rows: list[dict], before: np.ndarray,
                     tissue) -> tuple[np.ndarray, list[dict], np.ndarray]:  # noqa: ANN001
        """Mark each row ``kept``/``reason`` by the location rules and zero the dropped
        components (when post-processing is on)."""
        for r in rows:
            keep, why = keep_candidate(tissue, (r["i"], r["j"], r["k"]), rules=self.rules)
            r["kept"], r["reason"] = bool(keep), why
        after = before
        if self.use_postprocess and rows:
            lut = np.zeros(int(lab.max()) + 1, bool)
            for r in rows:
                lut[r["label"]] = not r["kept"]
            after = before.copy()
            after[lut[lab]] = 0
        return after, rows, before

    def predict_work(self, pre) -> tuple[np.ndarray, list[dict], np.ndarray]:
        """:meth:`infer_work` then :meth:`postprocess_work`; with the second-stage classifier,
        one sliding-window pass for probabilities and log-odds then :meth:`classify_work`."""
        self.load()
        if self.use_classifier:
            prob, logodds = sliding_window(self.model, pre.image, pre.mask, patch=self.patch,
                                           overlap=self.overlap, tta=self.tta, output="both")
            return self.classify_work(prob, logodds, pre)
        return self.postprocess_work(self.infer_work(pre), pre)

    def to_native(self, prob: np.ndarray, rows: list[dict], pre,  # noqa: ANN001
                  postprocess: bool | None = None) -> tuple[np.ndarray, pd.DataFrame]:
        """Working-grid map + candidate rows -> native-grid map and candidate table (each
        candidate's peak voxel carries its score, so that no candidate is lost to
        interpolation)."""
        pp = self.use_postprocess if postprocess is None else postprocess
        native = np.clip(to_native(prob, pre, order=1), 0, 1).astype(np.float32)
        kept = [r for r in rows if r["kept"] or not pp]
        if not kept:
            return native, pd.DataFrame(columns=["i", "j", "k", "score", "location"])
        ijk = work_to_native_index(np.array([[r["i"], r["j"], r["k"]] for r in kept]), pre)
        ijk = np.clip(np.round(ijk), 0, np.array(pre.native_shape) - 1).astype(int)
        cands = pd.DataFrame({"i": ijk[:, 0], "j": ijk[:, 1], "k": ijk[:, 2],
                              "score": [r["score"] for r in kept],
                              "location": [r["reason"] for r in kept]})
        for (i, j, k), sc in zip(ijk, cands["score"]):
            native[i, j, k] = max(native[i, j, k], sc)
        return native, cands

    def predict(self, scan: ScanInput) -> Prediction:
        t0 = time.perf_counter()
        self.load()
        pre = preprocess(scan.image, scan.affine, work_mm=self.work_mm)
        prob, rows, _ = self.predict_work(pre)
        native, cands = self.to_native(prob, rows, pre)
        native = operating_remap(native, self.operating_threshold)
        if len(cands):
            cands["score"] = operating_remap(cands["score"].to_numpy(float),
                                             self.operating_threshold).astype(float)
        log.debug("ours: %s in %.1f s, %d candidate(s)", scan.scan_id,
                  time.perf_counter() - t0, len(cands))
        return Prediction(probability=native, candidates=cands)

    @classmethod
    def train_recipe(cls, recipe: str, **kwargs: object) -> Path:
        """``cmbbench train --method ours``: see :func:`.train.train`."""
        from .train import train

        return train(recipe, **kwargs)


def _as_bool(v: object) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)
