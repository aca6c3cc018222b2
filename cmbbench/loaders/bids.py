"""Generic BIDS(-like) folder with ``*_label-CMB_*`` label files.

Layout::

    sub-<id>/[ses-<s>/]anat/sub-<id>[_ses-<s>]..._label-CMB_<suffix>.nii[.gz]   label
    sub-<id>/[ses-<s>/]anat/sub-<id>[_ses-<s>]..._<image suffix>.nii[.gz]       image

The label may sit in the raw tree or in ``derivatives/<pipeline>/``. Its image is the NIfTI in
the matching ``sub-*/[ses-*/]anat`` folder of the raw tree whose name starts with the label's
entities before ``_label-CMB`` and carries no ``label-`` entity; when several match, the first
suffix of ``loader_options.image_suffixes`` (default ``SWI, swi, T2starw, T2star, GRE``) wins;
with none of those, the first other image is taken with a warning (``sequence = unknown``).
Labels: a binary mask (any dtype; split into 26-connected instances) or, when it holds more than
one positive value, an instance map (``mask_source = rater``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import MissingInputError
from ..nifti import read_volume, strip_nifti_suffix
from .base import RawScan, RawScanRef, check_label_volume, register, safe_id

DEFAULT_SUFFIXES = ("SWI", "swi", "T2starw", "T2star", "GRE")
log = logging.getLogger(__name__)
_SUBSES = re.compile(r"(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?")


@register
class BidsLoader:
    """Loader of a BIDS folder with ``*_label-CMB_*`` files (masks)."""

    name = "bids"
    label_kind = "mask"

    def discover(self, source: Path, options: dict) -> list[RawScanRef]:
        suffixes = tuple(options.get("image_suffixes", DEFAULT_SUFFIXES))
        labels = sorted(p for p in source.rglob("*_label-CMB_*")
                        if strip_nifti_suffix(p.name) is not None)
        if not labels:
            raise MissingInputError("unknown layout for BIDS: no *_label-CMB_* NIfTI files",
                                    source)
        refs = []
        for lab in labels:
            prefix = lab.name.split("_label-CMB")[0]
            m = _SUBSES.match(prefix)
            if not m:
                raise MissingInputError("label name does not start with sub-<id>", lab)
            sub, ses = m.group(1), m.group(2)
            anat = source / sub / ses / "anat" if ses else source / sub / "anat"
            cands = []
            for folder in {anat, lab.parent}:
                if folder.is_dir():
                    for p in folder.iterdir():
                        stem = strip_nifti_suffix(p.name)
                        if stem and stem.startswith(prefix + "_") and "label-" not in stem:
                            cands.append(p)
            if not cands:
                raise MissingInputError(f"no image found for this label (looked for "
                                        f"{prefix}_*.nii[.gz] in {anat})", lab)

            def rank(p: Path) -> tuple[int, str]:
                suf = strip_nifti_suffix(p.name).rsplit("_", 1)[-1]
                return (suffixes.index(suf) if suf in suffixes else len(suffixes), p.name)

            img = min(set(cands), key=rank)
            suf = strip_nifti_suffix(img.name).rsplit("_", 1)[-1]
            seq = "SWI" if suf.lower() == "swi" else ("T2S" if suf.lower().startswith(
                ("t2star", "gre")) else "unknown")
            if suf not in suffixes:
                log.warning("%s: no image with suffix %s; using %s (sequence unknown)",
                            lab, "/".join(suffixes), img.name)
            refs.append(RawScanRef(scan_id=safe_id(prefix), subject_id=sub, image_path=img,
                                   label_path=lab, info={"sequence": seq}))
        return refs

    def load(self, ref: RawScanRef, options: dict) -> RawScan:
        img = read_volume(ref.image_path)
        lab = read_volume(ref.label_path)
        check_label_volume(lab, img)
        data = np.asarray(lab.data)
        vals = np.unique(data[data > 0]) if data.dtype.kind in "iu" else np.unique(
            data[data >= 0.5])
        return RawScan(ref=ref, image=img.data, affine=img.affine, mask=data,
                       mask_is_instance=len(vals) > 1)
