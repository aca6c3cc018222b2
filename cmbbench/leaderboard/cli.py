"""``cmbbench leaderboard``: start the Streamlit app, or export a static snapshot.

``cmbbench leaderboard [--db URL] [--port P]`` runs ``streamlit run`` of the packaged app on
127.0.0.1 (the process is replaced by Streamlit's, so stopping it stops the server);
``cmbbench leaderboard export --out DIR`` writes CSV, JSON and PNG files (see
:mod:`cmbbench.leaderboard.export`). Both only read the store.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import click

from ..errors import ConfigurationError, StoreError

__all__ = ["app_path", "leaderboard", "streamlit_command"]

log = logging.getLogger(__name__)


def app_path() -> Path:
    """The app's entry script: ``$CMBBENCH_LEADERBOARD_APP`` when set, else ``leaderboard/app.py``
    of the checkout (source or editable install), else the copy a wheel installs as
    ``cmbbench/leaderboard_app/app.py``."""
    env = os.environ.get("CMBBENCH_LEADERBOARD_APP")
    package = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else [package.parent / "leaderboard" / "app.py",
                                          package / "leaderboard_app" / "app.py"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigurationError("the leaderboard app script was not found (a broken install, or "
                             "CMBBENCH_LEADERBOARD_APP names a missing file)", candidates[0])


def streamlit_command(url: str, *, port: int, address: str = "127.0.0.1") -> list[str]:
    """The ``python -m streamlit run`` command line that serves the app on ``address:port``."""
    return [sys.executable, "-m", "streamlit", "run", str(app_path()),
            "--server.headless=true", f"--server.address={address}", f"--server.port={port}",
            "--server.fileWatcherType=none", "--server.runOnSave=false",
            "--browser.gatherUsageStats=false", "--client.toolbarMode=minimal",
            "--", "--db", url]


def _fail(exc: Exception, code: int) -> None:
    click.echo(f"cmbbench: error: {exc}", err=True)
    sys.exit(code)


def _check_store(db: str | None) -> str:
    from . import queries

    url = queries.store_url(db)
    try:
        engine = queries.connect(url)
        try:
            queries.revision(engine)
        finally:
            engine.dispose()
    except queries.StoreUnavailable as exc:
        _fail(StoreError(str(exc)), StoreError.exit_code)
    return url


@click.group("leaderboard", invoke_without_command=True)
@click.option("--db", default=None, help="Store URL or SQLite path [default: $CMBBENCH_DB, "
              "else $CMBBENCH_HOME/store.sqlite].")
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True,
              help="Port on 127.0.0.1.")
@click.pass_context
def leaderboard(ctx: click.Context, db: str | None, port: int) -> None:
    """Browse the results store in a Streamlit app on 127.0.0.1 (read only).

    Without a subcommand, serves the app until interrupted; `export` writes a static snapshot.
    """
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    if ctx.invoked_subcommand is not None:
        return
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        _fail(ConfigurationError("the leaderboard needs the [leaderboard] extra: "
                                 "pip install 'cmbbench[leaderboard]'"),
              ConfigurationError.exit_code)
    url = _check_store(db)
    try:
        cmd = streamlit_command(url, port=port)
    except ConfigurationError as exc:
        _fail(exc, exc.exit_code)
        return
    from . import queries

    click.echo(f"cmbbench leaderboard: http://127.0.0.1:{port} (store "
               f"{queries.display_url(url)}; Ctrl-C stops it)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ["CMBBENCH_DB"] = url
    os.execv(sys.executable, cmd)


@leaderboard.command("export")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for the snapshot (created).")
@click.option("--db", default=None, help="Store URL or SQLite path [default: as the group].")
@click.option("--rank-by", default="f1", show_default=True,
              help="Store key of the ranking metric (f1, cpm, recall, fp_per_scan, ...).")
@click.option("--dataset", "datasets", multiple=True,
              help="Only this dataset id (repeatable) [default: all].")
@click.pass_context
def export_cmd(ctx: click.Context, out: Path, db: str | None, rank_by: str,
               datasets: tuple[str, ...]) -> None:
    """Write a static snapshot: CSV + JSON tables and PNG figures (see docs/leaderboard.md)."""
    from . import queries
    from .export import export_snapshot

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        index = export_snapshot(out, db=db or ctx.obj.get("db"), rank_metric=rank_by,
                                datasets=list(datasets) or None)
    except queries.StoreUnavailable as exc:
        _fail(StoreError(str(exc)), StoreError.exit_code)
        return
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"{len(index['files']) + 1} files for {len(index['boards'])} leaderboards "
               f"written to {out}")
