"""The fast radial symmetry transform (FRST) of Loy & Zelinsky, in 2D and slice by slice.

Reference: G. Loy and A. Zelinsky, "Fast radial symmetry for detecting points of interest",
IEEE TPAMI 25(8):959-973, 2003.

For each radius ``n`` (pixels) every pixel ``p`` whose gradient magnitude is significant votes
for the pixels at distance ``n`` along its gradient direction: the *positively-affected* pixel
``p + round(n * g/|g|)`` (centre of a bright, radially symmetric object) and the
*negatively-affected* pixel ``p - round(n * g/|g|)`` (centre of a dark one). Votes accumulate in
the orientation projection image ``O_n`` (counts) and the magnitude projection image ``M_n``
(summed gradient magnitudes). With ``O~_n = min(|O_n|, k_n)``::

    F_n = (M_n / k_n) * (O~_n / k_n) ** alpha
    S_n = F_n * A_n          (A_n: Gaussian, sigma = sigma_factor * n pixels)

and the transform combines ``S_n`` over the radii (Loy & Zelinsky average them).

Conventions
-----------
- Arrays are indexed ``[i, j]`` (2D) or ``[i, j, k]`` (a stack of 2D slices along axis 2, the
  slice axis of cmbbench data). The transform never mixes slices.
- Radii are in **pixels** (fractional allowed; the vote offset is rounded to whole pixels).
  Pixels are assumed square: convert millimetres with the mean in-plane spacing.
- The response is **positive at the centres of objects of the requested polarity**
  (``mode="dark"``: dark blobs such as microbleeds, only negatively-affected pixels vote;
  ``mode="bright"``: bright blobs, only positively-affected pixels). With ``mode="both"`` it is
  signed as in Loy & Zelinsky: positive for bright, negative for dark.
- Gradients are 3x3 Sobel derivatives inside each slice (``mode="nearest"`` at the borders);
  a vote landing outside the slice is dropped. ``beta`` is relative to each slice's own largest
  gradient magnitude.

Normalisation
-------------
``normalize="disc"`` (default) divides each ``S_n`` by the response, computed with the same
settings, at the centre of an ideal anti-aliased disc of radius ``n`` pixels and **unit
contrast** on a uniform background (dark: 0 on 1; bright: 1 on 0). A value ``c`` then reads "as
strong as an ideal round spot of contrast ``c`` (image intensity units) and of this radius"; on
an image scaled so that the tissue background is 1 it is the relative contrast of a perfectly
round spot. Radii are then comparable and are combined by their maximum (``combine="max"``).
``normalize="max"`` divides the combined raw response by its largest absolute value (per 2D
slice), so it lies in [0, 1] (dark/bright) with maximum 1; ``"none"`` gives raw values.

All public functions are pure (arrays in, new arrays out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = [
    "default_kn",
    "disc_reference",
    "frst_2d",
    "frst_radius",
    "frst_slices",
    "frst_stack",
    "ideal_disc",
]

Mode = Literal["dark", "bright", "both"]
Normalize = Literal["disc", "max", "none"]
Combine = Literal["max", "mean"]

_SOBEL_DERIV = np.array([-1.0, 0.0, 1.0])
_SOBEL_SMOOTH = np.array([1.0, 2.0, 1.0])


def default_kn(radius_px: float) -> float:
    """Loy & Zelinsky's scaling constant ``k_n``: 8 for ``n = 1``, 9.9 for larger radii.

    Fractional radii below 1.5 pixels use 8.
    """
    return 8.0 if radius_px < 1.5 else 9.9


def _as_stack(image: np.ndarray) -> tuple[np.ndarray, bool]:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        return arr[:, :, None], True
    if arr.ndim == 3:
        return arr, False
    raise ValueError(f"expected a 2D image or a 3D stack of slices, got shape {arr.shape}")


@dataclass(frozen=True)
class _Gradients:
    """The voting pixels of a stack: coordinates, unit gradient direction and magnitude."""

    shape: tuple[int, int, int]
    i: np.ndarray
    j: np.ndarray
    k: np.ndarray
    ui: np.ndarray
    uj: np.ndarray
    mag: np.ndarray


def _gradients(stack: np.ndarray, beta: float) -> _Gradients:
    """In-slice Sobel gradients of the pixels whose magnitude exceeds ``beta`` x slice maximum."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    gi = ndimage.correlate1d(stack, _SOBEL_DERIV, axis=0, mode="nearest")
    gi = ndimage.correlate1d(gi, _SOBEL_SMOOTH, axis=1, mode="nearest")
    gj = ndimage.correlate1d(stack, _SOBEL_DERIV, axis=1, mode="nearest")
    gj = ndimage.correlate1d(gj, _SOBEL_SMOOTH, axis=0, mode="nearest")
    mag = np.hypot(gi, gj)
    slice_max = mag.max(axis=(0, 1), keepdims=True)
    keep = (mag > beta * slice_max) & (mag > 0)
    i, j, k = np.nonzero(keep)
    m = mag[i, j, k]
    return _Gradients(tuple(stack.shape), i.astype(np.int64), j.astype(np.int64),
                      k.astype(np.int64), (gi[i, j, k] / m).astype(np.float32),
                      (gj[i, j, k] / m).astype(np.float32), m.astype(np.float32))


def _votes(g: _Gradients, radius_px: float, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """Orientation (counts) and magnitude projection images of one radius and one polarity.

    ``sign=+1``: positively-affected pixels (bright centres); ``-1``: negatively-affected.
    """
    h, w, d = g.shape
    ti = g.i + sign * np.rint(radius_px * g.ui).astype(np.int64)
    tj = g.j + sign * np.rint(radius_px * g.uj).astype(np.int64)
    inside = (ti >= 0) & (ti < h) & (tj >= 0) & (tj < w)
    flat = (ti[inside] * w + tj[inside]) * d + g.k[inside]
    size = h * w * d
    o = np.bincount(flat, minlength=size).reshape(g.shape)
    m = np.bincount(flat, weights=g.mag[inside], minlength=size).reshape(g.shape)
    return o, m


def _response(g: _Gradients, radius_px: float, *, alpha: float, mode: str, kn: float | None,
              sigma_factor: float) -> np.ndarray:
    """Raw ``S_n`` of one radius from precomputed gradients (float32, stack shape)."""
    kn = default_kn(radius_px) if kn is None else float(kn)
    if mode == "dark":
        o, m = _votes(g, radius_px, -1)
    elif mode == "bright":
        o, m = _votes(g, radius_px, +1)
    else:
        op, mp = _votes(g, radius_px, +1)
        on, mn = _votes(g, radius_px, -1)
        o, m = op - on, mp - mn
    o_t = np.minimum(np.abs(o), kn).astype(np.float32) / np.float32(kn)
    f = (m.astype(np.float32) / np.float32(kn)) * o_t ** np.float32(alpha)
    sig = sigma_factor * radius_px
    return ndimage.gaussian_filter(f, sigma=(sig, sig, 0.0), mode="constant")


def _check(radii: Sequence[float], mode: str) -> list[float]:
    radii = [float(r) for r in radii]
    if not radii:
        raise ValueError("at least one radius is needed")
    if min(radii) <= 0:
        raise ValueError(f"radii must be > 0 pixels, got {radii}")
    if mode not in ("dark", "bright", "both"):
        raise ValueError(f"mode must be 'dark', 'bright' or 'both', got {mode!r}")
    return radii


def frst_radius(image: np.ndarray, radius_px: float, *, alpha: float = 2.0, beta: float = 0.1,
                mode: Mode = "dark", kn: float | None = None,
                sigma_factor: float = 0.25) -> np.ndarray:
    """Raw (unnormalised) FRST response ``S_n`` of one radius.

    Parameters
    ----------
    image
        2D image ``[i, j]`` or a 3D stack ``[i, j, k]`` of slices (each slice transformed alone).
    radius_px
        Radius ``n`` in pixels (> 0, fractional allowed).
    alpha
        Radial strictness (Loy & Zelinsky: 2; higher values suppress non-radial shapes more).
    beta
        Gradient threshold as a fraction of the largest gradient magnitude of each slice;
        pixels with a smaller gradient do not vote.
    mode
        ``"dark"``, ``"bright"`` or ``"both"`` (signs: see the module docstring).
    kn
        Scaling constant ``k_n``; ``None`` uses :func:`default_kn`.
    sigma_factor
        The Gaussian ``A_n`` has standard deviation ``sigma_factor * n`` pixels (L&Z: 0.25).

    Returns
    -------
    numpy.ndarray
        ``S_n`` with the input's shape (float32).
    """
    (r,) = _check([radius_px], mode)
    stack, squeeze = _as_stack(image)
    s = _response(_gradients(stack, beta), r, alpha=alpha, mode=mode, kn=kn,
                  sigma_factor=sigma_factor)
    return s[:, :, 0] if squeeze else s


def ideal_disc(radius_px: float, half: int, *, bright: bool = False,
               supersample: int = 8) -> np.ndarray:
    """Anti-aliased disc of ``radius_px`` pixels centred on pixel ``(half, half)``.

    Each pixel holds the disc's area fraction (``supersample``\\ :sup:`2` sub-samples). Dark:
    ``1 - fraction`` (0 inside, 1 outside); bright: ``fraction``. Shape ``(2 half + 1,) * 2``.
    """
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    ax = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    inside = (ax[:, None] ** 2 + ax[None, :] ** 2) <= radius_px ** 2
    n = 2 * half + 1
    frac = inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    return frac if bright else 1.0 - frac


@lru_cache(maxsize=512)
def _disc_reference_cached(radius_px: float, alpha: float, beta: float, mode: str,
                           kn: float | None, sigma_factor: float) -> float:
    half = int(np.ceil(radius_px + 3 * sigma_factor * radius_px)) + 6
    bright = mode == "bright"
    img = ideal_disc(radius_px, half, bright=bright)
    s = frst_radius(img, radius_px, alpha=alpha, beta=beta, mode="bright" if bright else "dark",
                    kn=kn, sigma_factor=sigma_factor)
    return float(s[half, half])


def disc_reference(radius_px: float, *, alpha: float = 2.0, beta: float = 0.1,
                   mode: Mode = "dark", kn: float | None = None,
                   sigma_factor: float = 0.25) -> float:
    """Raw FRST response at the centre of an ideal unit-contrast disc of radius ``radius_px``.

    The disc is anti-aliased (:func:`ideal_disc`), dark for ``mode`` ``"dark"``/``"both"`` and
    bright for ``"bright"``; every other setting is the one given. Cached.
    """
    return _disc_reference_cached(float(radius_px), float(alpha), float(beta), str(mode),
                                  None if kn is None else float(kn), float(sigma_factor))


def frst_stack(image: np.ndarray, radii_px: Sequence[float], *, alpha: float = 2.0,
               beta: float = 0.1, mode: Mode = "dark", kn: float | None = None,
               sigma_factor: float = 0.25, normalize: Literal["disc", "none"] = "disc"
               ) -> np.ndarray:
    """Per-radius FRST responses, stacked on a new leading axis.

    Parameters
    ----------
    image
        2D image or 3D stack of slices (axis 2), see :func:`frst_radius`.
    radii_px
        Radii in pixels.
    normalize
        ``"disc"``: each radius divided by :func:`disc_reference` (an ideal unit-contrast disc
        of that radius gives 1 at its centre); ``"none"``: raw ``S_n``.
    alpha, beta, mode, kn, sigma_factor
        As in :func:`frst_radius` (``kn`` None: per-radius default).

    Returns
    -------
    numpy.ndarray
        ``(len(radii_px),) + image.shape`` float32 array.
    """
    radii = _check(radii_px, mode)
    if normalize not in ("disc", "none"):
        raise ValueError(f"normalize must be 'disc' or 'none' here, got {normalize!r}")
    stack, squeeze = _as_stack(image)
    g = _gradients(stack, beta)
    out = np.empty((len(radii),) + stack.shape, dtype=np.float32)
    for n, r in enumerate(radii):
        s = _response(g, r, alpha=alpha, mode=mode, kn=kn, sigma_factor=sigma_factor)
        if normalize == "disc":
            s /= np.float32(disc_reference(r, alpha=alpha, beta=beta, mode=mode, kn=kn,
                                           sigma_factor=sigma_factor))
        out[n] = s
    return out[..., 0] if squeeze else out


def frst_2d(image2d: np.ndarray, radii_px: Sequence[float], *, alpha: float = 2.0,
            beta: float = 0.1, mode: Mode = "dark", kn: float | None = None,
            sigma_factor: float = 0.25, normalize: Normalize = "disc",
            combine: Combine = "max") -> np.ndarray:
    """2D fast radial symmetry transform of one image.

    Parameters
    ----------
    image2d
        2D image ``[i, j]`` (square pixels).
    radii_px
        Radii ``n`` in pixels (fractional allowed), e.g. ``radius_mm / in-plane spacing``.
    alpha
        Radial strictness (default 2, Loy & Zelinsky's recommendation).
    beta
        Gradient threshold, fraction of the image's largest gradient magnitude (default 0.1).
    mode
        ``"dark"`` (default; dark blobs respond positively), ``"bright"`` or ``"both"``.
    kn
        ``k_n`` for every radius; None: 8 for radii below 1.5 px, 9.9 otherwise.
    sigma_factor
        Standard deviation of the Gaussian ``A_n`` as a fraction of the radius (default 0.25,
        Loy & Zelinsky).
    normalize
        ``"disc"`` (default): per radius, relative to an ideal unit-contrast disc (module
        docstring); ``"max"``: combined raw response divided by its largest absolute value;
        ``"none"``: raw.
    combine
        How radii are combined: ``"max"`` (default) or ``"mean"`` (Loy & Zelinsky's average).

    Returns
    -------
    numpy.ndarray
        Response with the image's shape (float32).
    """
    img = np.asarray(image2d)
    if img.ndim != 2:
        raise ValueError(f"frst_2d expects a 2D image, got shape {img.shape}")
    return _frst_any(img[:, :, None], radii_px, alpha=alpha, beta=beta, mode=mode, kn=kn,
                     sigma_factor=sigma_factor, normalize=normalize, combine=combine)[:, :, 0]


def frst_slices(volume: np.ndarray, radii_px: Sequence[float], *, alpha: float = 2.0,
                beta: float = 0.1, mode: Mode = "dark", kn: float | None = None,
                sigma_factor: float = 0.25, normalize: Normalize = "disc",
                combine: Combine = "max") -> np.ndarray:
    """The 2D FRST applied independently to every axial slice ``volume[:, :, k]``.

    Equal to ``np.stack([frst_2d(volume[:, :, k], ...) for k], axis=2)`` but vectorised.

    Parameters
    ----------
    volume
        3D array ``[i, j, k]``; axis 2 is the slice axis.
    radii_px, alpha, beta, mode, kn, sigma_factor, normalize, combine
        As in :func:`frst_2d` (radii in in-plane pixels; ``beta`` and ``normalize="max"`` are
        per slice).

    Returns
    -------
    numpy.ndarray
        Response with the volume's shape (float32).
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"frst_slices expects a 3D volume, got shape {vol.shape}")
    return _frst_any(vol, radii_px, alpha=alpha, beta=beta, mode=mode, kn=kn,
                     sigma_factor=sigma_factor, normalize=normalize, combine=combine)


def _frst_any(stack: np.ndarray, radii_px: Sequence[float], *, alpha: float, beta: float,
              mode: Mode, kn: float | None, sigma_factor: float, normalize: Normalize,
              combine: Combine) -> np.ndarray:
    if normalize not in ("disc", "max", "none"):
        raise ValueError(f"normalize must be 'disc', 'max' or 'none', got {normalize!r}")
    if combine not in ("max", "mean"):
        raise ValueError(f"combine must be 'max' or 'mean', got {combine!r}")
    per = frst_stack(stack, radii_px, alpha=alpha, beta=beta, mode=mode, kn=kn,
                     sigma_factor=sigma_factor,
                     normalize="disc" if normalize == "disc" else "none")
    if per.shape[0] == 1:
        out = per[0]
    elif combine == "max":
        out = per.max(axis=0) if mode != "both" else _signed_absmax(per)
    else:
        out = per.mean(axis=0)
    if normalize == "max":
        peak = np.abs(out).max(axis=(0, 1), keepdims=True)
        out = np.divide(out, peak, out=np.zeros_like(out), where=peak > 0)
    return out


def _signed_absmax(per: np.ndarray) -> np.ndarray:
    """Along axis 0, the value of largest magnitude (keeps the sign of ``mode="both"``)."""
    idx = np.abs(per).argmax(axis=0)
    return np.take_along_axis(per, idx[None], axis=0)[0]
