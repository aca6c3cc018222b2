"""Training and validation data of "ours": recipe splits and fine-tuning splits
(:class:`DataRef`), training scans preprocessed onto the working grid in worker processes
(:func:`load_cases`), and validation scans kept preprocessed and scored by cmbbench's own
scoring on their native grid (:class:`ValSet`).

Coordinates: working-grid arrays are ``[i, j, k]`` voxels of the 1 mm (``work_mm``) RAS grid
of :func:`.preprocess.preprocess`; reference labels for scoring stay on the scan's native grid.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...errors import ConfigurationError, MissingInputError
from ...matching import MatchRule
from .plugin import Ours
from .preprocess import preprocess, resample_labels
from .sampling import Case, crop_to_brain, dark_spots
from .synthetic_cmbs import noise_sd

__all__ = ["DataRef", "ValSet", "from_dataset", "lesion_frame", "load_cases", "open_split",
           "prep_workers", "score_native", "split_dataset"]

log = logging.getLogger(__name__)


class DataRef:
    """Scans of a dataset usable for training: ``items`` of (scan_id, image path, label path
    or None, sequence, lesion rows) plus a record (name, version, path, scan ids)."""

    def __init__(self, name: str, version: str, root: Path, items: list[tuple]) -> None:
        self.name, self.version, self.root, self.items = name, version, root, items

    def record(self) -> dict:
        """What a checkpoint's JSON records of this split; data under the data home is named
        ``$CMBBENCH_HOME/...`` (:func:`~cmbbench.registry.portable_path`).

        ``scans_sha256`` (:func:`~cmbbench.dataset.files_sha256`) is one SHA-256 over the
        bytes of the split's images and label maps, named by their path relative to the
        dataset folder: which copy of the data a checkpoint was trained on (regenerated
        synthetic data can differ between machines; docs/synthetic.md, Limits).
        """
        from ...dataset import files_sha256
        from ...registry import portable_path

        files = {}
        for _sid, image, label, *_ in self.items:
            for path in (image, label):
                if path is not None and Path(path).is_file():
                    files[_relative_name(Path(path), self.root)] = Path(path)
        return {"name": self.name, "version": self.version, "path": portable_path(self.root),
                "scan_ids": [i[0] for i in self.items], "scans_sha256": files_sha256(files)}


def _relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX separators), or its bare name outside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def from_dataset(ds, ids: list[str]) -> list[tuple]:  # noqa: ANN001 - cmbbench.dataset.Dataset
    """:attr:`DataRef.items` of scans ``ids`` of a read dataset ``ds``."""
    seq = dict(zip(ds.scans["scan_id"], ds.scans.get("sequence", pd.Series(
        ["unknown"] * len(ds.scans)))))
    out = []
    for s in ids:
        lp = ds.label_path(s)
        out.append((s, ds.image_path(s), lp, str(seq.get(s, "unknown")), ds.lesions_of(s)))
    return out


def open_split(spec: dict) -> DataRef:
    """A recipe's ``train``/``val`` entry -> :class:`DataRef` (registry name + version)."""
    from ...dataset import read_dataset
    from ...registry import dataset_cache_dir, load_card

    card = load_card(str(spec["dataset"]))
    version = str(spec.get("version", card.get("version", "0")))
    if version != str(card.get("version", "0")):
        raise ConfigurationError(f"recipe asks for {card['name']} v{version}, the registry "
                                 f"has v{card.get('version')}")
    if card["name"].upper().startswith("SYNTH-TEST"):
        raise ConfigurationError("SYNTH-test is for final reporting only, never for training "
                                 "or model selection")
    root = dataset_cache_dir(card)
    max_scans = int(spec.get("max_scans") or 10 ** 9)
    if (root / "scans.csv").is_file():
        ds = read_dataset(root)
        return DataRef(card["name"], version, root, from_dataset(ds, ds.scan_ids[:max_scans]))
    if not spec.get("allow_partial"):
        from ...registry import resolve_dataset

        ds = read_dataset(resolve_dataset(card["name"]))
        return DataRef(card["name"], version, root, from_dataset(ds, ds.scan_ids[:max_scans]))
    # a dataset still being generated: the scans whose shard is written are complete
    shards = sorted((root / ".shards").glob("*.json")) if (root / ".shards").is_dir() else []
    items = []
    for sh in shards[:max_scans]:
        d = json.loads(sh.read_text())
        sid = d["scan"]["scan_id"]
        items.append((sid, root / "images" / f"{sid}.nii.gz", root / "labels" / f"{sid}.nii.gz",
                      str(d["scan"].get("sequence", "unknown")), pd.DataFrame(d["lesions"])))
    if not items:
        raise MissingInputError(f"no complete scan of {card['name']} yet", root)
    return DataRef(card["name"], version, root, items)


def split_dataset(ref: str | Path, seed: int, max_scans: int | None) -> tuple[DataRef, DataRef]:
    """Fine-tuning split of a dataset (registry name or folder; its first ``max_scans``):
    ``(train, held out)``. Held out: the scans whose ``split`` is ``val``; without any (or
    when all are), a ``seed``-drawn 20 % of the scans, at least one. SYNTH-test is refused."""
    from ...dataset import read_dataset
    from ...registry import resolve_dataset

    if str(ref).upper().startswith("SYNTH-TEST") or "SYNTH-test" in str(ref):
        raise ConfigurationError("SYNTH-test is for final reporting only, never for training")
    ds = read_dataset(resolve_dataset(ref))
    ids = ds.scan_ids[: max_scans or None]
    split = dict(zip(ds.scans["scan_id"], ds.scans.get("split", pd.Series([""] * len(ds.scans)))))
    val_ids = [s for s in ids if str(split.get(s, "")).lower() == "val"]
    if not val_ids or len(val_ids) == len(ids):
        rng = np.random.default_rng(seed)
        n_val = max(1, int(round(0.2 * len(ids))))
        if len(ids) < 2:
            raise ConfigurationError(f"dataset {ds.name} needs at least 2 scans to fine-tune "
                                     "with a held-out split")
        val_ids = sorted(rng.choice(ids, size=n_val, replace=False).tolist())
    tr_ids = [s for s in ids if s not in set(val_ids)]
    version = str(ds.card.get("version", ""))
    return (DataRef(ds.name, version, ds.root, from_dataset(ds, tr_ids)),
            DataRef(ds.name, version, ds.root, from_dataset(ds, val_ids)))


def _mimic_centres(labels: np.ndarray, per_instance: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """Up to ``per_instance`` random voxels of each instance of a (mimic) label map."""
    pts = np.argwhere(labels > 0)
    if not len(pts):
        return np.zeros((0, 3), int)
    ids = labels[tuple(pts.T)]
    keep = []
    for i in np.unique(ids):
        where = np.flatnonzero(ids == i)
        keep.append(rng.choice(where, min(per_instance, len(where)), replace=False))
    return pts[np.concatenate(keep)]


def prep_workers() -> int:
    """Processes preprocessing scans in parallel: the CPU count, at most 8 (each holds a
    native scan and its working-grid copies, up to ~2 GB; the result does not depend on it)."""
    return max(1, min(os.cpu_count() or 1, 8))


def _ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
    """``fn(i) for i in items``, in order, over ``workers`` processes when more than one."""
    if workers <= 1 or len(items) <= 1:
        yield from (fn(i) for i in items)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
        yield from pool.map(fn, items, chunksize=1)


def _prep_training_scan(args: tuple) -> dict:
    """The deterministic, per-scan part of :func:`load_cases` (a worker process): read,
    preprocess, resample the label and mimic maps, crop to the brain box."""
    from ...nifti import read_volume

    ip, lp, work_mm, margin, with_mimics = args
    vol = read_volume(ip)
    pre = preprocess(vol.data, vol.affine, work_mm=work_mm)
    if lp is not None and Path(lp).is_file():
        lab = resample_labels(np.asarray(read_volume(lp).data), vol.affine, pre)
    else:
        lab = np.zeros(pre.image.shape, np.int32)
    mim = None
    mp = Path(ip).parent.parent / "mimics" / Path(ip).name
    if with_mimics and mp.is_file():
        mim = resample_labels(np.asarray(read_volume(mp).data), vol.affine, pre)
    image, lab, mask, *rest = crop_to_brain(pre.image, lab, pre.mask, margin, mim)
    return {"image": image, "labels": lab, "mask": mask, "mimics": rest[0] if rest else None,
            "intensity_offset": float(pre.intensity_offset), "noise_sd": noise_sd(image, mask),
            "slice_mm": float(pre.spacing_ras[2])}


def load_cases(ref: DataRef, work_mm: float, progress: Callable[[str], None], *,
                margin: int = 0, hard: dict | None = None, seed: int = 0,
                workers: int | None = None) -> list[Case]:
    """Preprocess training scans onto the working grid, cropped to the brain box plus
    ``margin`` voxels. With ``hard`` (the recipe's ``sampling`` mapping), each case gets its
    hard-negative centres: :func:`.sampling.dark_spots` (``dark_z``) plus, where the dataset
    has mimic maps (synthetic data: ``mimics/<scan_id>.nii.gz``), up to
    ``mimic_voxels_per_instance`` voxels of each mimic.

    The scans are preprocessed by ``workers`` processes (default :func:`prep_workers`); the
    random hard-negative draws then run in scan order in this process, so the cases do not
    depend on the number of workers."""
    rng = np.random.default_rng(seed)
    cases = []
    t0 = time.perf_counter()
    workers = prep_workers() if workers is None else int(workers)
    jobs = [(ip, lp, work_mm, margin, bool(hard)) for _, ip, lp, _, _ in ref.items]
    for d, (sid, _, _, seq, _) in zip(_ordered_map(_prep_training_scan, jobs, workers),
                                      ref.items):
        image, lab, mask = d["image"], d["labels"], d["mask"]
        hard_pts = None
        if hard:
            pts = [dark_spots(image, mask, lab, z_max=float(hard.get("dark_z", -2.0)),
                              seed=int(rng.integers(2**31)))]
            if d["mimics"] is not None:
                pts.append(_mimic_centres(d["mimics"], int(hard.get(
                    "mimic_voxels_per_instance", 10)), rng))
            hard_pts = np.concatenate(pts)
        # float16 image and binary labels: 120 whole-brain training scans fit in ~4 GB
        cases.append(Case(sid, image.astype(np.float16), (lab > 0).astype(np.uint8), mask,
                          seq, hard_voxels=hard_pts, intensity_offset=d["intensity_offset"],
                          noise_sd=d["noise_sd"], slice_mm=d["slice_mm"]))
        if len(cases) % 10 == 0:
            progress(f"preprocessed {len(cases)}/{len(ref.items)} training scans "
                     f"({time.perf_counter() - t0:.0f} s, {workers} process(es))")
    progress(f"loaded {len(cases)} training scan(s) from {ref.name}")
    return cases


def _prep_val_scan(args: tuple) -> tuple:
    """Preprocessed image and native reference labels of one validation scan (a worker)."""
    from ...nifti import read_volume

    ip, lp, work_mm = args
    vol = read_volume(ip)
    pre = preprocess(vol.data, vol.affine, work_mm=work_mm)
    labels = (np.asarray(read_volume(lp).data).astype(np.uint32)
              if lp is not None and Path(lp).is_file() else None)
    return pre, vol.affine, labels


class ValSet:
    """Validation scans kept preprocessed; CPM by cmbbench scoring on the native grid."""

    def __init__(self, ref: DataRef, work_mm: float, workers: int | None = None) -> None:
        self.ref = ref
        done = _ordered_map(_prep_val_scan, [(ip, lp, work_mm) for _, ip, lp, _, _ in ref.items],
                            prep_workers() if workers is None else int(workers))
        self.items = [(sid, pre, affine, labels, lesions, seq) for (pre, affine, labels), (
            sid, _, _, seq, lesions) in zip(done, ref.items)]

    def score(self, model: torch.nn.Module, infer: dict, *, postprocess: bool = True) -> dict:
        """Aggregates (CPM, pooled recall/precision/F1, FP per scan) of ``model``."""
        return self.score_both(model, infer)["with" if postprocess else "without"]

    def score_both(self, model: torch.nn.Module, infer: dict, *, n_boot: int = 0,
                   keys: tuple = ("cpm", "recall_pooled", "precision_pooled", "f1_pooled",
                                  "fp_per_scan")) -> dict:
        """Aggregates with and without the location post-processing (one inference)."""
        from ...matching import MATCH_COLUMNS, get_rule
        from ...metrics import scan_table
        from ...scoring import ScoreResult

        rule = get_rule("cmbbench")
        meth = Ours(postprocess=True, threshold=float(infer.get("threshold", 0.1)),
                    patch=int(infer.get("patch", 96)), overlap=float(infer.get("overlap", 0.15)),
                    score=infer.get("score"))
        meth.model, meth.meta = model, {}
        acc = {"with": ([], []), "without": ([], [])}
        for item in self.items:
            after, rows, before = meth.predict_work(item[1])
            for key, prob, pp in (("with", after, True), ("without", before, False)):
                table, extras = score_native(meth, prob, rows, item, rule, postprocess=pp)
                acc[key][0].append(table)
                acc[key][1].append(extras)
        ids = [i[0] for i in self.items]
        out = {}
        for key, (tables, extras) in acc.items():
            ne = [t for t in tables if len(t)]
            table = (pd.concat(ne, ignore_index=True) if ne
                     else pd.DataFrame(columns=MATCH_COLUMNS))
            scans = scan_table(table, ids, extra=pd.DataFrame(extras))
            res = ScoreResult.from_tables(table, scans, rule, n_boot=n_boot)
            out[key] = {k: float(res.aggregates.get(k, float("nan"))) for k in keys}
        return out


def lesion_frame(lesions: pd.DataFrame, sid: str) -> pd.DataFrame:
    """A dataset's lesion rows of scan ``sid`` completed to :data:`~cmbbench.model.LESION_COLUMNS`
    (:func:`~cmbbench.dataset.complete_lesions`), as :func:`score_case` takes them."""
    from ...dataset import complete_lesions

    lz = lesions.copy()
    if "scan_id" not in lz.columns:
        lz["scan_id"] = sid
    return complete_lesions(lz)


def score_native(meth: Ours, work_map: np.ndarray, rows: list[dict], item: tuple,
                 rule: MatchRule, *, postprocess: bool) -> tuple[pd.DataFrame, dict]:
    """Score a working-grid map of one :attr:`ValSet.items` scan on its native grid.

    ``work_map`` (working-grid ``[i, j, k]`` voxels) and its candidate ``rows`` are brought
    back to the scan's native grid by :meth:`Ours.to_native` and matched against the
    reference (lesion table and label map) under ``rule`` by :func:`~cmbbench.scoring.score_case`.

    Returns
    -------
    (table, extras)
        The scan's match table and its per-scan row (``scan_id``, ``sequence`` and the
        case's extras) for :func:`~cmbbench.metrics.scan_table`.
    """
    from ...scoring import score_case

    sid, pre, affine, labels, lesions, seq = item
    native, _ = meth.to_native(work_map, rows, pre, postprocess=postprocess)
    case = score_case(scan_id=sid, lesions=lesion_frame(lesions, sid), image_shape=native.shape,
                      image_affine=affine, rule=rule, ref_labels=labels, prediction=native)
    return case.table, {"scan_id": sid, "sequence": seq, **case.extras}
