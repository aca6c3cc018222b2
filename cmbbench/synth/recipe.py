"""Synthetic dataset recipes: named, versioned, seeded; validated with one-line errors.

A recipe is a dataset card of kind ``synthetic`` (``datasets_registry/SYNTH-*.yaml``) whose
fields override the defaults of :class:`SynthRecipe`. Acquisition protocols are drawn from
:data:`PROTOCOLS`, the envelope of clinical CMB imaging in the reference notes (3D SWI at 3 T and
1.5 T, 2D GRE T2* at 1.5 T and 3 T).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigurationError
from ..registry import load_card

__all__ = ["PROTOCOLS", "Protocol", "SynthRecipe", "load_recipe", "recipe_from_card"]


@dataclass(frozen=True)
class Protocol:
    """Ranges of one acquisition protocol (each parameter drawn uniformly in its range).

    Attributes
    ----------
    sequence
        ``SWI`` (3D GRE, phase-masked) or ``T2S`` (GRE magnitude).
    b0_t
        Field strength in tesla.
    te_ms, tr_ms, flip_deg
        Echo time (ms), repetition time (ms), flip angle (degrees).
    slice_mm
        Slice thickness (mm).
    gap_mm
        Gap between slices (mm); slice spacing = thickness + gap.
    snr
        White-matter signal over noise sigma, before SWI processing.
    """

    name: str
    sequence: str
    b0_t: float
    te_ms: tuple[float, float]
    tr_ms: tuple[float, float]
    flip_deg: tuple[float, float]
    slice_mm: tuple[float, float]
    gap_mm: tuple[float, float] = (0.0, 0.0)
    snr: tuple[float, float] = (15.0, 45.0)
    two_d: bool = False


PROTOCOLS: dict[str, Protocol] = {
    p.name: p for p in (
        Protocol("swi_3t_3d", "SWI", 3.0, (15.0, 25.0), (27.0, 30.0), (15.0, 15.0), (1.0, 2.0),
                 snr=(20.0, 40.0)),
        Protocol("swi_15t_3d", "SWI", 1.5, (30.0, 50.0), (48.0, 57.0), (20.0, 20.0), (2.0, 2.5),
                 snr=(15.0, 35.0)),
        Protocol("t2s_15t_2d", "T2S", 1.5, (15.0, 30.0), (500.0, 800.0), (20.0, 20.0),
                 (4.0, 5.0), gap_mm=(0.5, 1.5), snr=(30.0, 60.0), two_d=True),
        Protocol("t2s_3t_2d", "T2S", 3.0, (15.0, 25.0), (500.0, 800.0), (15.0, 20.0),
                 (3.0, 5.0), gap_mm=(0.0, 1.0), snr=(25.0, 50.0), two_d=True),
    )
}


@dataclass(frozen=True)
class SynthRecipe:
    """Everything that determines a synthetic dataset (with the generator version).

    Attributes
    ----------
    seed
        Root seed; scan ``n`` uses ``numpy.random.default_rng([seed, n])``.
    positive_fraction
        Share of scans with at least one CMB.
    count_exponent, max_cmbs_per_scan
        CMB count per positive scan: P(k) proportional to k^-count_exponent, k in 1..max.
    location_weights
        MARS class shares of CMBs (lobar / deep / infratentorial), from 957 real CMBs.
    diameter_median_mm, diameter_log_sd, diameter_range_mm
        Target apparent diameter at the reference protocol (3 T, TE 20 ms): lognormal, clipped.
    inplane_mm
        In-plane voxel size range (mm), isotropic in-plane.
    protocols
        Protocol name -> weight; ``balanced_protocols`` assigns them round-robin instead.
    orientations
        On-disk orientation codes drawn uniformly (like the real datasets).
    fov_mm
        In-plane field of view (mm): the matrix is ``round(fov / voxel)``.
    slab_mm
        Through-plane coverage (mm) centred on the brain; None covers the whole brain.
    swi_mip_mm
        If set, SWI scans are stored as a sliding minimum-intensity projection over a slab of
        this thickness (mm); the labels stay the per-slice apparent extent. None: no mIP.
    """

    name: str
    version: str = "1"
    seed: int = 0
    n_scans: int = 10
    split: str = "test"
    description: str = ""
    positive_fraction: float = 0.6
    count_exponent: float = 1.73
    max_cmbs_per_scan: int = 40
    location_weights: dict = field(default_factory=lambda: {
        "lobar": 0.73, "deep": 0.13, "infratentorial": 0.125})
    diameter_median_mm: float = 2.7
    diameter_log_sd: float = 0.36
    diameter_range_mm: tuple[float, float] = (1.5, 10.0)
    min_cmb_separation_mm: float = 6.0
    inplane_mm: tuple[float, float] = (0.5, 1.0)
    fov_mm: tuple[float, float] = (200.0, 230.0)
    slab_mm: float | None = None
    protocols: dict = field(default_factory=lambda: {k: 1.0 for k in PROTOCOLS})
    balanced_protocols: bool = False
    orientations: tuple[str, ...] = ("RAS", "LPS", "LAS")
    b0_tilt_deg: float = 15.0
    medullary_veins: tuple[int, int] = (12, 30)
    cortical_veins: tuple[int, int] = (4, 12)
    calcification_probability: dict = field(default_factory=lambda: {
        "pallidum": 0.35, "choroid_plexus": 0.6})
    flow_voids_2d: tuple[int, int] = (2, 8)
    bias_std: tuple[float, float] = (0.1, 0.3)
    swi_mip_mm: float | None = None

    def validate(self, *, path: object = None) -> SynthRecipe:
        """Raise :class:`ConfigurationError` (one line, naming the recipe) on impossible values."""
        def bad(msg: str) -> ConfigurationError:
            return ConfigurationError(f"recipe {self.name}: {msg}", path)

        if self.n_scans < 1:
            raise bad("n_scans must be >= 1")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise bad("positive_fraction must be in [0, 1]")
        if self.max_cmbs_per_scan < 1:
            raise bad("max_cmbs_per_scan must be >= 1")
        lo, hi = self.diameter_range_mm
        if not 0 < lo < hi:
            raise bad("diameter_range_mm must be an increasing pair of positive numbers")
        if not lo <= self.diameter_median_mm <= hi:
            raise bad("diameter_median_mm must lie inside diameter_range_mm")
        lo, hi = self.inplane_mm
        if not 0.2 <= lo <= hi <= 3.0:
            raise bad("inplane_mm must be an increasing pair within [0.2, 3] mm")
        if self.fov_mm[0] <= 0 or self.fov_mm[1] < self.fov_mm[0]:
            raise bad("fov_mm must be an increasing pair of positive numbers")
        if self.slab_mm is not None and self.slab_mm <= 0:
            raise bad("slab_mm must be positive")
        if self.swi_mip_mm is not None and self.swi_mip_mm <= 0:
            raise bad("swi_mip_mm must be positive")
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise bad(f"unknown protocol(s) {', '.join(sorted(unknown))}; known: "
                      f"{', '.join(PROTOCOLS)}")
        if not self.protocols or min(self.protocols.values()) < 0 or sum(self.protocols.values()) <= 0:
            raise bad("protocols need non-negative weights with a positive sum")
        unknown = set(self.location_weights) - {"lobar", "deep", "infratentorial"}
        if unknown or min(self.location_weights.values()) < 0 or sum(self.location_weights.values()) <= 0:
            raise bad("location_weights take lobar/deep/infratentorial with non-negative weights")
        for o in self.orientations:
            if len(o) != 3 or {o[0], o[1], o[2]} & set("RLAPSI") != set(o) or len(
                    {c.translate(str.maketrans("RLAPSI", "xxyyzz")) for c in o}) != 3:
                raise bad(f"invalid orientation code {o!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def recipe_from_card(card: dict) -> SynthRecipe:
    """Build and validate a recipe from a dataset card (unknown keys are an error)."""
    path = card.get("_path")
    if card.get("kind") != "synthetic":
        raise ConfigurationError(f"dataset {card.get('name')} is not synthetic", path)
    allowed = {f.name for f in fields(SynthRecipe)}
    meta = {"kind", "citation", "licence", "_path"}
    unknown = set(card) - allowed - meta
    if unknown:
        raise ConfigurationError(
            f"recipe {card.get('name')}: unknown field(s) {', '.join(sorted(unknown))}", path)
    kwargs = {k: v for k, v in card.items() if k in allowed}
    for key in ("diameter_range_mm", "inplane_mm", "fov_mm", "medullary_veins",
                "cortical_veins", "flow_voids_2d", "bias_std"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if "orientations" in kwargs:
        kwargs["orientations"] = tuple(kwargs["orientations"])
    kwargs["version"] = str(kwargs.get("version", "1"))
    try:
        recipe = SynthRecipe(**kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"recipe {card.get('name')}: {exc}", path) from None
    return recipe.validate(path=Path(path) if path else None)


def load_recipe(name: str) -> SynthRecipe:
    """Recipe of the registry dataset ``name`` (e.g. ``SYNTH-demo``)."""
    return recipe_from_card(load_card(name))
