"""Generic nnU-Net-style folder: ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz``.

Layout::

    imagesTr/<case>_<channel>.nii[.gz]   channel ``loader_options.channel`` (default 0000) is used
    labelsTr/<case>.nii[.gz]             label map; voxels == ``loader_options.label_value``
                                         (default: any value > 0) are CMB voxels
    dataset.json                         optional (nnU-Net v2 ``labels``); if it names a label
                                         "cmb"/"microbleed", that value is used

The CMB voxels are split into 26-connected instances (``mask_source = rater``). ``imagesTs``
(no labels) is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import MissingInputError, UnreadableInputError
from ..nifti import read_volume, strip_nifti_suffix
from .base import RawScan, RawScanRef, check_label_volume, register, safe_id


def _label_value(source: Path, options: dict) -> int | None:
    if options.get("label_value") is not None:
        return int(options["label_value"])
    meta = source / "dataset.json"
    if meta.is_file():
        try:
            labels = json.loads(meta.read_text()).get("labels", {})
        except json.JSONDecodeError as exc:
            raise UnreadableInputError(f"invalid JSON ({exc})", meta) from None
        for key, value in labels.items():
            # v2: {"background": 0, "CMB": 1}; v1: {"0": "background", "1": "CMB"}
            name, val = (key, value) if not str(key).isdigit() else (value, key)
            if any(w in str(name).lower() for w in ("cmb", "microbleed")):
                return int(val)
    return None


@register
class NnunetLoader:
    """Loader of an nnU-Net-style ``imagesTr``/``labelsTr`` folder (masks)."""

    name = "nnunet"
    label_kind = "mask"

    def discover(self, source: Path, options: dict) -> list[RawScanRef]:
        images, labels = source / "imagesTr", source / "labelsTr"
        if not images.is_dir() or not labels.is_dir():
            raise MissingInputError("unknown layout for nnU-Net: expected imagesTr/ and "
                                    "labelsTr/", source)
        channel = str(options.get("channel", "0000"))
        value = _label_value(source, options)
        refs = []
        for lab in sorted(labels.iterdir()):
            case = strip_nifti_suffix(lab.name)
            if case is None:
                continue
            img = next((images / f"{case}_{channel}{s}" for s in (".nii.gz", ".nii")
                        if (images / f"{case}_{channel}{s}").is_file()), None)
            if img is None:
                raise MissingInputError(f"image imagesTr/{case}_{channel}.nii.gz not found for "
                                        "this label", lab)
            refs.append(RawScanRef(scan_id=safe_id(case), subject_id=case, image_path=img,
                                   label_path=lab, extra={"label_value": value}))
        return refs

    def load(self, ref: RawScanRef, options: dict) -> RawScan:
        img = read_volume(ref.image_path)
        lab = read_volume(ref.label_path)
        check_label_volume(lab, img)
        value = ref.extra.get("label_value")
        data = np.asarray(lab.data)
        mask = (np.rint(data) == value) if value is not None else data
        return RawScan(ref=ref, image=img.data, affine=img.affine, mask=mask,
                       mask_is_instance=False)
