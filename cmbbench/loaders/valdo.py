"""VALDO 2021 Task 2 (CMB) training data.

Raw layout (``SOURCE`` is ``Task2/`` or any folder of ``sub-XXX`` folders)::

    sub-XXX/sub-XXX_space-T2S_desc-masked_T2S.nii.gz   T2* (brain-masked), the image used
    sub-XXX/sub-XXX_space-T2S_desc-masked_T1.nii.gz    (ignored; NaNs outside the brain)
    sub-XXX/sub-XXX_space-T2S_CMB.nii.gz               binary CMB mask (float32/uint16/float64)

Labels are binary masks of varying dtype; voxels >= 0.5 are foreground (VALDO's own
binarisation) and 26-connected components become instances. The unmasked
``sub-XXX_space-T2S_T2S.nii.gz`` is used when the masked T2* is absent. Cohort (site) by id range
is our inference [unverified]: 1xx SABRE (Philips 3 T, 0.45x0.45x4 mm), 2xx Rotterdam Scan
Study (GE 1.5 T, 0.49x0.49x0.8 mm), 3xx ALFA (GE 3 T, 1x1x3-4 mm). All LAS per notes; the
loader uses each file's affine regardless.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import MissingInputError
from ..nifti import read_volume
from .base import RawScan, RawScanRef, check_label_volume, register

#: Cohort facts by first digit of the subject number [site names unverified].
COHORTS: dict[str, dict] = {
    "1": {"site": "SABRE", "vendor": "Philips", "field_strength_t": 3.0, "te_ms": 21.0},
    "2": {"site": "RSS", "vendor": "GE", "field_strength_t": 1.5},
    "3": {"site": "ALFA", "vendor": "GE", "field_strength_t": 3.0},
}

_SUB = re.compile(r"^sub-([A-Za-z0-9]+)$")


@register
class ValdoLoader:
    """Loader of the VALDO 2021 Task 2 layout (binary masks)."""

    name = "valdo"
    label_kind = "mask"

    def discover(self, source: Path, options: dict) -> list[RawScanRef]:
        root = source / "Task2" if (source / "Task2").is_dir() else source
        subs = sorted(p for p in root.iterdir() if p.is_dir() and _SUB.match(p.name))
        if not subs:
            raise MissingInputError("unknown layout for VALDO: no sub-XXX folders", source)
        refs = []
        for sub in subs:
            sid = sub.name
            label = sub / f"{sid}_space-T2S_CMB.nii.gz"
            image = sub / f"{sid}_space-T2S_desc-masked_T2S.nii.gz"
            if not image.is_file():
                alt = sub / f"{sid}_space-T2S_T2S.nii.gz"
                image = alt if alt.is_file() else image
            if not image.is_file():
                raise MissingInputError("T2* image not found", image)
            if not label.is_file():
                raise MissingInputError("CMB label file not found", label)
            num = _SUB.match(sid).group(1)
            info = dict(COHORTS.get(num[:1], {})) if num.isdigit() and len(num) == 3 else {}
            info["sequence"] = "T2S"
            refs.append(RawScanRef(scan_id=f"VALDO-{sid}", subject_id=sid, image_path=image,
                                   label_path=label, info=info))
        return refs

    def load(self, ref: RawScanRef, options: dict) -> RawScan:
        img = read_volume(ref.image_path)
        lab = read_volume(ref.label_path)
        check_label_volume(lab, img)
        return RawScan(ref=ref, image=img.data, affine=img.affine,
                       mask=np.asarray(lab.data), mask_is_instance=False)
