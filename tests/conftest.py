"""Shared test helpers: build tiny scoring cases from spheres placed on purpose."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from cmbbench.examples import affine_for, sphere
from cmbbench.geometry import voxel_sizes
from cmbbench.harmonize import lesions_from_labels
from cmbbench.matching import get_rule
from cmbbench.scoring import score_case


@dataclass
class Case:
    """A scan with reference spheres and predicted constant-probability spheres."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    ref_labels: np.ndarray
    lesions: pd.DataFrame
    prob: np.ndarray

    def score(self, rule: str = "cmbbench", **overrides: object) -> pd.DataFrame:
        res = score_case(scan_id="s", lesions=self.lesions, image_shape=self.shape,
                         image_affine=self.affine, rule=get_rule(rule, **overrides),
                         ref_labels=self.ref_labels, prediction=self.prob)
        return res.table

    def counts(self, rule: str = "cmbbench", **overrides: object) -> dict[str, int]:
        return outcome_counts(self.score(rule, **overrides))


def outcome_counts(table: pd.DataFrame) -> dict[str, int]:
    ref = table[table["kind"] == "reference"]
    cand = table[table["kind"] == "candidate"]
    return {
        "tp": int((ref["outcome"] == "TP").sum()),
        "fn": int((ref["outcome"] == "FN").sum()),
        "tp_pred": int((cand["outcome"] == "TP").sum()),
        "fp": int((cand["outcome"] == "FP").sum()),
        "ignored": int((cand["outcome"] == "ignored").sum()),
        "merged": int((cand["outcome"] == "merged").sum()),
    }


def make_case(refs: list[tuple[tuple[float, float, float], float]],
              preds: list[tuple[tuple[float, float, float], float, float]], *,
              shape: tuple[int, int, int] = (40, 40, 40),
              spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
              orientation: str = "RAS") -> Case:
    """refs: (centre_vox, radius_mm); preds: (centre_vox, radius_mm, probability)."""
    affine = affine_for(spacing, orientation, shape)
    sp = voxel_sizes(affine)
    labels = np.zeros(shape, dtype=np.uint32)
    for n, (c, r) in enumerate(refs, start=1):
        labels[sphere(shape, c, r, sp)] = n
    prob = np.zeros(shape, dtype=np.float32)
    for c, r, p in preds:
        ball = sphere(shape, c, r, sp)
        prob[ball] = np.maximum(prob[ball], p)
    lesions = lesions_from_labels(labels, affine, scan_id="s", mask_source="rater")
    return Case(shape, affine, labels, lesions, prob)


@pytest.fixture
def case_factory():
    return make_case


@pytest.fixture(scope="session")
def synth_scan():
    """One generated SYNTH scan (2.5 mm voxels, 3 T SWI, 30 CMBs, the three MARS classes equally
    likely): a realistic brain with known lesions and their true MARS locations (``.lesions``).
    Shared by the loader round-trip and the atlas-location tests (about 4 s to generate)."""
    import dataclasses

    from cmbbench.synth.anatomy import load_atlas
    from cmbbench.synth.generator import generate_scan
    from cmbbench.synth.recipe import load_recipe

    recipe = dataclasses.replace(load_recipe("SYNTH-val"),
                                 location_weights={"lobar": 1.0, "deep": 1.0,
                                                   "infratentorial": 1.0})
    return generate_scan(recipe, 0, atlas=load_atlas(),
                         overrides={"n_cmb": 30, "inplane_mm": 2.5, "slice_thickness_mm": 2.5,
                                    "gap_mm": 0.0, "protocol": "swi_3t_3d"})
