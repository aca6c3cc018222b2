"""The results store's schema (SQLAlchemy Core): the contract of ``docs/store.md``.

Table and column names are fixed by that contract (the leaderboard app reads them); columns
marked *added* below extend it. Text identifiers are plain strings, floats are NaN-free (NULL
where undefined), times are ISO-8601 UTC strings.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "MATCH_KINDS",
    "RANKED_TIERS",
    "RUN_CHILD_TABLES",
    "SCHEMA_VERSION",
    "TABLE_ORDER",
    "TIERS",
    "aggregates",
    "curves",
    "datasets",
    "lesions",
    "matches",
    "meta",
    "metadata",
    "methods",
    "reported",
    "runs",
    "scan_metrics",
    "scans",
]

#: Version of this schema, recorded in the ``meta`` table (key ``schema_version``).
SCHEMA_VERSION = "1"

#: Provenance tiers: cmbbench ran the method / scored submitted predictions / copied from a paper.
TIERS: tuple[str, ...] = ("reproduced", "scored", "reported")
#: Tiers that are ranked together; ``reported`` rows are shown apart and never ranked.
RANKED_TIERS: tuple[str, ...] = ("reproduced", "scored")
#: ``matches.kind`` values.
MATCH_KINDS: tuple[str, ...] = ("tp", "fp", "fn")

metadata = sa.MetaData()

Text = sa.Text
Float = sa.Double
Int = sa.Integer

#: (added) key/value facts about the store: ``schema_version``, ``reported_seed`` (version of
#: the seeded literature rows), ``updated_at`` (time of the last write).
meta = sa.Table(
    "meta", metadata,
    sa.Column("key", Text, primary_key=True),
    sa.Column("value", Text),
)

methods = sa.Table(
    "methods", metadata,
    sa.Column("method_id", Text, primary_key=True),  # name@version
    sa.Column("name", Text, nullable=False),
    sa.Column("version", Text, nullable=False),
    sa.Column("citation", Text),
    sa.Column("paper_url", Text),
    sa.Column("code_url", Text),
    sa.Column("description", Text),
    sa.Column("trainable", sa.Boolean),
    sa.Column("training_data", Text),
    sa.Column("test_overlap", Text),
    sa.Column("manifest_json", Text),
    sa.Column("updated_at", Text),  # added
)

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("dataset_id", Text, primary_key=True),  # NAME-vVERSION
    sa.Column("name", Text, nullable=False),
    sa.Column("version", Text, nullable=False),
    sa.Column("n_scans", Int),
    sa.Column("n_cmb", Int),
    sa.Column("synthetic", sa.Boolean),
    sa.Column("card_json", Text),
    sa.Column("stats_json", Text),
    sa.Column("path", Text),
    sa.Column("updated_at", Text),  # added
)

scans = sa.Table(
    "scans", metadata,
    sa.Column("dataset_id", Text, primary_key=True),
    sa.Column("scan_id", Text, primary_key=True),
    sa.Column("subject_id", Text),
    sa.Column("split", Text),
    sa.Column("sequence", Text),
    sa.Column("field_strength_t", Float),
    sa.Column("slice_thickness_mm", Float),
    sa.Column("slice_thickness_bin", Text),
    sa.Column("voxel_mm_x", Float),
    sa.Column("voxel_mm_y", Float),
    sa.Column("voxel_mm_z", Float),
    sa.Column("n_cmb", Int),
    sa.Column("image_path", Text),
    # added
    sa.Column("label_path", Text),
    sa.Column("shape", Text),
    sa.Column("te_ms", Float),
    sa.Column("site", Text),
    sa.Column("vendor", Text),
    sa.Column("n_mimics", Int),
)

lesions = sa.Table(
    "lesions", metadata,
    sa.Column("dataset_id", Text, primary_key=True),
    sa.Column("scan_id", Text, primary_key=True),
    sa.Column("lesion_id", Int, primary_key=True, autoincrement=False),
    sa.Column("x_mm", Float),
    sa.Column("y_mm", Float),
    sa.Column("z_mm", Float),
    sa.Column("i", Float),
    sa.Column("j", Float),
    sa.Column("k", Float),
    sa.Column("diameter_mm", Float),
    sa.Column("size_bin", Text),
    sa.Column("location", Text),
    sa.Column("mask_source", Text),
    sa.Column("volume_mm3", Float),  # added
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", Text, primary_key=True),
    sa.Column("method_id", Text, nullable=False),
    sa.Column("dataset_id", Text, nullable=False),
    sa.Column("split", Text, nullable=False),
    sa.Column("rule_id", Text, nullable=False),
    sa.Column("tier", Text, nullable=False),
    sa.Column("status", Text, nullable=False),
    sa.Column("operating_threshold", Float),
    sa.Column("n_scans", Int),
    sa.Column("run_dir", Text),
    sa.Column("cmbbench_version", Text),
    sa.Column("versions_json", Text),
    sa.Column("config_json", Text),
    sa.Column("created_at", Text),
    sa.Column("imported_at", Text),
    # added
    sa.Column("submission_sha256", Text),  # scored runs: checksum of the submitted folder
    sa.Column("failed_scans_json", Text),  # scans that failed and were scored as empty
    sa.CheckConstraint("tier IN ('reproduced', 'scored', 'reported')", name="ck_runs_tier"),
    sa.CheckConstraint("status IN ('complete', 'partial')", name="ck_runs_status"),
)
sa.Index("ix_runs_dataset_rule", runs.c.dataset_id, runs.c.rule_id)

scan_metrics = sa.Table(
    "scan_metrics", metadata,
    sa.Column("run_id", Text, primary_key=True),
    sa.Column("scan_id", Text, primary_key=True),
    sa.Column("tp", Int),
    sa.Column("fp", Int),
    sa.Column("fn", Int),
    sa.Column("n_ref", Int),
    sa.Column("n_pred", Int),
    sa.Column("precision", Float),
    sa.Column("recall", Float),
    sa.Column("f1", Float),
    sa.Column("dice_scan", Float),
    # added
    sa.Column("tp_pred", Int),
    sa.Column("ignored", Int),
    sa.Column("max_score", Float),
    sa.Column("prediction_kind", Text),
)

matches = sa.Table(
    "matches", metadata,
    sa.Column("run_id", Text, primary_key=True),
    sa.Column("row", Int, primary_key=True, autoincrement=False),
    sa.Column("scan_id", Text, nullable=False),
    sa.Column("kind", Text, nullable=False),
    sa.Column("lesion_id", Int),
    sa.Column("candidate_id", Int),
    sa.Column("score", Float),
    sa.Column("distance_mm", Float),
    sa.Column("x_mm", Float),
    sa.Column("y_mm", Float),
    sa.Column("z_mm", Float),
    sa.Column("i", Float),
    sa.Column("j", Float),
    sa.Column("k", Float),
    sa.Column("mimic_class", Text),
    # added: the reference lesion's size and location (tp/fn rows)
    sa.Column("diameter_mm", Float),
    sa.Column("location", Text),
    sa.CheckConstraint("kind IN ('tp', 'fp', 'fn')", name="ck_matches_kind"),
)
sa.Index("ix_matches_run_scan", matches.c.run_id, matches.c.scan_id)

aggregates = sa.Table(
    "aggregates", metadata,
    sa.Column("run_id", Text, primary_key=True),
    sa.Column("stratum", Text, primary_key=True),
    sa.Column("stratum_value", Text, primary_key=True),
    sa.Column("metric", Text, primary_key=True),
    sa.Column("value", Float),
    sa.Column("ci_lower", Float),
    sa.Column("ci_upper", Float),
    sa.Column("n_scans", Int),
    sa.Column("n_lesions", Int),
    sa.Column("n_boot", Int),
    sa.Column("seed", Int),
)

curves = sa.Table(
    "curves", metadata,
    sa.Column("run_id", Text, primary_key=True),
    sa.Column("curve", Text, primary_key=True),
    sa.Column("point", Int, primary_key=True, autoincrement=False),
    sa.Column("threshold", Float),
    sa.Column("x", Float),
    sa.Column("y", Float),
)

reported = sa.Table(
    "reported", metadata,
    sa.Column("run_id", Text, primary_key=True),
    sa.Column("citation", Text),
    sa.Column("url", Text),
    sa.Column("table_page", Text),
    sa.Column("paper_rule", Text),
    sa.Column("paper_split", Text),
    sa.Column("note", Text),
    sa.Column("source", Text),  # added: where cmbbench collected the numbers
)

#: Tables whose rows belong to one run (replaced together on re-import).
RUN_CHILD_TABLES: tuple[sa.Table, ...] = (scan_metrics, matches, aggregates, curves, reported)
#: Every table, in a dependency-friendly order (export, tests).
TABLE_ORDER: tuple[sa.Table, ...] = (meta, methods, datasets, scans, lesions, runs,
                                     scan_metrics, matches, aggregates, curves, reported)
