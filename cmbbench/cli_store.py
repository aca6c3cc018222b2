"""``cmbbench db``, ``cmbbench validate`` and ``cmbbench submit``: the results store and
submissions on the command line (thin: every command is one call into the library).

Registered on the main group by :func:`register` (``cmbbench/cli.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import CmbbenchError, InvalidSubmissionError

__all__ = ["db", "register", "store_after_evaluate", "submit_cmd", "validate_cmd"]

_DB_HELP = ("Results store: a SQLAlchemy URL or a SQLite file path [default: $CMBBENCH_DB, "
            "else $CMBBENCH_HOME/store.sqlite].")


def _setup(quiet: bool) -> None:
    from .cli import _setup_logging

    _setup_logging(quiet)


def _fail(exc: CmbbenchError, as_json: bool) -> None:
    from .cli import _fail as fail

    fail(exc, as_json)


def _echo_problems(problems: list[str]) -> None:
    for p in problems:
        click.echo(f"problem: {p}")


@click.group()
def db() -> None:
    """The results store (an index over run directories, read by the leaderboard)."""


@db.command("init")
@click.option("--db", "db_url", default=None, help=_DB_HELP)
@click.option("--no-reported", is_flag=True, help="Do not seed the reported (literature) rows.")
def db_init(db_url: str | None, no_reported: bool) -> None:
    """Create the store (tables and indexes) and seed the reported rows; idempotent."""
    _setup(True)
    from .store import display_url, init_store

    try:
        url, n = init_store(db_url, seed_reported=not no_reported)
    except CmbbenchError as exc:
        _fail(exc, False)
        return
    seeded = f"; {n} reported row(s) seeded" if n else ""
    click.echo(f"store ready: {display_url(url)}{seeded}")


@db.command("import")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--db", "db_url", default=None, help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def db_import(run_dirs: tuple[Path, ...], db_url: str | None, as_json: bool) -> None:
    """Import finished run directories (`evaluate` runs as reproduced, `submit` runs as
    scored); re-importing a run replaces its rows."""
    _setup(as_json)
    from .store import display_url, import_run, resolve_url

    reports = []
    try:
        for rd in run_dirs:
            reports.append(import_run(rd, db=db_url))
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps({"ok": True, "store": display_url(resolve_url(db_url)),
                               "runs": [r.to_dict() for r in reports]}))
        return
    for r in reports:
        click.echo(f"imported {r.run_dir}: run {r.run_id} ({r.tier}, {r.status}) "
                   f"{r.method_id} on {r.dataset_id}, rule {r.rule_id}; "
                   f"{r.counts['scan_metrics']} scans, {r.counts['matches']} matches, "
                   f"{r.counts['aggregates']} aggregates in {r.seconds:.2f} s")
    click.echo(f"store: {display_url(resolve_url(db_url))}")


@db.command("export")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for the CSV files (one per table).")
@click.option("--db", "db_url", default=None, help=_DB_HELP)
def db_export(out: Path, db_url: str | None) -> None:
    """Export every table of the store as CSV (`<table>.csv`)."""
    _setup(True)
    from .store import export_store

    try:
        files = export_store(out, db=db_url)
    except CmbbenchError as exc:
        _fail(exc, False)
        return
    for name, path in files.items():
        click.echo(f"{name:<14}{path}")


@db.command("info")
@click.option("--db", "db_url", default=None, help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def db_info(db_url: str | None, as_json: bool) -> None:
    """Where the store is and how many rows each table holds."""
    _setup(True)
    import sqlalchemy as sa

    from .store import display_url, open_store, resolve_url, table_counts

    try:
        engine = open_store(db_url)
        try:
            counts = table_counts(engine)
        except sa.exc.SQLAlchemyError as exc:
            from .errors import StoreError

            raise StoreError(f"not a cmbbench store ({' '.join(str(exc.orig).split())})"
                             ) from None
        finally:
            engine.dispose()
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    url = display_url(resolve_url(db_url))
    if as_json:
        click.echo(json.dumps({"ok": True, "store": url, "counts": counts}))
        return
    click.echo(f"store: {url}")
    for name, n in counts.items():
        click.echo(f"  {name:<14}{n}")


@db.command("demo")
@click.option("--db", "db_url", default=None, help=_DB_HELP)
@click.option("--methods", default="log,bian2013,ours", show_default=True,
              help="Comma-separated methods to evaluate on SYNTH-demo.")
@click.option("--runs", "runs_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of the demo's run directories [default: $CMBBENCH_HOME/demo/runs].")
@click.option("--n-boot", type=int, default=1000, show_default=True,
              help="Bootstrap replicates over scans for the CIs.")
@click.option("--quiet", is_flag=True, help="No progress report on stderr.")
def db_demo(db_url: str | None, methods: str, runs_dir: Path | None, n_boot: int,
            quiet: bool) -> None:
    """Build the demo store: evaluate the shipped methods on SYNTH-demo (resumable) and import
    them, plus the reported rows."""
    _setup(quiet)
    from .store import display_url, resolve_url
    from .store.demo import build_demo

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    try:
        reports, skipped = build_demo(
            db_url, methods=names, runs_dir=runs_dir, n_boot=n_boot, quiet=quiet,
            say=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)))
    except CmbbenchError as exc:
        _fail(exc, False)
        return
    for r in reports:
        click.echo(f"{r.method_id:<16}{r.dataset_id:<16}{r.rule_id:<14}run {r.run_id}  "
                   f"{r.run_dir}")
    for name, why in skipped.items():
        click.echo(f"{name:<16}skipped: {why}")
    click.echo(f"store: {display_url(resolve_url(db_url))}")
    click.echo("next: cmbbench leaderboard")


def _validation_out(report, as_json: bool) -> None:
    if as_json:
        payload = report.to_dict()
        err = report.error()
        if err is not None:
            payload["error"] = {"type": type(err).__name__, "message": str(err),
                                "path": str(err.path), "exit_code": err.exit_code}
        click.echo(json.dumps(payload))
    else:
        if report.ok:
            m = report.manifest
            click.echo(f"valid: {m.get('method')}@{m.get('version')} on {report.dataset}: "
                       f"{report.n_scans} scans ({report.n_maps} maps, "
                       f"{report.n_point_scans} scans with points)")
        _echo_problems([str(p) for p in report.problems])
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
    err = report.error()
    if err is not None:
        if not as_json:
            click.echo(f"cmbbench: error: {err}", err=True)
        sys.exit(err.exit_code)


@click.command("validate")
@click.argument("pred", type=click.Path(path_type=Path))
@click.option("--dataset", required=True,
              help="Reference dataset: a registry name (SYNTH-demo, DOU...) or a folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def validate_cmd(pred: Path, dataset: str, as_json: bool) -> None:
    """Check a submission (a predictions folder or a .zip of one) against a dataset: the
    manifest, every scan present, grids, value ranges. Lists every problem; exit code 9 when
    there is any."""
    _setup(True)
    import shutil
    import tempfile

    from .submission import relabel, stage_input, validate_submission

    tmp = Path(tempfile.mkdtemp(prefix="cmbbench-validate-"))
    try:
        content = stage_input(pred, tmp / "extract")
        report = validate_submission(content, dataset)
        relabel(report, content, pred)
    except CmbbenchError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _fail(exc, as_json)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    _validation_out(report, as_json)


@click.command("submit")
@click.argument("pred", type=click.Path(path_type=Path))
@click.option("--dataset", required=True,
              help="Reference dataset: a registry name (SYNTH-demo, DOU...) or a folder.")
@click.option("--rule", default="cmbbench", show_default=True,
              help="Matching rule: cmbbench, delpozo2024, valdo2021, dou2016, wmh2017.")
@click.option("--threshold", type=float, default=None,
              help="Operating threshold on candidate scores [default: the rule's].")
@click.option("--floor", type=float, default=None,
              help="Probability floor of candidate extraction [default: the rule's].")
@click.option("--n-boot", type=int, default=1000, show_default=True,
              help="Bootstrap replicates over scans for the CIs (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap RNG seed.")
@click.option("--db", "db_url", default=None, help=_DB_HELP)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: $CMBBENCH_HOME/submissions/<method>@<version>__"
                   "<dataset>__<rule>__<checksum>].")
@click.option("--max-zip-gb", type=float, default=4.0, show_default=True,
              help="Refuse a .zip declaring more uncompressed data than this (GB).")
@click.option("--max-zip-files", type=int, default=20000, show_default=True,
              help="Refuse a .zip with more members than this.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def submit_cmd(pred: Path, dataset: str, rule: str, threshold: float | None,
               floor: float | None, n_boot: int, seed: int, db_url: str | None,
               out: Path | None, max_zip_gb: float, max_zip_files: int, as_json: bool,
               quiet: bool) -> None:
    """Validate a submission (folder or .zip), score it and store it as tier `scored`.

    An invalid submission lists every problem, writes nothing and exits with code 9."""
    _setup(quiet or as_json)
    from .cli import summary_lines
    from .store import display_url
    from .submission import submit

    try:
        report = submit(pred, dataset, rule=rule,
                        rule_overrides={"operating_threshold": threshold,
                                        "candidate_floor": floor},
                        n_boot=n_boot, seed=seed, db=db_url, out=out,
                        max_zip_bytes=int(max_zip_gb * 1e9), max_zip_files=max_zip_files)
    except InvalidSubmissionError as exc:
        if not as_json:
            _echo_problems(exc.problems)
        _fail(exc, as_json)
        return
    except CmbbenchError as exc:
        _fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps({"ok": True, **report.to_json_dict()}))
        return
    for line in summary_lines(report.result):
        click.echo(line)
    click.echo("")
    click.echo(f"run directory: {report.run_dir}")
    click.echo(f"stored as run {report.run_id} (tier scored) in "
               f"{display_url(report.store_url or '')}")


def store_after_evaluate(report, *, db: str | None, no_store: bool, as_json: bool,
                         quiet: bool = False) -> None:
    """``cmbbench evaluate``'s hook: import a scored run into the store, never failing the
    command (a store problem is a warning on stderr; the run directory is kept). Says where
    the run was stored on stderr (not with ``--json`` or ``--quiet``)."""
    if no_store or getattr(report, "results_dir", None) is None:
        return
    if tuple(getattr(report, "part", (0, 1)))[1] > 1:
        # a part job (perhaps a cluster worker) never writes the store: the coordinator does
        if not (as_json or quiet):
            click.echo(f"not stored from a part job: run `cmbbench db import {report.run_dir}` "
                       "(or `cmbbench merge`) on the coordinating machine", err=True)
        return
    from .store import display_url, import_run, resolve_url
    from .store.api import import_failure_message

    try:
        imported = import_run(report.run_dir, db=db)
    except Exception as exc:  # noqa: BLE001 - the run must never be lost to a store problem
        click.echo(f"cmbbench: warning: {import_failure_message(report.run_dir, db, exc)}",
                   err=True)
        return
    if not (as_json or quiet):
        click.echo(f"stored as run {imported.run_id} ({imported.tier}) in "
                   f"{display_url(resolve_url(db))}", err=True)


def register(main: click.Group) -> None:
    """Add ``db``, ``validate`` and ``submit`` to the main command group."""
    main.add_command(db)
    main.add_command(validate_cmd)
    main.add_command(submit_cmd)
