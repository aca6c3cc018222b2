"""NIfTI input/output at the edges of the library, with one-line errors.

Arrays are returned in nibabel's on-disk index order with the RAS+ affine nibabel derives from
the header (see :mod:`cmbbench.geometry`); nothing is reoriented on reading.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InvalidValuesError, MissingInputError, UnreadableInputError
from .geometry import voxel_sizes

__all__ = [
    "NIFTI_SUFFIXES",
    "Volume",
    "read_header",
    "read_volume",
    "strip_nifti_suffix",
    "write_volume",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A 3D array with its voxel-to-world affine.

    Attributes
    ----------
    data
        3D array indexed ``[i, j, k]`` (0-based voxels).
    affine
        4x4 voxel-to-world matrix, world in RAS+ mm.
    path
        The file it was read from, if any.
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel edge lengths in mm along i, j, k."""
        return voxel_sizes(self.affine)


def strip_nifti_suffix(name: str) -> str | None:
    """Return ``name`` without ``.nii.gz``/``.nii``, or None if it is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
                nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
                nib.wrapstruct.WrapStructError)


def _load_image(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI image; a ``.nii.gz`` is decompressed once, in full, by :mod:`gzip`.

    Decompressing the whole stream checks its CRC-32 and length trailer. nibabel alone stops
    reading once it has the bytes the header asks for, so a ``.nii.gz`` whose trailer is cut off,
    or whose deflate stream was altered without breaking it, would load silently (with wrong
    voxel values in the second case). Raises ``EOFError``, ``gzip.BadGzipFile`` or nibabel's
    errors.
    """
    if path.name.endswith(".gz"):
        raw = gzip.decompress(path.read_bytes())
        return nib.Nifti1Image.from_bytes(raw)
    return nib.load(str(path))


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS+ affine of a NIfTI file, from its header only (no voxel data read)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("file not found", path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        raise UnreadableInputError(f"not a readable NIfTI image ({exc})", path) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InvalidValuesError(f"expected a 3D image, got shape {shape}", path)
    return shape, affine


def read_volume(path: str | Path, *, dtype: np.dtype | None = None) -> Volume:
    """Read a 3D NIfTI file.

    Parameters
    ----------
    path
        ``.nii`` or ``.nii.gz`` file.
    dtype
        Convert the data to this dtype (scaled data are read as float64 otherwise).

    Raises
    ------
    MissingInputError
        The file does not exist.
    UnreadableInputError
        The file is not a readable NIfTI image (corrupt, truncated, wrong format).
    InvalidValuesError
        The image is not 3D (a trailing singleton 4th axis is accepted and dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("file not found", path)
    try:
        img = _load_image(path)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        raise UnreadableInputError(f"not a readable NIfTI image ({exc})", path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidValuesError(f"expected a 3D image, got shape {data.shape}", path)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UnreadableInputError("the header's affine is singular or not finite", path)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return Volume(data=data, affine=affine, path=path)


def write_volume(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3D array as NIfTI (``.nii.gz`` compresses) with the given affine as sform and qform.

    The write goes to a temporary name first and is renamed into place, so an interrupted write
    never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    img.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    tmp = path.with_name(path.name.replace(".nii", ".partial.nii", 1))
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path
