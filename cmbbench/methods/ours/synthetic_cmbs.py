"""On-the-fly synthetic CMBs for training "ours" (the poster's pretraining on synthetic CMBs).

A training set holds a few hundred CMBs; the network sees each of them thousands of times and
never sees the sizes, shapes and neighbourhoods the set lacks (on SYNTH-train v1 no CMB is
larger than 5.9 mm). :class:`CMBBank` renders a bank of CMB signal factors with the synthetic
generator's physics (:func:`cmbbench.synth.physics.voxel_factor`: a susceptibility sphere,
intravoxel dephasing, the slice profile of the acquisition), and :func:`insert_cmb` multiplies
one into a training crop at a random parenchyma voxel, with its label.

Conventions
-----------
- Bank entries live on the 1 mm (``work_mm``) isotropic RAS working grid of the crops; array
  axis 2 is the slice axis (superior-inferior), along which the factor integrates a box slice
  profile of the entry's ``slice_mm`` (the native slice thickness the entry stands for).
- Crops are normalised images ``x = (I - median) / scale`` (:func:`.preprocess.normalise`);
  with ``offset = median / scale`` the signal is ``I / scale = x + offset``, which the factor
  multiplies. The noise that the multiplication removes is added back (sd ``noise_sd``, in
  normalised units) and the magnitude is kept non-negative (``x >= -offset``).
- SWI: the magnitude factor is multiplied by the negative-phase mask ``(1 + phi/pi)^4`` of the
  factor's phase (right-handed convention, as :func:`cmbbench.synth.physics.swi_from_complex`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ...synth import physics
from ...synth.generator import CALIBRATION_PHI_C, REFERENCE_B0_T, REFERENCE_TE_MS, label_from_factor
from ...synth.placement import sample_core_diameter
from ...synth.recipe import PROTOCOLS

__all__ = ["CMBBank", "SyntheticCMB", "insert_cmb", "noise_sd"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticCMB:
    """One rendered CMB on a ``(B, B, B)`` 1 mm box centred on the box's middle voxel.

    Attributes
    ----------
    magnitude
        float32 ``|F|`` (GRE magnitude factor, 1 far from the CMB).
    swi
        float32 SWI factor ``|F| * phase_mask^4``.
    label
        bool apparent extent (voxels darkened by >= the generator's draw threshold, connected to
        the darkest voxel): the same definition as the generator's labels.
    slice_mm
        Slice thickness (mm) of the acquisition the entry stands for.
    diameter_mm
        Target apparent diameter at the reference protocol (3 T, TE 20 ms), mm.
    """

    magnitude: np.ndarray
    swi: np.ndarray
    label: np.ndarray
    slice_mm: float
    diameter_mm: float


class CMBBank:
    """A seeded bank of rendered CMBs for every protocol of the synthetic generator.

    Parameters
    ----------
    n_per_protocol
        Entries per acquisition protocol (:data:`cmbbench.synth.recipe.PROTOCOLS`).
    seed
        Random seed (the bank is a pure function of its arguments).
    box
        Side of each entry's box, voxels (1 mm): large enough for a 10 mm CMB's bloom.
    median_mm, log_sd, range_mm
        Target apparent diameter (mm): lognormal (median, log sd), clipped to ``range_mm``;
        a share ``uniform_share`` is log-uniform over ``range_mm`` instead, so that rare sizes
        (under 2 mm, over 5 mm) are common in training.
    tilt_deg
        Largest angle (degrees) between B0 and the slice axis.
    """

    def __init__(self, n_per_protocol: int = 100, *, seed: int = 0, box: int = 25,
                 median_mm: float = 2.7, log_sd: float = 0.5,
                 range_mm: tuple[float, float] = (1.5, 10.0), uniform_share: float = 0.3,
                 tilt_deg: float = 15.0) -> None:
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        self.box = int(box)
        self.entries: dict[str, list[SyntheticCMB]] = {"SWI": [], "T2S": []}
        lo, hi = (float(v) for v in range_mm)
        centre = self.box // 2
        affine = np.eye(4)
        affine[:3, 3] = -centre
        for proto in PROTOCOLS.values():
            for _ in range(int(n_per_protocol)):
                if rng.random() < uniform_share:
                    target = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                else:
                    target = float(np.clip(rng.lognormal(np.log(median_mm), log_sd), lo, hi))
                core = sample_core_diameter(rng, target)
                dchi = physics.blooming_moment_for_diameter(
                    target, REFERENCE_B0_T, REFERENCE_TE_MS, core_diameter_mm=core,
                    phi_c=CALIBRATION_PHI_C)
                dchi = float(np.clip(dchi, 0.3, 40.0))
                te = float(rng.uniform(*proto.te_ms))
                thick = float(rng.uniform(*proto.slice_mm))
                tilt = np.radians(rng.uniform(0.0, tilt_deg))
                az = rng.uniform(0.0, 2 * np.pi)
                b0 = (np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt))
                src = physics.SphereSource(rng.uniform(-0.5, 0.5, 3), core / 2.0, dchi,
                                           core_r2s_per_s=float(rng.uniform(200.0, 600.0)),
                                           core_pd_ratio=0.8)
                sl, f = physics.voxel_factor(src, affine, (self.box,) * 3, b0, proto.b0_t, te,
                                             slice_thickness_mm=thick)
                full = np.ones((self.box,) * 3, np.complex64)
                full[sl] = f
                mag = np.abs(full).astype(np.float32)
                label = label_from_factor(full)
                if not label.any():
                    continue
                phase = np.angle(full) * np.float32(np.sign(physics.PHASE_SIGN))  # > 0: masked
                pmask = np.where(phase > 0, 1.0 - phase / np.pi, 1.0).astype(np.float32)
                self.entries[proto.sequence].append(SyntheticCMB(
                    mag, mag * pmask ** 4, label, thick, target))
        self.seconds = time.perf_counter() - t0
        log.info("synthetic CMB bank: %d SWI + %d T2* entries in %.0f s",
                 len(self.entries["SWI"]), len(self.entries["T2S"]), self.seconds)

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def draw(self, rng: np.random.Generator, sequence: str, slice_mm: float) -> SyntheticCMB:
        """An entry of ``sequence`` (SWI or T2S; other values: either) whose slice thickness
        is within 1 mm of ``slice_mm`` when the bank has one, else the nearest."""
        pool = self.entries.get(str(sequence).upper()) or (self.entries["SWI"]
                                                           + self.entries["T2S"])
        th = np.array([e.slice_mm for e in pool])
        near = np.flatnonzero(np.abs(th - float(slice_mm)) <= 1.0)
        if not len(near):
            near = np.array([int(np.argmin(np.abs(th - float(slice_mm))))])
        return pool[int(near[rng.integers(len(near))])]


def noise_sd(image: np.ndarray, mask: np.ndarray) -> float:
    """Robust noise sd (normalised units) of a working-grid image: 1.4826 MAD of neighbour
    differences along axis 0 inside ``mask``, divided by sqrt(2). Interpolation to the working
    grid correlates neighbours, so this is a lower bound."""
    d = np.diff(image.astype(np.float32), axis=0)[mask[1:] & mask[:-1]]
    if d.size < 100:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def insert_cmb(image: np.ndarray, labels: np.ndarray, entry: SyntheticCMB, centre: np.ndarray,
               *, offset: float, noise: float, swi: bool, rng: np.random.Generator,
               clip: float = 8.0) -> None:
    """Multiply ``entry`` into ``image`` (in place) around voxel ``centre`` and set its label.

    ``image`` is a normalised crop (see the module notes), ``labels`` a uint8 crop of the same
    shape; the parts of the entry's box outside the crop are dropped. Labels of the entry are
    set to 1 where the crop had none.
    """
    b = entry.magnitude.shape[0]
    lo = np.asarray(centre, int) - b // 2
    src = tuple(slice(max(-l, 0), b - max(l + b - s, 0)) for l, s in zip(lo, image.shape))
    dst = tuple(slice(max(l, 0), min(l + b, s)) for l, s in zip(lo, image.shape))
    f = (entry.swi if swi else entry.magnitude)[src]
    x = image[dst].astype(np.float32)
    sig = (x + offset) * f
    if noise > 0:
        sig = sig + noise * np.sqrt(np.clip(1.0 - f ** 2, 0.0, 1.0)) * rng.standard_normal(
            f.shape).astype(np.float32)
    out = np.clip(np.maximum(sig, 0.0) - offset, -clip, clip)
    image[dst] = out.astype(image.dtype)
    lab = labels[dst]
    lab[entry.label[src] & (lab == 0)] = 1
