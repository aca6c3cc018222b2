"""Import a run directory into the store.

A run directory written by ``cmbbench evaluate`` (tier ``reproduced``) or ``cmbbench submit``
(tier ``scored``) holds ``run.json`` and ``results/`` (:meth:`cmbbench.scoring.ScoreResult.save`:
``matches.csv``, ``scans.csv``, ``aggregates.json``, ``froc.csv``, ...). The reference dataset
is opened from the path recorded in ``run.json`` (else by its registry name) for its scans,
lesions, image paths, voxel coordinates and mimics; when it is gone, the scans and lesions are
taken from the results tables (no image paths, voxel coordinates or mimic classes) and the
import says so.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..dataset import HarmonizedDataset, read_dataset
from ..errors import CmbbenchError, MissingInputError, UnreadableInputError
from ..runs import read_run_config
from .bundle import (
    RunBundle,
    curve_rows,
    dataset_id,
    dataset_rows,
    first_url,
    make_run_id,
    match_rows,
    method_id,
    method_row,
    overall_aggregate_rows,
    scan_affines,
    scan_metric_rows,
    stratum_rows,
)
from .mimics import fp_mimic_classes

__all__ = ["ImportReport", "bundle_from_result_tables", "bundle_from_run_dir"]

log = logging.getLogger(__name__)

#: run.json ``kind`` -> provenance tier
_TIER_OF_KIND = {"evaluate": "reproduced", "submission": "scored"}


@dataclass
class ImportReport:
    """What one import wrote.

    Attributes
    ----------
    run_id, tier, status
        The run's id, provenance tier and status (``complete`` or ``partial``).
    counts
        Rows written per table.
    warnings
        What could not be derived (e.g. the dataset folder is gone).
    seconds
        Time to build and write the rows.
    """

    run_id: str
    tier: str
    status: str
    method_id: str
    dataset_id: str
    rule_id: str
    run_dir: str | None
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _read_results(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict, pd.DataFrame]:
    need = ("matches.csv", "scans.csv", "aggregates.json", "froc.csv")
    missing = [n for n in need if not (results / n).is_file()]
    if missing:
        raise MissingInputError(f"the run has no scores ({', '.join(missing)} missing): a "
                                "predict-only or unfinished run cannot be imported; finish it "
                                "with `cmbbench evaluate` or `cmbbench merge`", results)
    try:
        table = pd.read_csv(results / "matches.csv", dtype={"scan_id": str},
                            keep_default_na=False, na_values=[""], float_precision="round_trip")
        scans = pd.read_csv(results / "scans.csv", dtype={"scan_id": str},
                            float_precision="round_trip")
        froc = pd.read_csv(results / "froc.csv", float_precision="round_trip")
        info = json.loads((results / "aggregates.json").read_text())
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError) as exc:
        raise UnreadableInputError(f"malformed results ({' '.join(str(exc).split())})",
                                   results) from None
    table["location"] = table["location"].fillna("").astype(str)
    return table, scans, info, froc


def _open_reference(cfg: dict, info: dict) -> tuple[HarmonizedDataset | None, str | None]:
    d = cfg.get("dataset") or {}
    candidates = [d.get("path"), (info.get("meta") or {}).get("reference")]
    for p in candidates:
        if p and Path(p).is_dir():
            try:
                return read_dataset(p), str(Path(p).resolve())
            except CmbbenchError as exc:
                log.warning("cannot read the reference dataset %s: %s", p, exc)
    name = d.get("name")
    if name:
        from ..registry import resolve_dataset

        try:
            path = resolve_dataset(str(name), generate=False)
            return read_dataset(path), str(Path(path).resolve())
        except CmbbenchError:
            pass
    return None, None


def _dataset_from_results(name: str, version: str, table: pd.DataFrame, scans: pd.DataFrame,
                          synthetic: bool) -> HarmonizedDataset:
    """A stand-in dataset built from the results tables (reference rows hold the lesions)."""
    ref = table[table["kind"] == "reference"]
    les = pd.DataFrame({
        "scan_id": ref["scan_id"].astype(str), "lesion_id": ref["lesion_id"].astype(int),
        "x_mm": ref["x_mm"], "y_mm": ref["y_mm"], "z_mm": ref["z_mm"],
        "i": np.nan, "j": np.nan, "k": np.nan, "diameter_mm": ref["diameter_mm"],
        "volume_mm3": ref["volume_mm3"], "n_voxels": ref["n_voxels"],
        "location": ref["location"].replace("", "unknown"),
        "mask_source": ref["mask_source"].replace("", "none")})
    sc = scans.drop(columns=[c for c in ("n_ref", "tp", "fn", "tp_pred", "fp", "ignored",
                                         "merged", "n_pred", "precision", "recall", "f1")
                             if c in scans.columns])
    card = {"name": name, "version": version, "kind": "synthetic" if synthetic else "real"}
    return HarmonizedDataset(root=Path("/nonexistent-cmbbench-dataset"), card=card, scans=sc,
                             lesions=les.reset_index(drop=True))


def bundle_from_result_tables(*, run: dict, method: dict, ds: HarmonizedDataset,
                              dataset_path: str | None, table: pd.DataFrame,
                              scans: pd.DataFrame, aggregates: dict, ci: dict | None,
                              froc: pd.DataFrame, strata_boot: tuple[int, int] | None = None,
                              fp_mimic_class: pd.Series | None = None) -> RunBundle:
    """Every row of one run from its scored tables (no image is read except headers and mimic
    maps). ``run`` must hold ``run_id``; strata are bootstrapped with ``ci``'s recipe
    (``n_boot``, ``seed``) unless ``strata_boot`` gives one; ``fp_mimic_class`` overrides the
    attribution of FPs to mimics (:func:`cmbbench.store.mimics.fp_mimic_classes`)."""
    warnings: list[str] = []
    drow, scan_rows, lesion_rows = dataset_rows(ds, path=dataset_path)
    run = {**run, "dataset_id": drow["dataset_id"]}
    rid = run["run_id"]
    scan_ids = scans["scan_id"].astype(str).tolist()
    affines = scan_affines(ds if dataset_path else None, scan_ids)
    if dataset_path and len(affines) < len(scan_ids):
        warnings.append(f"{len(scan_ids) - len(affines)} scan image(s) not found: no voxel "
                        "coordinates for their matches")
    mimic = fp_mimic_class
    if mimic is None and ds.mimics is not None:
        mimic = fp_mimic_classes(table, ds.mimics, ds.root if dataset_path else None)
    n_boot = int((ci or {}).get("n_boot") or 0)
    seed = int((ci or {}).get("seed") or 0)
    if strata_boot is not None:
        n_boot, seed = strata_boot
    aggs = overall_aggregate_rows(rid, aggregates, ci)
    aggs += stratum_rows(rid, table, scans, n_boot=n_boot, seed=seed, fp_mimic_class=mimic)
    return RunBundle(run=run, method=method, dataset=drow, scans=scan_rows,
                     lesions=lesion_rows, scan_metrics=scan_metric_rows(rid, scans),
                     matches=match_rows(rid, table, affines=affines, mimic_class=mimic),
                     aggregates=aggs, curves=curve_rows(rid, froc), warnings=warnings)


def _method_from_config(cfg: dict, manifest: dict | None) -> dict:
    m = cfg.get("method") or {}
    if cfg.get("kind") == "submission":
        man = manifest or {}
        return method_row(
            name=str(m.get("name")), version=str(m.get("version")),
            citation=m.get("citation") or man.get("citation") or man.get("paper"),
            paper_url=m.get("paper_url") or first_url(man.get("paper"), man.get("citation")),
            code_url=m.get("code_url") or man.get("code_url") or man.get("code"),
            description=m.get("description") or man.get("description"),
            trainable=m.get("trainable"), training_data=m.get("training_data"),
            test_overlap=m.get("test_overlap") or "not declared", manifest=man or None)
    req = m.get("requirements") or {}
    trainable = bool(req.get("trainable")) if "trainable" in req else None
    return method_row(
        name=str(m.get("name")), version=str(m.get("version")), citation=m.get("citation"),
        paper_url=first_url(m.get("citation")), code_url=None,
        description=m.get("description"), trainable=trainable,
        training_data=None if trainable else "none (not trained)",
        test_overlap="not declared" if trainable else "none (not trained)",
        manifest={"params": m.get("params", {}), "source": m.get("source"),
                  "requirements": req})


def bundle_from_run_dir(run_dir: str | Path, *, tier: str | None = None) -> RunBundle:
    """Build the rows of a finished run directory (see the module docstring).

    Parameters
    ----------
    tier
        Override the tier derived from ``run.json`` (``evaluate`` -> ``reproduced``,
        ``submission`` -> ``scored``).

    Raises
    ------
    MissingInputError
        No ``run.json``, or no scores (a predict-only or unfinished run).
    UnreadableInputError
        Malformed ``run.json`` or results tables.
    """
    t0 = time.perf_counter()
    root = Path(run_dir)
    cfg = read_run_config(root)
    if cfg is None:
        raise MissingInputError("not a cmbbench run directory (no run.json)", root)
    kind = cfg.get("kind")
    tier = tier or _TIER_OF_KIND.get(str(kind))
    if tier not in ("reproduced", "scored"):
        raise MissingInputError(f"a {kind!r} run has no scores to import; only `evaluate` and "
                                "`submit` runs can be imported", root / "run.json")
    table, scans, info, froc = _read_results(root / "results")
    rule = info.get("rule") or {}
    meta = info.get("meta") or {}
    ds, ds_path = _open_reference(cfg, info)
    d = cfg.get("dataset") or {}
    name = str(d.get("name") or meta.get("dataset") or "unknown")
    version = str(d.get("version") or meta.get("dataset_version") or "0")
    warnings = []
    if ds is None:
        warnings.append(f"reference dataset {name} not found (recorded path "
                        f"{d.get('path')}); scans and lesions taken from the results tables, "
                        "without image paths, voxel coordinates or mimic classes")
        ds = _dataset_from_results(name, version, table, scans,
                                   synthetic=str(name).upper().startswith("SYNTH"))
    method = _method_from_config(cfg, meta.get("manifest"))
    failed = sorted(set((meta.get("run") or {}).get("failed_scans") or {})
                    | set(info.get("missing_scored_as_empty") or []))
    rule_id = str(rule.get("rule_id") or meta.get("rule_id"))
    did = dataset_id(ds.name, str(ds.card.get("version", version) or version))
    split = str(cfg.get("split") or "all")
    source = (cfg.get("submission") or {}).get("sha256") if tier == "scored" else None
    source = source or str(root.resolve())
    run = {
        "run_id": make_run_id(method["method_id"], did, rule_id, split, source),
        "method_id": method_id(method["name"], method["version"]), "dataset_id": did,
        "split": split, "rule_id": rule_id, "tier": tier,
        "status": "partial" if failed else "complete",
        "operating_threshold": rule.get("operating_threshold"), "n_scans": len(scans),
        "run_dir": str(root.resolve()), "cmbbench_version": meta.get("cmbbench_version"),
        "versions_json": json.dumps(cfg.get("versions") or {}, sort_keys=True),
        "config_json": json.dumps({k: v for k, v in cfg.items() if k != "versions"},
                                  sort_keys=True, default=str),
        "created_at": cfg.get("created") or cfg.get("updated"),
        "submission_sha256": (cfg.get("submission") or {}).get("sha256"),
        "failed_scans_json": json.dumps(failed) if failed else None,
    }
    bundle = bundle_from_result_tables(run=run, method=method, ds=ds, dataset_path=ds_path,
                                       table=table, scans=scans,
                                       aggregates=info.get("aggregates") or {},
                                       ci=info.get("ci"), froc=froc)
    bundle.warnings = warnings + bundle.warnings
    log.debug("built the rows of %s in %.2f s", root, time.perf_counter() - t0)
    return bundle
