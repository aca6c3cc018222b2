"""Harmonization primitives: instances, lesion attributes, derived masks, candidates."""

from __future__ import annotations

import numpy as np
import pytest

from cmbbench.errors import ConfigurationError, InvalidValuesError
from cmbbench.examples import affine_for, sphere
from cmbbench.harmonize import (
    GrowRule,
    candidates_from_probability,
    check_probability,
    grow_from_points,
    instance_stats,
    label_instances,
    lesions_from_labels,
    lesions_from_points,
)


@pytest.mark.parametrize(
    "offset, expected",
    [
        ((1, 0, 0), {6: 1, 18: 1, 26: 1}),  # face neighbours
        ((1, 1, 0), {6: 2, 18: 1, 26: 1}),  # edge neighbours
        ((1, 1, 1), {6: 2, 18: 2, 26: 1}),  # corner neighbours
    ],
)
def test_connectivity_is_explicit(offset, expected) -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[2, 2, 2] = True
    mask[2 + offset[0], 2 + offset[1], 2 + offset[2]] = True
    for conn, n in expected.items():
        assert label_instances(mask, connectivity=conn)[1] == n


def test_unknown_connectivity_is_rejected() -> None:
    with pytest.raises(ConfigurationError):
        label_instances(np.zeros((3, 3, 3)), connectivity=8)


def test_lesion_attributes_on_anisotropic_lps_grid() -> None:
    shape = (30, 30, 10)
    spacing = (0.5, 0.5, 2.0)
    affine = affine_for(spacing, "LPS", shape)
    labels = np.zeros(shape, dtype=np.uint16)
    labels[10:14, 5:7, 3:4] = 4  # a 4x2x1 box: 8 voxels, centroid (11.5, 5.5, 3)
    labels[20, 20, 8] = 9
    table = lesions_from_labels(labels, affine, scan_id="x")
    assert table["lesion_id"].tolist() == [4, 9]
    box = table.iloc[0]
    assert box.n_voxels == 8
    assert box.volume_mm3 == pytest.approx(8 * 0.5 * 0.5 * 2.0)
    assert box.diameter_mm == pytest.approx((6 * 4.0 / np.pi) ** (1 / 3))
    assert [box.i, box.j, box.k] == pytest.approx([11.5, 5.5, 3.0])
    world = affine @ np.array([11.5, 5.5, 3.0, 1.0])
    assert [box.x_mm, box.y_mm, box.z_mm] == pytest.approx(list(world[:3]))
    # LPS: i increases to the left, so x decreases with i
    assert box.x_mm > table.iloc[1].x_mm
    st = instance_stats(labels)
    assert st.bbox[0].tolist() == [10, 5, 3, 13, 6, 3]


def test_sphere_volume_matches_geometry() -> None:
    affine = affine_for((1.0, 1.0, 1.0), "RAS", (40, 40, 40))
    labels = sphere((40, 40, 40), (20, 20, 20), 6.0).astype(np.uint8)
    row = lesions_from_labels(labels, affine, scan_id="x").iloc[0]
    assert row.volume_mm3 == pytest.approx(4 / 3 * np.pi * 6.0 ** 3, rel=0.03)
    assert row.diameter_mm == pytest.approx(12.0, rel=0.02)


def _dark_sphere_image(shape, centre, radius_mm, spacing, seed=0, dark=200.0):
    rng = np.random.default_rng(seed)
    img = 1000.0 + 10.0 * rng.standard_normal(shape)
    ball = sphere(shape, centre, radius_mm, spacing)
    img[ball] = dark
    return img, ball


def test_region_growing_recovers_a_dark_sphere() -> None:
    shape, spacing = (40, 40, 20), (0.5, 0.5, 1.0)
    affine = affine_for(spacing, "RAS", shape)
    img, ball = _dark_sphere_image(shape, (20, 20, 10), 1.5, spacing)
    # annotation one voxel off centre: the seed snaps to the darkest neighbour
    labels = grow_from_points(img, affine, np.array([[21.0, 20.0, 10.0]]))
    grown = labels == 1
    dice = 2 * (grown & ball).sum() / (grown.sum() + ball.sum())
    assert dice > 0.95


def test_region_growing_is_capped_at_10_mm() -> None:
    shape, spacing = (60, 60, 60), (1.0, 1.0, 1.0)
    affine = affine_for(spacing, "RAS", shape)
    img, _ = _dark_sphere_image(shape, (30, 30, 30), 12.0, spacing)  # 24 mm dark region
    img[sphere(shape, (30, 30, 30), 12.0, spacing) & ~sphere(shape, (30, 30, 30), 6.0, spacing)] = 600
    labels = grow_from_points(img, affine, np.array([[30.0, 30.0, 30.0]]))
    idx = np.argwhere(labels == 1)
    extent = np.linalg.norm(idx - np.array([30, 30, 30]), axis=1).max()
    assert extent <= 5.0 + 1e-9  # inside the 10 mm diameter ball
    assert (labels == 1).sum() > 100


def test_region_growing_without_contrast_keeps_the_seed_voxel() -> None:
    shape = (20, 20, 20)
    affine = affine_for((1.0, 1.0, 1.0), "RAS", shape)
    img = np.full(shape, 500.0)
    labels = grow_from_points(img, affine, np.array([[10.0, 10.0, 10.0]]))
    assert (labels == 1).sum() == 1


def test_region_growing_nan_and_neighbouring_points() -> None:
    shape, spacing = (40, 40, 40), (1.0, 1.0, 1.0)
    affine = affine_for(spacing, "RAS", shape)
    img, _ = _dark_sphere_image(shape, (18, 20, 20), 2.0, spacing)
    img[sphere(shape, (23, 20, 20), 2.0, spacing)] = 200.0  # touching second CMB
    img[0:5] = np.nan
    labels = grow_from_points(img, affine, np.array([[18.0, 20, 20], [23.0, 20, 20]]))
    a, b = np.argwhere(labels == 1), np.argwhere(labels == 2)
    assert len(a) and len(b)
    # every voxel goes to the nearer seed
    assert np.all(np.linalg.norm(a - [18, 20, 20], axis=1) <= np.linalg.norm(a - [23, 20, 20], axis=1))
    assert np.all(np.linalg.norm(b - [23, 20, 20], axis=1) <= np.linalg.norm(b - [18, 20, 20], axis=1))
    table = lesions_from_points(np.array([affine @ [18, 20, 20, 1], affine @ [23, 20, 20, 1]])[:, :3],
                                affine, scan_id="p", derived_labels=labels)
    assert set(table["mask_source"]) == {"derived"}
    assert table["i"].tolist() == pytest.approx([18.0, 23.0])
    assert (table["n_voxels"] > 0).all()
    assert GrowRule().describe().startswith("{")


def test_probability_candidates_scored_by_peak() -> None:
    shape = (30, 30, 30)
    affine = affine_for((1.0, 1.0, 1.0), "RAS", shape)
    prob = np.zeros(shape, dtype=np.float32)
    prob[sphere(shape, (8, 8, 8), 2.0)] = 0.2
    prob[8, 8, 8] = 0.7
    prob[sphere(shape, (20, 20, 20), 2.0)] = 0.3
    labels, table = candidates_from_probability(prob, affine, scan_id="c", floor=0.1)
    assert sorted(np.round(table["score"], 4)) == [0.3, 0.7]
    labels, table = candidates_from_probability(prob, affine, scan_id="c", floor=0.5)
    assert len(table) == 1 and table.iloc[0].n_voxels == 1
    with pytest.raises(ConfigurationError):
        candidates_from_probability(prob, affine, scan_id="c", floor=0.0)


def test_check_probability() -> None:
    check_probability(np.array([0.0, 0.5, 1.0]))
    with pytest.raises(InvalidValuesError, match="NaN"):
        check_probability(np.array([0.0, np.nan]))
    with pytest.raises(InvalidValuesError, match=r"\[0, 1\]"):
        check_probability(np.array([0.0, 1.5]))
