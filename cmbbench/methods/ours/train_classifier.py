"""Training of the second stage of "ours": the candidate classifier (``stage: classifier``
recipes, run by ``cmbbench train --method ours --recipe NAME``).

The U-Net of the recipe's ``init`` checkpoint (sha256-checked, unchanged) is run on every scan
of the recipe's ``train`` split (or list of splits, pooled), which the U-Net has not been
trained on (SYNTH-train2, SYNTH-train3 and SYNTH-train4 for the shipped recipe: stacking on
held-out data).
Its candidates are described by :func:`.classifier.candidate_features` and labelled by the
reference: a candidate whose peak lies in a reference lesion's mask dilated by one working-grid
voxel is a CMB. A
:class:`.classifier.CandidateClassifier` is fitted on the candidates that pass the U-Net's
location rules. On the ``calibrate`` split (SYNTH-val) the classifier's scores and the U-Net's
own are compared by CPM (cmbbench scoring on the native grid); the better one is kept and its
operating threshold chosen, as :func:`.train.calibrate` does for the U-Net.

Files in ``out``:

- ``candidates/<scan_id>.npz``: per-scan cache (candidate rows, features, labels, the
  component voxels of the probability map); reused by a re-run with the same U-Net, threshold
  and feature set, so changing only the classifier's settings costs seconds;
- ``<recipe name>.pt`` / ``.json``: the U-Net weights of ``init`` plus the classifier, and
  the record (recipe, both sha256, datasets with exact scan ids, the classifier's training
  numbers, the calibration).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from ...errors import ConfigurationError
from . import WEIGHTS_DIR
from .checkpoint import load_checkpoint, save_checkpoint
from .classifier import (
    FEATURES,
    CandidateClassifier,
    component_scales,
    describe_candidates,
    fit_classifier,
)
from .infer import sliding_window
from .plugin import INFER_DEFAULTS, Ours
from .postprocess import keep_candidate, parse_rules
from .preprocess import Preprocessed, preprocess, resample_labels

__all__ = ["ScanCandidates", "scan_candidates", "train_classifier"]

log = logging.getLogger(__name__)

#: bump when :func:`.classifier.candidate_features` changes meaning (invalidates caches)
FEATURES_VERSION = "1"


class ScanCandidates:
    """One scan's U-Net candidates on the working grid: rows (``label``, peak ``i, j, k``,
    U-Net ``score``, ``kept`` by the location rules), their features, their reference label
    ``y`` (1: a CMB; -1: no reference), and the candidate components' voxels (flat indices,
    probabilities, labels) from which a re-scored map is rebuilt."""

    def __init__(self, scan_id: str, shape: tuple, rows: pd.DataFrame, features: np.ndarray,
                 y: np.ndarray, vox: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self.scan_id, self.shape, self.rows = scan_id, tuple(int(v) for v in shape), rows
        self.features, self.y, self.vox = features, y, vox

    def save(self, path: Path, key: str) -> None:
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(
            tmp, key=np.array(key), scan_id=np.array(self.scan_id), shape=np.array(self.shape),
            rows_int=self.rows[["label", "i", "j", "k"]].to_numpy(np.int64).reshape(-1, 4),
            score=self.rows["score"].to_numpy(np.float64),
            kept=self.rows["kept"].to_numpy(bool), features=self.features, y=self.y,
            vox_idx=self.vox[0], vox_prob=self.vox[1], vox_lab=self.vox[2])
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, key: str) -> ScanCandidates | None:
        """The cached scan, or None when absent, unreadable or made under another key."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                ri = z["rows_int"]
                rows = pd.DataFrame({"label": ri[:, 0], "i": ri[:, 1], "j": ri[:, 2],
                                     "k": ri[:, 3], "score": z["score"], "kept": z["kept"]})
                return cls(str(z["scan_id"]), tuple(z["shape"]), rows, z["features"], z["y"],
                           (z["vox_idx"], z["vox_prob"], z["vox_lab"]))
        except (OSError, KeyError, ValueError):
            return None

    def rebuild(self, scores: np.ndarray) -> np.ndarray:
        """Working-grid map of the components, each rescaled so its peak is its new score."""
        out = np.zeros(int(np.prod(self.shape)), np.float32)
        idx, prob, lab = self.vox
        if len(self.rows) and len(idx):
            n = int(max(lab.max(), self.rows["label"].max())) + 1
            scale = component_scales(self.rows["label"].to_numpy(),
                                     self.rows["score"].to_numpy(float), scores, n)
            out[idx] = prob * scale[lab]
        return out.reshape(self.shape)


def scan_candidates(model: torch.nn.Module, pre: Preprocessed, scan_id: str, *,
                    threshold: float, rules: tuple[str, ...], patch: int = 96,
                    overlap: float = 0.15, ref_work: np.ndarray | None = None
                    ) -> ScanCandidates:
    """Run the U-Net on ``pre`` and describe its candidates (see :class:`ScanCandidates`).

    ``ref_work``: the reference label map on the working grid (None: ``y`` is -1)."""
    prob, logodds = sliding_window(model, pre.image, pre.mask, patch=patch, overlap=overlap,
                                   output="both")
    lab, rows, tissue, feats = describe_candidates(prob, logodds, pre, threshold=threshold)
    kept = [keep_candidate(tissue, (r["i"], r["j"], r["k"]), rules=rules)[0] for r in rows]
    if ref_work is not None:
        dil = ndimage.grey_dilation(ref_work, size=(3, 3, 3))
        y = np.array([int(dil[r["i"], r["j"], r["k"]] > 0) for r in rows], np.int8)
    else:
        y = np.full(len(rows), -1, np.int8)
    table = pd.DataFrame({"label": [r["label"] for r in rows], "i": [r["i"] for r in rows],
                          "j": [r["j"] for r in rows], "k": [r["k"] for r in rows],
                          "score": [r["score"] for r in rows], "kept": kept})
    idx = np.flatnonzero(lab.ravel()).astype(np.int64)
    vox = (idx, prob.ravel()[idx].astype(np.float32), lab.ravel()[idx].astype(np.int32))
    return ScanCandidates(scan_id, prob.shape, table, feats, y, vox)


def _cached_candidates(model: torch.nn.Module, ref, cache: Path, key: str, *,  # noqa: ANN001
                       work_mm: float, infer: dict, rules: tuple[str, ...],
                       say: Callable[[str], None], pres: dict | None = None
                       ) -> list[ScanCandidates]:
    """:func:`scan_candidates` of every scan of ``ref``, from ``cache`` where present."""
    from ...nifti import read_volume

    cache.mkdir(parents=True, exist_ok=True)
    out = []
    t0 = time.perf_counter()
    made = 0
    for n, (sid, ip, lp, _, _) in enumerate(ref.items, start=1):
        path = cache / f"{sid}.npz"
        sc = ScanCandidates.load(path, key)
        if sc is None:
            if pres is not None and sid in pres:
                pre, affine = pres[sid]
            else:
                vol = read_volume(ip)
                pre, affine = preprocess(vol.data, vol.affine, work_mm=work_mm), vol.affine
            ref_work = None
            if lp is not None and Path(lp).is_file():
                ref_work = resample_labels(np.asarray(read_volume(lp).data), affine, pre)
            sc = scan_candidates(model, pre, sid, threshold=float(infer["threshold"]),
                                 rules=rules, patch=int(infer["patch"]),
                                 overlap=float(infer["overlap"]), ref_work=ref_work)
            sc.save(path, key)
            made += 1
        out.append(sc)
        if made and (n % 10 == 0 or n == len(ref.items)):
            say(f"candidates of {n}/{len(ref.items)} {ref.name} scans "
                f"({time.perf_counter() - t0:.0f} s, {made} computed)")
    return out


def _training_matrix(scans: list[ScanCandidates]) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the labelled candidates that pass the location rules."""
    xs, ys = [], []
    for sc in scans:
        m = sc.rows["kept"].to_numpy(bool) & (sc.y >= 0)
        xs.append(sc.features[m])
        ys.append(sc.y[m])
    x = np.concatenate(xs) if xs else np.zeros((0, len(FEATURES)), np.float32)
    return x, (np.concatenate(ys) if ys else np.zeros(0, np.int8))


def fit_ensemble(x: np.ndarray, y: np.ndarray, cfg: dict, seed: int) -> CandidateClassifier:
    """The recipe's classifier (``classifier`` mapping: ``hidden``, ``members``, ``epochs``,
    ``lr``, ``weight_decay``) fitted with ``seed``."""
    return fit_classifier(x, y, hidden=tuple(cfg.get("hidden", (16,))),
                          members=int(cfg.get("members", 1)),
                          epochs=int(cfg.get("epochs", 1500)), lr=float(cfg.get("lr", 0.01)),
                          weight_decay=float(cfg.get("weight_decay", 1e-3)), seed=seed)


def _score_variants(val_scans: list[ScanCandidates], val, clf: CandidateClassifier,  # noqa: ANN001
                    meth: Ours, floor: float, say: Callable[[str], None]) -> dict:
    """Operating points on the calibration scans with the U-Net's scores (``unet``) and the
    classifier's (``classifier``)."""
    from ...matching import get_rule
    from .calibration import operating_point
    from .training_data import score_native

    rule = get_rule("cmbbench")
    acc: dict[str, tuple[list, list]] = {"unet": ([], []), "classifier": ([], [])}
    for sc, item in zip(val_scans, val.items):
        kept = sc.rows["kept"].to_numpy(bool)
        rows = [{"i": int(r.i), "j": int(r.j), "k": int(r.k), "kept": bool(r.kept),
                 "reason": "parenchyma" if r.kept else "dropped", "score": 0.0}
                for r in sc.rows.itertuples()]
        unet = sc.rows["score"].to_numpy(float)
        for name, scores in (("unet", unet), ("classifier", clf.predict(sc.features))):
            s = np.where(kept, scores, 0.0)
            for r, v in zip(rows, s):
                r["score"] = float(v)
            table, extras = score_native(meth, sc.rebuild(s), rows, item, rule,
                                         postprocess=True)
            acc[name][0].append(table)
            acc[name][1].append(extras)
    ids = [i[0] for i in val.items]
    out = {}
    for name, (tables, extras) in acc.items():
        out[name] = operating_point(tables, extras, ids, rule, floor=floor)
        say(f"calibration {name}: CPM {out[name]['cpm']:.3f}, best F1 {out[name]['f1']:.3f} "
            f"(P {out[name]['precision']:.3f} R {out[name]['recall']:.3f} FP/scan "
            f"{out[name]['fp_per_scan']:.2f}) at threshold {out[name]['threshold']:.6f}")
    return out


def _train_specs(rec: dict) -> list[dict]:
    """The recipe's ``train`` entry as a list of split specs (one mapping, or a list of them:
    their candidates are pooled)."""
    spec = rec.get("train")
    specs = spec if isinstance(spec, list) else [spec or {}]
    if not specs or not all(isinstance(s, dict) for s in specs):
        raise ConfigurationError(f"recipe {rec.get('name')}: train is a split "
                                 "({dataset, version, max_scans}) or a list of them")
    return specs


def _train_record(refs: list) -> dict:  # noqa: ANN001 - list[DataRef]
    """Record of the classifier's training scans: one split's record, or for several the
    joined name, each split's record (``parts``) and all scan ids."""
    if len(refs) == 1:
        return refs[0].record()
    parts = [r.record() for r in refs]
    return {"name": "+".join(p["name"] for p in parts),
            "version": "+".join(p["version"] for p in parts), "parts": parts,
            "scan_ids": [s for p in parts for s in p["scan_ids"]]}


def train_classifier(rec: dict, *, out: str | Path | None = None,
                     init: str | Path | None = None, dataset: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> Path:
    """Fit and calibrate the candidate classifier of recipe ``rec`` (``stage: classifier``);
    returns the checkpoint path (see the module docstring)."""
    from .train import hardware, package_path
    from .training_data import ValSet, open_split, split_dataset

    say = progress or (lambda m: log.info(m))
    name = str(rec["name"])
    out = Path(out) if out else Path("runs") / "train" / name
    out.mkdir(parents=True, exist_ok=True)
    init = init if init is not None else rec.get("init")
    if not init:
        raise ConfigurationError(f"recipe {name}: a classifier stage needs an init checkpoint "
                                 "(the trained U-Net)")
    init = Path(str(init))
    if not init.is_absolute() and not init.is_file():
        init = WEIGHTS_DIR / init
    model, init_meta = load_checkpoint(init)
    init_sha = str(init_meta["sha256"])
    seed = int(rec.get("seed", 0))
    cfg = dict(rec.get("classifier") or {})
    # candidate threshold, tile and overlap: the recipe's, else the U-Net's, else the defaults
    infer = {**INFER_DEFAULTS, **(init_meta.get("recipe", {}).get("infer") or {}),
             **(rec.get("infer") or {})}
    cand_thr = float(infer["threshold"])
    work_mm = float(init_meta.get("recipe", {}).get("work_mm", 1.0))
    op0 = init_meta.get("operating") or {}
    rules = parse_rules(op0.get("rules")) if op0.get("postprocess", True) else ()
    specs = _train_specs(rec)
    if dataset is not None:
        max_scans = [s.get("max_scans") for s in specs]
        tr_ref, cal_ref = split_dataset(dataset, seed, None if None in max_scans
                                         else sum(int(v) for v in max_scans))
        tr_refs = [tr_ref]
    else:
        tr_refs = [open_split(s) for s in specs]
        cal_ref = open_split(rec["calibrate"])
    tr_ids = [i[0] for r in tr_refs for i in r.items]
    if len(set(tr_ids)) < len(tr_ids):
        raise ConfigurationError(f"recipe {name}: the train splits share scans")
    overlap = set(tr_ids) & {i[0] for i in cal_ref.items}
    if overlap:
        raise ConfigurationError(f"recipe {name}: {len(overlap)} scan(s) in both the train and "
                                 "the calibrate split")
    trained_on = {s for d in (init_meta.get("datasets") or {}).values() if isinstance(d, dict)
                  for s in d.get("scan_ids", [])}
    seen = sorted(trained_on & set(tr_ids))
    if seen:
        say(f"warning: {len(seen)} classifier training scan(s) were seen by the U-Net "
            f"(e.g. {seen[0]}); its candidates there are optimistic")
    key = (f"{init_sha}|features {FEATURES_VERSION}|threshold {infer['threshold']}|"
           f"patch {infer['patch']}|overlap {infer['overlap']}|"
           f"rules {','.join(rules)}|work {work_mm}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tr_scans = [sc for r in tr_refs
                for sc in _cached_candidates(model, r, out / "candidates", key,
                                             work_mm=work_mm, infer=infer, rules=rules,
                                             say=say)]
    x, y = _training_matrix(tr_scans)
    n_all = sum(len(sc.rows) for sc in tr_scans)
    say(f"{len(x)} training candidate(s) ({int(y.sum())} CMBs) of {n_all} from "
        f"{len(tr_scans)} scan(s)")
    if len(np.unique(y)) < 2:
        raise ConfigurationError(f"recipe {name}: the U-Net's candidates on "
                                 f"{'+'.join(r.name for r in tr_refs)} are all of one class "
                                 "(CMB or not); the classifier needs both (more or other "
                                 "training scans)")
    t_fit = time.perf_counter()
    clf = fit_ensemble(x, y, cfg, seed)
    fit_s = time.perf_counter() - t_fit
    p_tr = clf.predict(x)
    say(f"classifier fitted in {fit_s:.1f} s; train accuracy "
        f"{float(((p_tr > 0.5) == (y > 0)).mean()):.3f}")

    val = ValSet(cal_ref, work_mm)
    pres = {sid: (pre, affine) for sid, pre, affine, _, _, _ in val.items}
    val_scans = _cached_candidates(model, cal_ref, out / "candidates", key, work_mm=work_mm,
                                   infer=infer, rules=rules, say=say, pres=pres)
    meth = Ours(threshold=cand_thr)
    variants = _score_variants(val_scans, val, clf, meth, cand_thr, say)
    chosen = max(("unet", "classifier"), key=lambda n: (np.nan_to_num(
        variants[n]["cpm"], nan=-1.0), n == "unet"))
    v = variants[chosen]
    operating = {"postprocess": bool(rules), "surface_mm": float(op0.get("surface_mm", 0.0)),
                 "rules": list(rules), "score": "prob", "classifier": chosen == "classifier",
                 "threshold": float(np.clip(v["threshold"], cand_thr, 1.0 - 1e-6)),
                 "chosen": chosen, "variants": variants, "scans": [i[0] for i in val.items],
                 "rule": "cmbbench",
                 "dataset": {"name": cal_ref.name, "version": cal_ref.version}}
    path = out / f"{name}.pt"
    meta = {
        "recipe": {k: v for k, v in rec.items() if not k.startswith("_")},
        "recipe_file": package_path(rec.get("_path"), Path(__file__).parent / "recipes"),
        "stage": "classifier", "seed": seed,
        "init": {"path": package_path(init, WEIGHTS_DIR) or str(init), "sha256": init_sha,
                 "recipe": (init_meta.get("recipe") or {}).get("name")},
        "datasets": {"classifier_train": _train_record(tr_refs),
                     "calibrate": cal_ref.record()},
        "unet_datasets": init_meta.get("datasets"),
        "classifier": {"features": list(FEATURES), "features_version": FEATURES_VERSION,
                       "settings": cfg, "n_candidates": int(len(x)),
                       "n_cmb_candidates": int(y.sum()), "n_scans": len(tr_scans),
                       "train_accuracy": float(((p_tr > 0.5) == (y > 0)).mean()),
                       "fit_seconds": round(fit_s, 1)},
        "operating": operating,
        "training_seconds": round(time.perf_counter() - t0, 1),
        "hardware": hardware(),
    }
    meta["recipe"]["work_mm"] = work_mm
    meta["recipe"]["infer"] = infer
    save_checkpoint(model, path, meta, classifier=clf)
    say(f"kept {chosen} scores (val CPM {v['cpm']:.3f}, F1 {v['f1']:.3f}); checkpoint {path}")
    (out / "candidates" / "README.txt").write_text(
        "Per-scan candidate caches of cmbbench train (stage: classifier); key: " + key + "\n")
    log.debug("classifier record: %s", json.dumps(meta["classifier"]))
    return path
