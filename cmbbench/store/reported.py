"""The ``reported`` tier: results copied from papers, seeded from ``reported.yaml``.

The seed file ships inside the package; :func:`reported_bundles` turns each row into a run of
tier ``reported`` (``aggregates`` stratum ``all`` without intervals, a ``reported`` row with the
citation, table/page, the source's own rule and split, and a note). Datasets of the registry
(``DOU``, ``VALDO``, ``YONSEI``) keep their registry ids so reported rows sit next to the runs
cmbbench computed on them; the others are described in the seed file.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from importlib import resources

import yaml

from ..errors import ConfigurationError, UnreadableInputError
from .bundle import RunBundle, dataset_id, make_run_id, method_row

__all__ = ["SEED_VERSION", "load_seed", "reported_bundles"]

log = logging.getLogger(__name__)

_SEED_FILE = "reported.yaml"


@lru_cache(maxsize=1)
def load_seed() -> dict:
    """The parsed seed file (``cmbbench/store/reported.yaml``)."""
    text = resources.files("cmbbench.store").joinpath(_SEED_FILE).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # pragma: no cover - the shipped file is tested
        raise UnreadableInputError(f"invalid YAML ({exc})", _SEED_FILE) from None
    for key in ("seed_version", "methods", "datasets", "rows"):
        if key not in data:
            raise UnreadableInputError(f"missing key {key!r}", _SEED_FILE)
    return data


SEED_VERSION: str = str(load_seed()["seed_version"])


@lru_cache(maxsize=64)
def _registry_dataset(name: str) -> dict | None:
    from ..registry import load_card

    try:
        card = load_card(name)
    except Exception:  # noqa: BLE001 - registry unavailable: describe the dataset minimally
        return None
    version = str(card.get("version", "0"))
    counts = card.get("counts") or {}
    keep = {k: v for k, v in card.items() if not str(k).startswith("_") and k != "checksums"}
    return {"dataset_id": dataset_id(str(card["name"]), version), "name": str(card["name"]),
            "version": version, "n_scans": counts.get("scans"), "n_cmb": counts.get("cmbs"),
            "synthetic": card.get("kind") == "synthetic",
            "card_json": json.dumps(keep, sort_keys=True, default=str), "stats_json": None,
            "path": None}


def _dataset_row(name: str, seed: dict) -> dict:
    described = seed["datasets"].get(name)
    if described is None:
        row = _registry_dataset(name)
        row = None if row is None else dict(row)
        if row is None:
            row = {"dataset_id": dataset_id(name, "1"), "name": name, "version": "1",
                   "n_scans": None, "n_cmb": None, "synthetic": False, "card_json": None,
                   "stats_json": None, "path": None}
        return row
    version = str(described.get("version", "external"))
    card = {"name": described["name"], "version": version, "kind": "external",
            "description": described.get("description"), "source": "reported results seed"}
    return {"dataset_id": dataset_id(str(described["name"]), version),
            "name": str(described["name"]), "version": version,
            "n_scans": described.get("n_scans"), "n_cmb": described.get("n_cmb"),
            "synthetic": False, "card_json": json.dumps(card, sort_keys=True),
            "stats_json": None, "path": None}


def reported_bundles() -> list[RunBundle]:
    """One bundle per row of the seed file.

    Raises
    ------
    ConfigurationError
        A row names a method that the seed file does not describe.
    """
    seed = load_seed()
    out = []
    for n, row in enumerate(seed["rows"]):
        mkey = row["method"]
        m = seed["methods"].get(mkey)
        if m is None:
            raise ConfigurationError(f"row {n} names unknown method {mkey!r}", _SEED_FILE)
        method = method_row(name=str(m["name"]), version=str(m["version"]),
                            citation=m.get("citation"), paper_url=m.get("paper_url"),
                            code_url=m.get("code_url"), description=m.get("description"),
                            trainable=m.get("trainable"), training_data=m.get("training_data"),
                            test_overlap=m.get("test_overlap"),
                            manifest={"reported": True, **{k: v for k, v in m.items()}})
        dataset = _dataset_row(str(row["dataset"]), seed)
        split = str(row.get("split", "all"))
        rule_id = str(row.get("rule_id", "reported"))
        run_id = make_run_id(method["method_id"], dataset["dataset_id"], rule_id, split,
                             f"reported:{row.get('citation')}:{row.get('table_page')}")
        n_scans = row.get("n_scans", dataset.get("n_scans"))
        n_les = row.get("n_lesions", dataset.get("n_cmb"))
        run = {"run_id": run_id, "method_id": method["method_id"],
               "dataset_id": dataset["dataset_id"], "split": split, "rule_id": rule_id,
               "tier": "reported", "status": "complete", "operating_threshold": None,
               "n_scans": n_scans, "run_dir": None, "cmbbench_version": None,
               "versions_json": None,
               "config_json": json.dumps({"seed_version": SEED_VERSION, "row": n,
                                          "source": seed.get("source")}, sort_keys=True),
               "created_at": None, "submission_sha256": None, "failed_scans_json": None}
        aggs = [{"run_id": run_id, "stratum": "all", "stratum_value": "all", "metric": str(k),
                 "value": float(v), "ci_lower": None, "ci_upper": None, "n_scans": n_scans,
                 "n_lesions": n_les, "n_boot": None, "seed": None}
                for k, v in (row.get("metrics") or {}).items()]
        rep = {"run_id": run_id, "citation": row.get("citation"), "url": row.get("url"),
               "table_page": row.get("table_page"), "paper_rule": row.get("paper_rule"),
               "paper_split": row.get("paper_split"), "note": row.get("note"),
               "source": seed.get("source")}
        out.append(RunBundle(run=run, method=method, dataset=dataset, aggregates=aggs,
                             reported={k: (" ".join(str(v).split()) if isinstance(v, str) else v)
                                       for k, v in rep.items()}))
    return out
