"""The results store: schema contract, import of real run directories, strata with bootstrap
CIs, idempotent and atomic re-import, reported rows, export, URL resolution, the CLI, the
evaluate hook, the demo builder and the load-store generator. Every store is a real SQLite
file in a temporary folder."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner
from store_support import REPO, add_mimics, contract_columns, evaluated_run

from cmbbench.cli import main as cli_main
from cmbbench.errors import MissingInputError, StoreError
from cmbbench.metrics import stratified
from cmbbench.statistics import bootstrap_weights, percentile_interval
from cmbbench.store import (
    auto_import,
    export_store,
    import_run,
    init_store,
    open_store,
    resolve_url,
    store_revision,
    table_counts,
)
from cmbbench.store import schema as S
from cmbbench.store import writer as store_writer
from cmbbench.store.mimics import fp_mimic_classes
from cmbbench.store.reported import load_seed

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset folder, run directory) of a real `evaluate` run of `log` on the example."""
    return evaluated_run(tmp_path_factory.mktemp("store-run"))


@pytest.fixture(scope="module")
def imported(run, tmp_path_factory) -> tuple[str, str, Path]:
    """(db path, run_id, run dir): the run imported into a fresh store."""
    db = str(tmp_path_factory.mktemp("store-db") / "store.sqlite")
    rep = import_run(run[1], db=db)
    return db, rep.run_id, run[1]


def q(db: str, sql: str, **params: object) -> pd.DataFrame:
    engine = open_store(db)
    try:
        with engine.connect() as conn:
            return pd.read_sql(sa.text(sql), conn, params=params)
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# schema and location


def test_contract_columns_exist_in_schema_and_database(imported):
    contract = contract_columns()
    assert set(contract) == {"methods", "datasets", "scans", "lesions", "runs", "scan_metrics",
                             "matches", "aggregates", "curves", "reported"}
    engine = open_store(imported[0])
    insp = sa.inspect(engine)
    for table, cols in contract.items():
        assert cols, table
        in_db = {c["name"] for c in insp.get_columns(table)}
        missing = set(cols) - in_db
        assert not missing, (table, missing)
        assert set(cols) <= set(S.metadata.tables[table].c.keys())
    engine.dispose()


def test_sqlite_store_is_wal_with_busy_timeout(imported, tmp_path):
    con = sqlite3.connect(imported[0])
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    from cmbbench.store import writer_engine

    engine = writer_engine(str(tmp_path / "x.sqlite"), busy_timeout_s=7)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7000
    engine.dispose()


def test_resolve_url_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CMBBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CMBBENCH_DB", raising=False)
    assert resolve_url() == f"sqlite:///{(tmp_path / 'home' / 'store.sqlite').resolve()}"
    monkeypatch.setenv("CMBBENCH_DB", "postgresql+psycopg://u@h/db")
    assert resolve_url() == "postgresql+psycopg://u@h/db"
    assert resolve_url(str(tmp_path / "a.sqlite")) == f"sqlite:///{tmp_path / 'a.sqlite'}"
    assert resolve_url("sqlite:///x.db") == "sqlite:///x.db"


def test_open_store_never_creates_and_is_read_only(imported, tmp_path):
    missing = tmp_path / "none.sqlite"
    with pytest.raises(StoreError, match="db init"):
        open_store(str(missing))
    assert not missing.exists()
    engine = open_store(imported[0])
    with pytest.raises(sa.exc.OperationalError, match="readonly|read-only|query_only"), \
            engine.begin() as conn:
        conn.execute(S.meta.insert().values(key="x", value="y"))
    engine.dispose()


def test_malformed_url_and_other_schema_version_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not a database URL"):
        init_store("nosuchdriver+x://::bad")
    db = str(tmp_path / "s.sqlite")
    init_store(db, seed_reported=False)
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version 999"):
        init_store(db)


# ---------------------------------------------------------------------------------------------
# import


def test_import_writes_every_table_from_the_run(imported, run):
    db, run_id, run_dir = imported
    ds_root = run[0]
    results = run_dir / "results"
    info = json.loads((results / "aggregates.json").read_text())
    r = q(db, "SELECT * FROM runs WHERE run_id = :r", r=run_id).iloc[0]
    assert (r["tier"], r["status"], r["method_id"], r["dataset_id"], r["rule_id"]) == (
        "reproduced", "complete", "log@1", "EXAMPLE-v1", "cmbbench@1")
    assert r["run_dir"] == str(run_dir.resolve()) and r["split"] == "all"
    assert r["n_scans"] == 6 and r["operating_threshold"] == 0.5

    scans = pd.read_csv(results / "scans.csv", dtype={"scan_id": str})
    sm = q(db, "SELECT * FROM scan_metrics WHERE run_id = :r ORDER BY scan_id", r=run_id)
    assert sm["scan_id"].tolist() == sorted(scans["scan_id"])
    merged = sm.merge(scans, on="scan_id", suffixes=("", "_csv"))
    for c in ("tp", "fp", "fn", "n_ref", "n_pred"):
        assert (merged[c] == merged[f"{c}_csv"]).all(), c

    m = q(db, "SELECT * FROM matches WHERE run_id = :r", r=run_id)
    a = info["aggregates"]
    assert (m["kind"] == "tp").sum() == a["tp"] and (m["kind"] == "fn").sum() == a["fn"]
    assert (m["kind"] == "fp").sum() == a["fp"]
    assert m["lesion_id"][m["kind"] == "fp"].isna().all()
    assert m["candidate_id"][m["kind"] == "fn"].isna().all()
    assert m["score"][m["kind"] == "fn"].isna().all()
    assert m[["i", "j", "k"]].notna().all().all()  # the dataset is there: voxel coordinates
    # a TP row holds the matched candidate's position, a FN row the lesion's
    table = pd.read_csv(results / "matches.csv", dtype={"scan_id": str})
    cand = table[table["kind"] == "candidate"].set_index(["scan_id", "candidate_id"])
    for _, row in m[m["kind"] == "tp"].iterrows():
        c = cand.loc[(row["scan_id"], int(row["candidate_id"]))]
        assert np.allclose([row["x_mm"], row["y_mm"], row["z_mm"]],
                           [c["x_mm"], c["y_mm"], c["z_mm"]])
    lesions = pd.read_csv(ds_root / "lesions.csv", dtype={"scan_id": str})
    assert len(q(db, "SELECT * FROM lesions WHERE dataset_id = 'EXAMPLE-v1'")) == len(lesions)
    sc = q(db, "SELECT * FROM scans WHERE dataset_id = 'EXAMPLE-v1'")
    assert len(sc) == 6 and sc["image_path"].map(lambda p: Path(p).is_file()).all()
    assert set(sc["slice_thickness_bin"]) <= {"<=1.5 mm", "(1.5, 3] mm", ">3 mm"}

    froc = pd.read_csv(results / "froc.csv")
    cv = q(db, "SELECT * FROM curves WHERE run_id = :r ORDER BY curve, point", r=run_id)
    f = cv[cv["curve"] == "froc"]
    assert len(f) == len(froc) and f["threshold"].isna().sum() == 1  # the +inf point
    assert np.allclose(f["x"], froc["fp_per_scan"]) and np.allclose(f["y"], froc["sensitivity"])
    pr = cv[cv["curve"] == "pr"]
    assert len(pr) == froc["precision"].notna().sum() and pr["y"].between(0, 1).all()


def test_overall_aggregates_equal_the_scoring_and_use_store_names(imported):
    db, run_id, run_dir = imported
    info = json.loads((run_dir / "results" / "aggregates.json").read_text())
    ag = q(db, "SELECT * FROM aggregates WHERE run_id = :r AND stratum = 'all'", r=run_id)
    by = ag.set_index("metric")
    for key, name in (("precision_pooled", "precision"), ("recall_pooled", "recall"),
                      ("f1_pooled", "f1"), ("fp_per_scan", "fp_per_scan"),
                      ("fp_per_cmb", "fp_per_cmb"), ("cpm", "cpm"),
                      ("average_precision", "ap"), ("precision_mean", "precision_scan_mean"),
                      ("recall_sd", "recall_scan_sd")):
        assert by.loc[name, "value"] == pytest.approx(info["aggregates"][key]), name
        lo = info["ci"]["lower"][key]
        assert (by.loc[name, "ci_lower"] == pytest.approx(lo)) if lo is not None \
            else pd.isna(by.loc[name, "ci_lower"])
    assert "precision_pooled" not in by.index and "average_precision" not in by.index
    assert set(by["n_boot"]) == {50} and set(by["seed"]) == {1}
    # NaN-free: undefined values are NULL, never NaN text
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM aggregates WHERE value != value").fetchone()[0] == 0
    con.close()


def test_strata_values_equal_metrics_stratified_and_cis_bracket_them(imported):
    db, run_id, run_dir = imported
    results = run_dir / "results"
    table = pd.read_csv(results / "matches.csv", dtype={"scan_id": str}, keep_default_na=False,
                        na_values=[""])
    scans = pd.read_csv(results / "scans.csv", dtype={"scan_id": str})
    ref = stratified(table, scans)
    ag = q(db, "SELECT * FROM aggregates WHERE run_id = :r AND stratum != 'all'", r=run_id)
    kinds = {"diameter_mm": "size_bin"}
    n = 0
    for _, row in ref.iterrows():
        stratum = kinds.get(row["stratum_kind"], row["stratum_kind"])
        if stratum == "site" and row["stratum"] == "nan":
            continue  # the store skips a site stratum when no scan has a site
        for metric in ("recall", "fp_per_scan", "precision", "f1"):
            if pd.isna(row[metric]) and metric != "recall":
                continue
            got = ag[(ag["stratum"] == stratum) & (ag["stratum_value"] == row["stratum"])
                     & (ag["metric"] == metric)]
            if stratum in ("size_bin", "location") and metric != "recall":
                continue
            assert len(got) == 1, (stratum, row["stratum"], metric)
            v = got.iloc[0]
            if pd.isna(row[metric]):
                assert pd.isna(v["value"])
                continue
            assert v["value"] == pytest.approx(row[metric]), (stratum, row["stratum"], metric)
            if pd.notna(v["ci_lower"]):
                assert v["ci_lower"] - 1e-12 <= v["value"] <= v["ci_upper"] + 1e-12 or \
                    v["ci_lower"] <= v["ci_upper"]
            n += 1
    assert n >= 10
    assert {"size_bin", "location", "sequence", "field_strength_t", "slice_thickness_bin",
            "dataset"} <= set(ag["stratum"])
    assert set(ag["n_boot"].dropna()) == {50}


def test_whole_dataset_stratum_uses_the_overall_bootstrap_replicates(imported):
    """The `dataset` stratum holds every scan: its recall CI must equal the scoring's CI of
    pooled recall (same seed, same replicates, same percentile rule)."""
    db, run_id, run_dir = imported
    info = json.loads((run_dir / "results" / "aggregates.json").read_text())
    row = q(db, "SELECT * FROM aggregates WHERE run_id = :r AND stratum = 'dataset' "
                "AND metric = 'recall'", r=run_id).iloc[0]
    assert row["ci_lower"] == pytest.approx(info["ci"]["lower"]["recall_pooled"])
    assert row["ci_upper"] == pytest.approx(info["ci"]["upper"]["recall_pooled"])


def test_bootstrap_weights_reproduce_bootstrap_ci_draws():
    w = bootstrap_weights(7, 5, seed=3)
    rng = np.random.default_rng(3)
    expect = np.stack([rng.multinomial(7, np.full(7, 1 / 7)) for _ in range(5)])
    assert np.array_equal(w, expect) and w.sum(axis=1).tolist() == [7] * 5
    assert math.isnan(percentile_interval(np.array([np.nan, np.nan, 1.0]))[0])
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


def test_reimport_is_idempotent(imported):
    db, run_id, run_dir = imported
    before = table_counts(open_store(db))
    rows_before = q(db, "SELECT * FROM matches WHERE run_id = :r ORDER BY row", r=run_id)
    rep = import_run(run_dir, db=db)
    assert rep.run_id == run_id
    assert table_counts(open_store(db)) == before
    rows_after = q(db, "SELECT * FROM matches WHERE run_id = :r ORDER BY row", r=run_id)
    pd.testing.assert_frame_equal(rows_before, rows_after)


def test_failed_reimport_rolls_back_and_keeps_the_old_rows(run, tmp_path, monkeypatch):
    db = str(tmp_path / "s.sqlite")
    rid = import_run(run[1], db=db).run_id
    before = table_counts(open_store(db))
    real = store_writer._insert

    def boom(conn, table, rows):
        if table is S.matches:
            raise RuntimeError("disk full (simulated)")
        return real(conn, table, rows)

    monkeypatch.setattr(store_writer, "_insert", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        import_run(run[1], db=db)
    assert table_counts(open_store(db)) == before
    assert len(q(db, "SELECT * FROM matches WHERE run_id = :r", r=rid)) > 0


def test_import_refuses_what_is_not_a_scored_run(tmp_path, run):
    with pytest.raises(MissingInputError, match="no run.json"):
        import_run(tmp_path, db=str(tmp_path / "s.sqlite"))
    from cmbbench.evaluation import predict_dataset

    rep = predict_dataset("log", run[0], tmp_path / "pred")
    with pytest.raises(MissingInputError, match="only `evaluate` and `submit`"):
        import_run(rep.run_dir, db=str(tmp_path / "s.sqlite"))


def test_import_without_the_dataset_uses_the_results_tables(run, tmp_path, caplog):
    ds_copy = tmp_path / "ds"
    shutil.copytree(run[0], ds_copy)
    run_copy = tmp_path / "run"
    shutil.copytree(run[1], run_copy)
    cfg = json.loads((run_copy / "run.json").read_text())
    cfg["dataset"]["path"] = str(ds_copy)
    cfg["dataset"]["name"] = "EXAMPLE-gone"
    (run_copy / "run.json").write_text(json.dumps(cfg))
    info = json.loads((run_copy / "results" / "aggregates.json").read_text())
    info["meta"]["reference"] = str(ds_copy)
    (run_copy / "results" / "aggregates.json").write_text(json.dumps(info))
    shutil.rmtree(ds_copy)
    db = str(tmp_path / "s.sqlite")
    with caplog.at_level(logging.WARNING):
        rep = import_run(run_copy, db=db)
    assert any("not found" in w for w in rep.warnings)
    assert "not found" in caplog.text
    sc = q(db, "SELECT * FROM scans WHERE dataset_id = :d", d=rep.dataset_id)
    assert len(sc) == 6 and sc["image_path"].isna().all()
    assert len(q(db, "SELECT * FROM lesions WHERE dataset_id = :d", d=rep.dataset_id)) == 8
    m = q(db, "SELECT * FROM matches WHERE run_id = :r", r=rep.run_id)
    assert len(m) and m["i"].isna().all()


# ---------------------------------------------------------------------------------------------
# mimics


def test_fp_mimic_attribution_by_map_and_by_centroid(run, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(run[0], ds)
    add_mimics(ds, "ex04", (20, 20, 10), "medullary_vein")
    mimics = pd.read_csv(ds / "mimics.csv", dtype={"scan_id": str})
    from cmbbench.examples import affine_for

    a = affine_for((1.0, 1.0, 1.0), "RAS", (40, 40, 20))  # ex04's grid
    near = a @ np.array([21.0, 20.0, 10.0, 1.0])   # 1 mm from the centre: inside the ball
    edge = a @ np.array([24.5, 20.0, 10.0, 1.0])   # 2.5 mm beyond the ball's 2 mm radius
    far = a @ np.array([30.0, 30.0, 10.0, 1.0])
    table = pd.DataFrame({
        "scan_id": ["ex04"] * 3 + ["ex02"], "kind": "candidate", "outcome": "FP",
        "x_mm": [near[0], edge[0], far[0], 0.0], "y_mm": [near[1], edge[1], far[1], 0.0],
        "z_mm": [near[2], edge[2], far[2], 0.0]})
    by_map = fp_mimic_classes(table, mimics, ds)
    assert by_map.tolist() == ["medullary_vein", "medullary_vein", "none", "none"]
    by_centroid = fp_mimic_classes(table, mimics, None)  # size 4 mm: reach 3 + 2 mm
    assert by_centroid.tolist() == ["medullary_vein", "medullary_vein", "none", "none"]


def test_synthetic_import_has_mimic_classes_adding_up(run, tmp_path):
    """A scored run on a dataset with mimics: every FP row has a class, the mimic_class
    stratum adds up to the overall FP per scan."""
    from cmbbench.examples import make_example
    from cmbbench.submission import submit

    ds, pred = make_example(tmp_path / "ex")
    add_mimics(ds.root, "ex04", (20, 20, 10))
    db = str(tmp_path / "s.sqlite")
    rep = submit(pred, ds.root, db=db, n_boot=20, out=tmp_path / "sub")
    m = q(db, "SELECT * FROM matches WHERE run_id = :r AND kind = 'fp'", r=rep.run_id)
    assert len(m) and m["mimic_class"].notna().all()
    assert set(m.loc[m["scan_id"] == "ex04", "mimic_class"]) == {"medullary_vein"}
    assert set(m.loc[m["scan_id"] != "ex04", "mimic_class"]) == {"none"}
    ag = q(db, "SELECT * FROM aggregates WHERE run_id = :r", r=rep.run_id)
    mc = ag[ag["stratum"] == "mimic_class"]
    total = ag[(ag["stratum"] == "all") & (ag["metric"] == "fp_per_scan")]["value"].iloc[0]
    assert mc["value"].sum() == pytest.approx(total)
    assert q(db, "SELECT synthetic FROM datasets WHERE dataset_id = 'EXAMPLE-v1'").iloc[0, 0]


# ---------------------------------------------------------------------------------------------
# reported rows


def test_reported_rows_are_seeded_with_sources_and_the_corrected_dou_row(imported):
    db = imported[0]
    runs = q(db, "SELECT r.*, p.citation, p.url, p.table_page, p.paper_rule, p.paper_split, "
                 "p.note FROM runs r JOIN reported p ON p.run_id = r.run_id")
    seed = load_seed()
    assert len(runs) == len(seed["rows"])
    assert set(runs["tier"]) == {"reported"}
    assert runs["citation"].notna().all() and runs["table_page"].notna().all()
    assert runs["paper_rule"].notna().all() and runs["run_dir"].isna().all()
    dou = runs[(runs["method_id"] == "delpozo-unet@thesis") & (runs["dataset_id"] == "DOU-v1")]
    assert len(dou) == 1
    ag = q(db, "SELECT metric, value, ci_lower FROM aggregates WHERE run_id = :r",
           r=dou["run_id"].iloc[0]).set_index("metric")
    assert ag.loc["fp_per_scan", "value"] == 0.50
    assert ag.loc["fp_per_cmb", "value"] == 0.135
    assert ag["ci_lower"].isna().all()
    note = dou["note"].iloc[0]
    assert "0.13" in note and "FP per reference CMB" in note and "0.50" in note
    # reported rows carry no per-scan data
    rids = tuple(runs["run_id"])
    assert q(db, f"SELECT COUNT(*) FROM scan_metrics WHERE run_id IN {rids}").iloc[0, 0] == 0


def test_every_reported_method_is_documented():
    doc = (REPO / "docs" / "store.md").read_text()
    seed = yaml.safe_load((REPO / "cmbbench" / "store" / "reported.yaml").read_text())
    for row in seed["rows"]:
        assert f"`{row['method']}`" in doc, row["method"]
        assert row["method"] in seed["methods"]


def test_reseeding_replaces_reported_rows_when_the_seed_version_changes(tmp_path):
    db = str(tmp_path / "s.sqlite")
    _, n = init_store(db)
    assert n == len(load_seed()["rows"])
    assert init_store(db)[1] == 0  # current: nothing rewritten
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = 'old' WHERE key = 'reported_seed'")
    con.commit()
    con.close()
    assert init_store(db)[1] == n
    assert q(db, "SELECT COUNT(*) AS n FROM runs WHERE tier = 'reported'").iloc[0, 0] == n


# ---------------------------------------------------------------------------------------------
# export, revision, auto-import


def test_export_writes_one_csv_per_table(imported, tmp_path):
    files = export_store(tmp_path / "out", db=imported[0])
    assert set(files) == {t.name for t in S.TABLE_ORDER}
    runs = pd.read_csv(files["runs"])
    counts = table_counts(open_store(imported[0]))
    assert len(runs) == counts["runs"]
    assert "6.0" not in (tmp_path / "out" / "runs.csv").read_text()  # integers stay integers


def test_store_revision_changes_with_every_write(run, tmp_path):
    db = str(tmp_path / "s.sqlite")
    init_store(db)
    r0 = store_revision(open_store(db))
    import_run(run[1], db=db)
    r1 = store_revision(open_store(db))
    assert r0 != r1 and r1.startswith(f"{len(load_seed()['rows']) + 1}:")


def test_auto_import_never_raises(run, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        assert auto_import(run[1], db=str(blocker / "store.sqlite")) is None
    assert "not added to the results store" in caplog.text and "db import" in caplog.text
    assert (run[1] / "results" / "aggregates.json").is_file()


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_db_init_import_info_export(run, tmp_path):
    db = str(tmp_path / "c.sqlite")
    r = CliRunner()
    out = r.invoke(cli_main, ["db", "init", "--db", db])
    assert out.exit_code == 0 and "reported row(s) seeded" in out.output
    out = r.invoke(cli_main, ["db", "import", str(run[1]), "--db", db, "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["ok"] and payload["runs"][0]["tier"] == "reproduced"
    out = r.invoke(cli_main, ["db", "info", "--db", db, "--json"])
    assert json.loads(out.stdout)["counts"]["scan_metrics"] == 6
    out = r.invoke(cli_main, ["db", "export", "--out", str(tmp_path / "x"), "--db", db])
    assert out.exit_code == 0 and (tmp_path / "x" / "aggregates.csv").is_file()
    out = r.invoke(cli_main, ["db", "import", str(tmp_path), "--db", db])
    assert out.exit_code == 3 and "no run.json" in out.stderr
    out = r.invoke(cli_main, ["db", "info", "--db", str(tmp_path / "none.sqlite")])
    assert out.exit_code == 10 and "db init" in out.stderr


def test_cli_evaluate_imports_its_run_and_survives_a_broken_store(tmp_path, monkeypatch):
    from cmbbench.examples import make_example

    ds, _ = make_example(tmp_path / "ex")
    monkeypatch.setenv("CMBBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CMBBENCH_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    r = CliRunner()
    out = r.invoke(cli_main, ["evaluate", "--method", "log", "--dataset", str(ds.root),
                              "--n-boot", "0", "--quiet"])
    assert out.exit_code == 0, out.output
    db = str(tmp_path / "home" / "store.sqlite")
    runs = q(db, "SELECT * FROM runs WHERE tier = 'reproduced'")
    assert runs["method_id"].tolist() == ["log@1"]
    # a store that cannot be written: the run is still finished and kept, exit code 0
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = r.invoke(cli_main, ["evaluate", "--method", "log", "--dataset", str(ds.root),
                              "--n-boot", "0", "--out", "run2", "--db",
                              str(blocker / "s.sqlite")])
    assert out.exit_code == 0, out.output
    assert "not added to the results store" in out.stderr
    assert (tmp_path / "run2" / "results" / "aggregates.json").is_file()
    out = r.invoke(cli_main, ["evaluate", "--method", "log", "--dataset", str(ds.root),
                              "--n-boot", "0", "--out", "run3", "--no-store"])
    assert out.exit_code == 0
    assert len(q(db, "SELECT * FROM runs WHERE tier = 'reproduced'")) == 1


def test_exit_codes_of_the_store_are_documented():
    doc = (REPO / "docs" / "cli.md").read_text()
    assert "| 9 |" in doc and "| 10 |" in doc


# ---------------------------------------------------------------------------------------------
# demo and load store


def test_demo_builder_evaluates_imports_and_skips_unknown_methods(tmp_path, monkeypatch):
    from cmbbench.examples import make_example
    from cmbbench.store.demo import build_demo

    ds, _ = make_example(tmp_path / "ex")
    monkeypatch.setenv("CMBBENCH_HOME", str(tmp_path / "home"))
    db = str(tmp_path / "demo.sqlite")
    reports, skipped = build_demo(db, methods=("log", "no-such-method"), dataset=str(ds.root),
                                  n_boot=0)
    assert [r.method_id for r in reports] == ["log@1"] and "no-such-method" in skipped
    assert reports[0].run_dir.startswith(str((tmp_path / "home" / "demo" / "runs").resolve()))
    tiers = q(db, "SELECT tier, COUNT(*) AS n FROM runs GROUP BY tier").set_index("tier")["n"]
    assert tiers["reproduced"] == 1 and tiers["reported"] == len(load_seed()["rows"])


def test_load_store_generator_writes_every_table(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import make_store
    finally:
        sys.path.pop(0)
    db = str(tmp_path / "load.sqlite")
    info = make_store.make_load_store(db, n_runs=3, n_scans=40, n_boot=20)
    c = info["counts"]
    assert info["runs"] == 3 and c["scans"] == 40 and c["scan_metrics"] == 120
    assert c["runs"] == 3 + len(load_seed()["rows"])
    ag = q(db, "SELECT DISTINCT stratum FROM aggregates")
    assert {"all", "size_bin", "location", "sequence", "mimic_class"} <= set(ag["stratum"])
    ci = q(db, "SELECT a.ci_lower, a.ci_upper FROM aggregates a JOIN runs r "
               "ON r.run_id = a.run_id WHERE r.tier != 'reported' AND a.stratum = 'all' "
               "AND a.metric = 'recall'")
    assert len(ci) == 3
    assert ci.notna().all().all() and (ci["ci_lower"] <= ci["ci_upper"]).all()


def test_part_jobs_never_write_the_store_merge_does(tmp_path, monkeypatch):
    from cmbbench.examples import make_example

    ds, _ = make_example(tmp_path / "ex")
    monkeypatch.setenv("CMBBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CMBBENCH_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    r = CliRunner()
    for part in ("0", "1"):
        out = r.invoke(cli_main, ["evaluate", "--method", "log", "--dataset", str(ds.root),
                                  "--n-boot", "0", "--out", "run", "--part-id", part,
                                  "--num-parts", "2"])
        assert out.exit_code == 0, out.output
    assert "not stored from a part job" in out.stderr
    assert (tmp_path / "run" / "results" / "aggregates.json").is_file()
    db = tmp_path / "home" / "store.sqlite"
    assert not db.exists()
    out = r.invoke(cli_main, ["merge", "run", "--out", "run"])
    assert out.exit_code == 0, out.output
    assert q(str(db), "SELECT method_id FROM runs WHERE tier = 'reproduced'")[
        "method_id"].tolist() == ["log@1"]
