"""Training and fine-tuning of "ours" from a recorded recipe (``cmbbench train --method ours``).

:func:`train` reads a recipe (``recipes/<name>.yaml`` or a YAML path), preprocesses the
training scans to the working grid once, trains on augmented CMB-centred patches, evaluates the
CPM (cmbbench scoring, rule ``cmbbench``) on the validation scans every ``val_every`` steps,
keeps the best-CPM model, and writes into ``out``:

- ``last.pt`` / ``last.json``: resumable state (model, optimiser, step, RNG states);
- ``log.jsonl``: one line per logged step (loss) and per validation (CPM, sensitivities);
- ``<recipe name>.pt`` + ``<recipe name>.json``: the best model and its record (recipe,
  sha256, datasets with versions and exact scan ids, training time, hardware, val CPM curve).

With ``init`` (a checkpoint) and ``dataset`` (a registry name or folder) it fine-tunes on that
dataset: scans whose ``split`` is ``val`` (or, without one, a seeded 20 % of the scans, at least
one) are held out for model selection, the others are trained on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ...errors import ConfigurationError, MissingInputError
from . import RECIPES_DIR, WEIGHTS_DIR
from .augment import augment_batch
from .infer import sliding_window, tempered
from .losses import combined_loss
from .plugin import Ours, build_model, load_checkpoint, save_checkpoint
from .postprocess import RULES
from .preprocess import preprocess, resample_labels
from .sampling import Case, PatchSampler, crop_to_brain, dark_spots
from .synthetic_cmbs import CMBBank, noise_sd

__all__ = ["load_recipe", "train", "DataRef", "open_split"]

log = logging.getLogger(__name__)


def load_recipe(recipe: str | Path | dict) -> dict:
    if isinstance(recipe, dict):
        return dict(recipe)
    p = Path(recipe)
    if not p.is_file():
        p = RECIPES_DIR / f"{recipe}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
        raise ConfigurationError(f"unknown training recipe {recipe!r}; available: {known}")
    try:
        rec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"invalid recipe YAML: {str(exc).splitlines()[0]}", p) from None
    if not isinstance(rec, dict) or "name" not in rec:
        raise ConfigurationError("a recipe is a mapping with at least a name", p)
    rec.setdefault("_path", str(p))
    return rec


class DataRef:
    """Scans of a dataset usable for training: ``items`` of (scan_id, image path, label path,
    sequence) plus a record (name, version, path, scan ids)."""

    def __init__(self, name: str, version: str, root: Path, items: list[tuple]) -> None:
        self.name, self.version, self.root, self.items = name, version, root, items

    def record(self) -> dict:
        return {"name": self.name, "version": self.version, "path": str(self.root),
                "scan_ids": [i[0] for i in self.items]}


def _from_dataset(ds, ids: list[str]) -> list[tuple]:  # noqa: ANN001
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
        return DataRef(card["name"], version, root, _from_dataset(ds, ds.scan_ids[:max_scans]))
    if not spec.get("allow_partial"):
        from ...registry import resolve_dataset

        ds = read_dataset(resolve_dataset(card["name"]))
        return DataRef(card["name"], version, root, _from_dataset(ds, ds.scan_ids[:max_scans]))
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


def _split_dataset(ref: str | Path, seed: int, max_scans: int | None) -> tuple[DataRef, DataRef]:
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
    return (DataRef(ds.name, version, ds.root, _from_dataset(ds, tr_ids)),
            DataRef(ds.name, version, ds.root, _from_dataset(ds, val_ids)))


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


def _prep_workers() -> int:
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
    """The deterministic, per-scan part of :func:`_load_cases` (a worker process): read,
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


def _load_cases(ref: DataRef, work_mm: float, progress: Callable[[str], None], *,
                margin: int = 0, hard: dict | None = None, seed: int = 0,
                workers: int | None = None) -> list[Case]:
    """Preprocess training scans onto the working grid, cropped to the brain box plus
    ``margin`` voxels. With ``hard`` (the recipe's ``sampling`` mapping), each case gets its
    hard-negative centres: :func:`.sampling.dark_spots` (``dark_z``) plus, where the dataset
    has mimic maps (synthetic data: ``mimics/<scan_id>.nii.gz``), up to
    ``mimic_voxels_per_instance`` voxels of each mimic.

    The scans are preprocessed by ``workers`` processes (default :func:`_prep_workers`); the
    random hard-negative draws then run in scan order in this process, so the cases do not
    depend on the number of workers."""
    rng = np.random.default_rng(seed)
    cases = []
    t0 = time.perf_counter()
    workers = _prep_workers() if workers is None else int(workers)
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


class _ValSet:
    """Validation scans kept preprocessed; CPM by cmbbench scoring on the native grid."""

    def __init__(self, ref: DataRef, work_mm: float, workers: int | None = None) -> None:
        self.ref = ref
        done = _ordered_map(_prep_val_scan, [(ip, lp, work_mm) for _, ip, lp, _, _ in ref.items],
                            _prep_workers() if workers is None else int(workers))
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
        from ...scoring import ScoreResult, score_case

        rule = get_rule("cmbbench")
        meth = Ours(postprocess=True, threshold=float(infer.get("threshold", 0.1)),
                    patch=int(infer.get("patch", 96)), overlap=float(infer.get("overlap", 0.15)),
                    score=infer.get("score"))
        meth.model, meth.meta = model, {}
        acc = {"with": ([], []), "without": ([], [])}
        for sid, pre, affine, labels, lesions, seq in self.items:
            after, rows, before = meth.predict_work(pre)
            lz = _lesion_frame(lesions, sid)
            for key, prob, pp in (("with", after, True), ("without", before, False)):
                native, _ = meth.to_native(prob, rows, pre, postprocess=pp)
                case = score_case(scan_id=sid, lesions=lz, image_shape=native.shape,
                                  image_affine=affine, rule=rule, ref_labels=labels,
                                  prediction=native)
                acc[key][0].append(case.table)
                acc[key][1].append({"scan_id": sid, "sequence": seq, **case.extras})
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


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless augmented training batches made by DataLoader worker processes.

    Worker ``w`` draws from its own :class:`.sampling.PatchSampler` and augmentation generator,
    both seeded from ``(seed, start_step, w)``; a DataLoader takes the workers' batches in
    turn, so the stream depends only on the seed, the worker count and the step it starts at
    (a resumed run starts a fresh stream at its step)."""

    def __init__(self, make_sampler: Callable[[int], PatchSampler], batch: int, patch: int,
                 aug_cfg: dict, seed: int, start_step: int) -> None:
        super().__init__()
        self.make_sampler, self.batch, self.patch = make_sampler, batch, patch
        self.aug_cfg = {k: float(v) for k, v in aug_cfg.items()}
        self.seed, self.start_step = int(seed), int(start_step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        torch.set_num_threads(1)
        s = np.random.SeedSequence([self.seed, self.start_step, wid]).generate_state(2)
        sampler = self.make_sampler(int(s[0]))
        g = torch.Generator().manual_seed(int(s[1]))
        while True:
            xb, yb = sampler.batch(self.batch)
            yield augment_batch(torch.from_numpy(xb), torch.from_numpy(yb), self.patch, g,
                                **self.aug_cfg)


def _resolve_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""
    name = str(name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigurationError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def calibrate(model: torch.nn.Module, val: _ValSet, infer: dict, *,
              surfaces: tuple[float, ...] = (2.0, 0.0), scores: tuple[str, ...] = ("prob", "logit"),
              progress: Callable[[str], None] | None = None) -> dict:
    """Choose the post-processing variant and the operating threshold on validation scans.

    Variants: all location rules with each surface band width in ``surfaces`` (mm), the brain
    mask rule alone, and no post-processing, each with ``scores`` (``prob``: mean probability;
    ``logit``: tempered mean log-odds, named ``<variant>+logit``; both maps come from one
    sliding-window pass). The variant with the highest CPM (threshold-free; ties: the
    earlier, more conservative one, ``prob`` before ``logit``) is kept; its operating
    threshold lies halfway between the candidate score that maximises the pooled F1 over the
    validation scans (rule ``cmbbench``) and the next lower score, unclipped up to 1 - 1e-6
    (saturated networks). Returns the ``operating`` record stored in the checkpoint JSON (with
    every variant's numbers, ``rules``, ``surface_mm`` and ``score``).
    """
    from ...matching import get_rule
    from ...scoring import score_case

    say = progress or (lambda m: log.info(m))
    rule = get_rule("cmbbench")
    meth = Ours(threshold=float(infer.get("threshold", 0.1)), patch=int(infer.get("patch", 96)),
                overlap=float(infer.get("overlap", 0.15)), postprocess=True)
    meth.model, meth.meta = model, {}
    model.eval()
    # (name, surface band mm, rules, score); rules None = no post-processing
    base = ([(f"surface_{s:g}mm", float(s), RULES) for s in surfaces]
            + [("mask_only", 0.0, ("mask",)), ("none", 0.0, None)])
    specs: list[tuple[str, float, tuple[str, ...] | None, str]] = [
        (n + ("" if sc == "prob" else f"+{sc}"), sf, rl, sc) for sc in scores
        for n, sf, rl in base]
    names = [sp[0] for sp in specs]
    acc: dict[str, tuple[list, list]] = {n: ([], []) for n in names}
    t0 = time.perf_counter()
    for sid, pre, affine, labels, lesions, seq in val.items:
        prob, logodds = sliding_window(model, pre.image, pre.mask, patch=meth.patch,
                                       overlap=meth.overlap, output="both")
        raw_of = {"prob": prob, "logit": tempered(logodds)}
        lz = _lesion_frame(lesions, sid)
        for name, surf, rules, sc in specs:
            meth._surface_mm = surf
            meth._rules = rules or RULES
            meth._score = sc
            after, rows, before = meth.postprocess_work(raw_of[sc], pre)
            pp = rules is not None
            native, _ = meth.to_native(after if pp else before, rows, pre, postprocess=pp)
            case = score_case(scan_id=sid, lesions=lz, image_shape=native.shape,
                              image_affine=affine, rule=rule, ref_labels=labels,
                              prediction=native)
            acc[name][0].append(case.table)
            acc[name][1].append({"scan_id": sid, "sequence": seq, **case.extras})
    ids = [i[0] for i in val.items]
    variants = {}
    score_of = {sp[0]: sp[3] for sp in specs}
    for name, (tables, extras) in acc.items():
        meth._score = score_of[name]
        variants[name] = operating_point(tables, extras, ids, rule,
                                         floor=meth._level(meth.threshold))
        say(f"calibration {name}: CPM {variants[name]['cpm']:.3f}, best F1 "
            f"{variants[name]['f1']:.3f} at threshold {variants[name]['threshold']:.6f}")
    chosen = max(names, key=lambda n: (np.nan_to_num(variants[n]["cpm"], nan=-1.0),
                                       -names.index(n)))
    v = variants[chosen]
    _, surf, rules, sc = next(sp for sp in specs if sp[0] == chosen)
    meth._score = sc
    op = {"postprocess": rules is not None, "surface_mm": surf, "rules": list(rules or ()),
          "score": sc,
          "threshold": float(np.clip(v["threshold"], meth._level(meth.threshold),
                                     1.0 - 1e-6)),
          "chosen": chosen, "variants": variants, "scans": ids, "rule": rule.rule_id,
          "dataset": {"name": val.ref.name, "version": val.ref.version},
          "seconds": round(time.perf_counter() - t0, 1)}
    return op


def operating_point(tables: list[pd.DataFrame], extras: list[dict], ids: list[str],
                    rule, *, floor: float) -> dict:  # noqa: ANN001
    """CPM of per-scan match ``tables`` and the operating threshold that maximises the pooled
    F1 (candidate scores at or above ``floor`` only).

    The threshold lies halfway between the best-F1 candidate's score and the next lower
    score, so that rounding can never move that candidate across the operating point.
    Returns ``cpm``, ``f1_at_0.5``, ``threshold``, and ``f1``/``precision``/``recall``/
    ``fp_per_scan`` at that threshold.
    """
    from ...matching import MATCH_COLUMNS
    from ...metrics import scan_table
    from ...scoring import ScoreResult

    ne = [t for t in tables if len(t)]
    table = pd.concat(ne, ignore_index=True) if ne else pd.DataFrame(columns=MATCH_COLUMNS)
    res = ScoreResult.from_tables(table, scan_table(table, ids, extra=pd.DataFrame(extras)),
                                  rule, n_boot=0)
    fr = res.froc
    fr = fr[np.isfinite(fr["threshold"]) & (fr["threshold"] >= floor)]
    p_, r_ = fr["precision"].fillna(0).to_numpy(), fr["sensitivity"].fillna(0).to_numpy()
    f1 = np.where(p_ + r_ > 0, 2 * p_ * r_ / np.maximum(p_ + r_, 1e-12), 0.0)
    best = int(np.argmax(f1)) if len(f1) else -1
    thr = 0.5
    if best >= 0:
        t_best = float(fr["threshold"].iloc[best])
        below = fr["threshold"][fr["threshold"] < t_best]
        thr = 0.5 * (t_best + float(below.max())) if len(below) else t_best
    return {"cpm": float(res.aggregates["cpm"]),
            "f1_at_0.5": float(res.aggregates["f1_pooled"]),
            "threshold": thr,
            "f1": float(f1[best]) if best >= 0 else 0.0,
            "precision": float(p_[best]) if best >= 0 else 0.0,
            "recall": float(r_[best]) if best >= 0 else 0.0,
            "fp_per_scan": float(fr["fp_per_scan"].iloc[best]) if best >= 0 else 0.0}


def _lesion_frame(lesions: pd.DataFrame, sid: str) -> pd.DataFrame:
    from ...model import LESION_COLUMNS

    lz = lesions.copy()
    if "scan_id" not in lz.columns:
        lz["scan_id"] = sid
    for col in LESION_COLUMNS:
        if col not in lz.columns:
            lz[col] = {"location": "unknown", "mask_source": "none",
                       "n_voxels": 0}.get(col, np.nan)
    lz["n_voxels"] = lz["n_voxels"].fillna(0).astype(np.int64)
    lz["lesion_id"] = lz["lesion_id"].astype(np.int64)
    return lz[list(LESION_COLUMNS) + [c for c in lz.columns if c not in LESION_COLUMNS]]


def _package_path(path: str | Path | None, folder: Path) -> str | None:
    """A shipped file (a recipe or checkpoint inside ``folder`` of this package) as its path
    inside the repository/package; any other path as given; None stays None."""
    if not path:
        return None
    try:
        rel = Path(path).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)
    return f"cmbbench/methods/ours/{folder.name}/{rel}"


def _hardware() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or "",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def train(recipe: str | Path | dict, *, out: str | Path | None = None,
          init: str | Path | None = None, dataset: str | Path | None = None,
          steps: int | None = None, max_minutes: float | None = None, resume: bool = True,
          device: str | None = None, calibrate_after: bool = True, calibrate_only: bool = False,
          progress: Callable[[str], None] | None = None) -> Path:
    """Train (or fine-tune) from a recipe; returns the path of the best checkpoint.

    Parameters
    ----------
    recipe
        Recipe name (``recipes/<name>.yaml``), YAML path, or a mapping.
    out
        Output folder (default ``runs/train/<recipe name>``, or ``..-finetune`` with ``init``).
    init
        Checkpoint to start from (sha256-checked); its architecture replaces the recipe's.
        Default: the recipe's ``init`` (a path, or a file name in the package's weights
        folder), else random initialisation.
    dataset
        Fine-tune on this dataset (name or folder) with a held-out split instead of the
        recipe's ``train``/``val``.
    steps, max_minutes
        Override the recipe's step count and wall-clock budget.
    resume
        Continue from ``out/last.pt`` when it exists.
    device
        ``auto`` (CUDA when torch sees one, else CPU), ``cpu`` or ``cuda``; default: the
        recipe's ``device``, else ``auto``. The device used is recorded under ``hardware``.
    calibrate_after
        Run the recipe's ``calibrate`` step once training has finished (False: leave it to a
        later run with the same ``out``, e.g. on another machine).
    calibrate_only
        Train no further: (re)calibrate the best checkpoint of the run in ``out`` (one trained
        elsewhere with ``calibrate_after=False``, or cut short by its machine's time limit).

    Notes
    -----
    A recipe's ``loader_workers`` (default 0: batches made in this process) sets how many
    DataLoader processes make the augmented batches (:class:`_BatchStream`); a GPU needs
    several to be kept busy. The batch stream depends on that number, so it is part of the
    recipe.
    """
    say = progress or (lambda m: log.info(m))
    rec = load_recipe(recipe)
    if str(rec.get("stage", "unet")) == "classifier":
        # second stage: the U-Net of ``init`` stays as it is (steps, device and calibration
        # flags do not apply; a re-run reuses its per-scan candidate cache)
        from .train_classifier import train_classifier

        return train_classifier(rec, out=out, init=init, dataset=dataset, progress=say)
    finetune = init is not None
    if init is None and rec.get("init"):
        # a recipe that continues a shipped checkpoint names it (a bare file name: the
        # package's weights folder)
        init = Path(str(rec["init"]))
        if not init.is_absolute() and not init.is_file():
            init = WEIGHTS_DIR / init
    steps_arg, minutes_arg = steps, max_minutes
    seed = int(rec.get("seed", 0))
    steps = int(steps if steps is not None else rec.get("steps", 1000))
    budget_s = 60.0 * float(max_minutes if max_minutes is not None else
                            rec.get("max_minutes", 1e9))
    work_mm = float(rec.get("work_mm", 1.0))
    patch = int(rec.get("patch", 48))
    batch = int(rec.get("batch", 2))
    val_every = int(rec.get("val_every", 100))
    val_every_s = 60.0 * float(rec.get("val_every_minutes", 1e9))
    infer_cfg = dict(rec.get("infer") or {})
    loss_cfg = dict(rec.get("loss") or {})
    aug_cfg = dict(rec.get("augment") or {})
    name = str(rec["name"])
    out = Path(out) if out else Path("runs") / "train" / (name + ("-finetune" if finetune else ""))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # denormal gradients make CPU convolutions erratically slow
    if init is not None:
        model, init_meta = load_checkpoint(init)
        model_cfg = {"channels": list(model.channels),
                     "deep_supervision": bool(rec.get("model", {}).get("deep_supervision",
                                                                       model.deep_supervision))}
        model.deep_supervision = model_cfg["deep_supervision"]
        work_mm = float(init_meta.get("recipe", {}).get("work_mm", work_mm))
    else:
        model_cfg = dict(rec.get("model") or {})
        model = build_model(model_cfg)
        init_meta = None
    dev = _resolve_device(device if device is not None else rec.get("device"))
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)  # faster oneDNN 3D convolutions
    else:
        model = model.to(dev)
        torch.backends.cudnn.benchmark = True
    loader_workers = int(rec.get("loader_workers", 0))
    say(("calibrating" if calibrate_only else "training") + f" on {dev.type}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
        + (f", {loader_workers} batch worker(s)" if loader_workers and not calibrate_only
           else ""))
    if patch % model.divisor:
        raise ConfigurationError(f"patch {patch} is not a multiple of {model.divisor}")

    if dataset is not None:
        tr_ref, va_ref = _split_dataset(dataset, seed, rec.get("train", {}).get("max_scans"))
    else:
        tr_ref, va_ref = open_split(rec["train"]), open_split(rec["val"])
    t_load = time.perf_counter()
    samp_cfg = dict(rec.get("sampling") or {})
    crop = int(math.ceil(1.3 * patch))
    last = out / "last.pt"
    st = torch.load(last, map_location="cpu", weights_only=True) if (
        resume and last.is_file()) else None
    # a finished run re-run (e.g. to calibrate) needs no training data
    finished = st is not None and (int(st["step"]) >= steps or float(st["elapsed"]) >= budget_s)
    if calibrate_only:
        if st is None or not (out / f"{name}.pt").is_file():
            raise MissingInputError(f"nothing to calibrate: no {name} run (last.pt and "
                                    f"{name}.pt) in this folder", out)
        if not rec.get("calibrate"):
            raise ConfigurationError(f"recipe {name} has no calibrate step")
        finished = True
    cases = [] if finished else _load_cases(
        tr_ref, work_mm, say, margin=crop // 4,
        hard=samp_cfg if float(samp_cfg.get("hard_fraction", 0)) > 0 else None, seed=seed)
    val = None if calibrate_only else _ValSet(va_ref, work_mm)
    if val is not None:
        say(f"preprocessed {len(cases)} train + {len(val.items)} val scan(s) in "
            f"{time.perf_counter() - t_load:.0f} s")

    opt = torch.optim.Adam(model.parameters(), lr=float(rec.get("lr", 1e-3)),
                           weight_decay=float(rec.get("weight_decay", 0.0)))
    synth_cfg = dict(rec.get("synthetic_cmbs") or {})
    bank = None
    if not finished and float(synth_cfg.get("fraction", 0.0)) > 0:
        bank = CMBBank(int(synth_cfg.get("per_protocol", 100)), seed=seed,
                       median_mm=float(synth_cfg.get("median_mm", 2.7)),
                       log_sd=float(synth_cfg.get("log_sd", 0.5)),
                       range_mm=tuple(float(v) for v in synth_cfg.get("range_mm", (1.5, 10.0))),
                       uniform_share=float(synth_cfg.get("uniform_share", 0.3)))
        say(f"rendered {len(bank)} synthetic CMBs in {bank.seconds:.0f} s")

    def make_sampler(sampler_seed: int) -> PatchSampler:
        return PatchSampler(
            cases, crop, pos_fraction=float(samp_cfg.get("pos_fraction", 0.67)),
            hard_fraction=float(samp_cfg.get("hard_fraction", 0.0)), seed=sampler_seed,
            bank=bank, synth_fraction=float(synth_cfg.get("fraction", 0.0)),
            synth_max=int(synth_cfg.get("max_per_crop", 2)),
            synth_margin=int(synth_cfg.get("margin_vox", 10)))

    # in-process batches (loader_workers 0): one sampler whose state is checkpointed
    sampler = None if finished or loader_workers else make_sampler(seed)
    g = torch.Generator().manual_seed(seed)
    step, best, curve, elapsed0 = 0, -1.0, [], 0.0
    sampler_state = None
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, best, elapsed0 = int(st["step"]), float(st["best"]), float(st["elapsed"])
        g.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        extra = json.loads((out / "last.json").read_text())
        sampler_state = extra["sampler_rng"]
        if sampler is not None:
            sampler.rng.bit_generator.state = sampler_state
        curve = extra["curve"]
        say(f"resumed from {last} at step {step} (best val CPM {best:.3f})")
    logf = open(out / "log.jsonl", "a")
    t0 = time.perf_counter() - elapsed0
    record_base = {
        "recipe": {k: v for k, v in rec.items() if not k.startswith("_")},
        "recipe_file": _package_path(rec.get("_path"), RECIPES_DIR), "seed": seed,
        "init": None if init is None else {
            "path": _package_path(init, WEIGHTS_DIR), "sha256": (init_meta or {}).get("sha256")},
        "datasets": {"train": tr_ref.record(), "val": va_ref.record()},
        "command": ("cmbbench train --method ours --recipe " + name +
                    (f" --init {init}" if finetune else "") +
                    (f" --dataset {dataset}" if dataset else "") +
                    (f" --steps {steps_arg}" if steps_arg is not None else "") +
                    (f" --max-minutes {minutes_arg:g}" if minutes_arg is not None else "") +
                    (f" --device {device}" if device is not None else "") +
                    ("" if calibrate_after else " --no-calibrate") +
                    (" --calibrate-only" if calibrate_only else "")),
    }
    record_base["recipe"]["work_mm"] = work_mm

    def checkpoint_state() -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "best": best, "elapsed": time.perf_counter() - t0, "gen": g.get_state(),
                    "torch_rng": torch.get_rng_state()}, out / "last.pt.partial")
        os.replace(out / "last.pt.partial", last)
        (out / "last.json").write_text(json.dumps(
            {"sampler_rng": sampler.rng.bit_generator.state if sampler is not None
             else sampler_state, "curve": curve}, default=int))

    last_val = [time.perf_counter()]

    def validate() -> None:
        nonlocal best
        tv = time.perf_counter()
        both = val.score_both(model, infer_cfg)
        m = {**both["with"], "without_postprocessing": both["without"]}
        model.train()
        entry = {"step": step, "elapsed_s": round(time.perf_counter() - t0, 1), **m,
                 "val_seconds": round(time.perf_counter() - tv, 1)}
        curve.append(entry)
        logf.write(json.dumps({"kind": "val", **entry}) + "\n")
        logf.flush()
        last_val[0] = time.perf_counter()
        # model selection on the better of the two post-processing variants: calibration
        # chooses the variant afterwards, so either may be the one shipped
        variants = [m["cpm"], m["without_postprocessing"]["cpm"]]
        cpm = max((c for c in variants if np.isfinite(c)), default=-1.0)
        say(f"step {step}: val CPM {m['cpm']:.3f} (without rules "
            f"{m['without_postprocessing']['cpm']:.3f}) recall {m['recall_pooled']:.3f} "
            f"FP/scan {m['fp_per_scan']:.2f} ({entry['val_seconds']:.0f} s)")
        if cpm > best or not (out / f"{name}.pt").is_file():
            best = max(best, cpm)
            save_checkpoint(model, out / f"{name}.pt", {
                **record_base, "step": step, "val": m, "val_curve": curve,
                "training_seconds": round(time.perf_counter() - t0, 1),
                "hardware": _hardware()})

    batches = None
    if loader_workers and not finished:
        batches = iter(torch.utils.data.DataLoader(
            _BatchStream(make_sampler, batch, patch, aug_cfg, seed, step), batch_size=None,
            num_workers=loader_workers, prefetch_factor=4, pin_memory=dev.type == "cuda"))
    model.train()
    running, n_run = 0.0, 0
    lr0 = float(rec.get("lr", 1e-3))
    poly = str(rec.get("lr_schedule", "constant")) == "poly"
    while not calibrate_only and step < steps and time.perf_counter() - t0 < budget_s:
        if poly:  # lr0 (1 - progress)^0.9, progress by steps or by the wall-clock budget
            frac = max(step / steps, (time.perf_counter() - t0) / budget_s)
            for grp in opt.param_groups:
                grp["lr"] = lr0 * max(1.0 - frac, 0.02) ** 0.9
        if batches is not None:
            xb, yb = next(batches)
        else:
            xb, yb = sampler.batch(batch)
            xb, yb = augment_batch(torch.from_numpy(xb), torch.from_numpy(yb), patch, g,
                                   **{k: float(v) for k, v in aug_cfg.items()})
        if dev.type == "cpu":
            xb = xb.contiguous(memory_format=torch.channels_last_3d)
        else:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        loss = combined_loss(model(xb), yb, ce_weights=tuple(loss_cfg.get("ce_weights",
                                                                          (0.1, 5.0))),
                             alpha=float(loss_cfg.get("alpha", 0.5)),
                             beta=float(loss_cfg.get("beta", 0.5)),
                             gamma=float(loss_cfg.get("gamma", 4 / 3)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running += float(loss.detach())
        n_run += 1
        if step % 10 == 0 or step == steps:
            logf.write(json.dumps({"kind": "train", "step": step, "loss": running / n_run,
                                   "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
            logf.flush()
            if step % 50 == 0:
                say(f"step {step}: loss {running / n_run:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            running, n_run = 0.0, 0
        if step % val_every == 0 or time.perf_counter() - last_val[0] > val_every_s:
            validate()
            checkpoint_state()
    del batches  # stops the batch workers
    if not calibrate_only and (not curve or curve[-1]["step"] != step):
        validate()
        checkpoint_state()
    logf.close()
    train_seconds = time.perf_counter() - t0  # a finished run re-run: the recorded time
    best_path = out / f"{name}.pt"
    meta = json.loads(best_path.with_suffix(".json").read_text())
    cal = rec.get("calibrate")
    if cal and (calibrate_only or ("operating" not in meta and calibrate_after)):
        cal_ref = open_split(cal) if dataset is None else va_ref
        say(f"calibrating the operating point on {len(cal_ref.items)} {cal_ref.name} scan(s)")
        best_model, _ = load_checkpoint(best_path)
        best_model = best_model.to(dev)
        meta["operating"] = calibrate(best_model, _ValSet(cal_ref, work_mm), infer_cfg,
                                      surfaces=tuple(float(x) for x in
                                                     cal.get("surfaces_mm", (2.0, 0.0))),
                                      progress=say)
        meta.setdefault("recipe", {})["calibrate"] = cal
    meta["val_curve"] = curve
    meta["last_command"] = record_base["command"]
    meta["total_training_seconds"] = round(train_seconds, 1)
    if cal and "seconds" in meta.get("operating", {}):
        meta["calibration_seconds"] = meta["operating"]["seconds"]
    meta["total_steps"] = step
    if sampler is not None and sampler.bank is not None:
        meta["synthetic_cmbs_inserted"] = sampler.n_synthetic  # this session's, if resumed
    # the record may change, the weights not: rewrite the JSON only (sha256 unchanged)
    best_path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    say(f"best val CPM {best:.3f}; checkpoint {best_path}")
    return best_path
