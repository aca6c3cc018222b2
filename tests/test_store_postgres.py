"""The results store on a real PostgreSQL server, started on 127.0.0.1 in a temporary folder
from Debian's ``postgresql`` package (``initdb``/``pg_ctl`` under /usr/lib/postgresql/*/bin).

Skipped, with the reason, when the server binaries or the psycopg driver are missing, or when
running as root without a ``postgres`` user to run the server as. CI installs the package.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from store_support import contract_columns, evaluated_run

from cmbbench.store import export_store, import_run, init_store, open_store, table_counts
from cmbbench.store import schema as S

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed "
                                          "(pip install 'psycopg[binary]', part of [dev])")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (initdb under "
                    "/usr/lib/postgresql/*/bin): apt-get install postgresql")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser to start the server as 'postgres'")
        run_as = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="cmbbench-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", _free_port()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120,
                              check=False)

    try:
        p = run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                "--no-sync", "-E", "UTF8")
        if p.returncode != 0:
            pytest.skip(f"initdb failed: {p.stderr.strip()[-300:]}")
        p = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t",
                "60", "-o", f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start")
        if p.returncode != 0:
            log = (root / "log").read_text() if (root / "log").is_file() else ""
            pytest.fail(f"pg_ctl start failed: {p.stderr.strip()} {log[-500:]}")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return evaluated_run(tmp_path_factory.mktemp("pg-run"))


def _run_rows(url: str, run_id: str) -> dict[str, pd.DataFrame]:
    engine = open_store(url)
    out = {}
    try:
        with engine.connect() as conn:
            for t in (S.scan_metrics, S.matches, S.aggregates, S.curves):
                order = list(t.primary_key.columns)
                frame = pd.read_sql(sa.select(t).where(t.c.run_id == run_id).order_by(*order),
                                    conn)
                out[t.name] = frame.reset_index(drop=True)
    finally:
        engine.dispose()
    return out


def test_postgres_store_matches_sqlite(pg_url, run, tmp_path):
    """Same schema, same rows as SQLite; re-import idempotent; contract columns present."""
    url, n = init_store(pg_url)
    assert n > 0 and url == pg_url
    rep = import_run(run[1], db=pg_url)
    again = import_run(run[1], db=pg_url)
    assert again.run_id == rep.run_id
    engine = open_store(pg_url)
    insp = sa.inspect(engine)
    for table, cols in contract_columns().items():
        assert set(cols) <= {c["name"] for c in insp.get_columns(table)}, table
    counts = table_counts(engine)
    assert counts["runs"] == n + 1 and counts["scan_metrics"] == 6
    with pytest.raises(sa.exc.SQLAlchemyError, match="read-only|read only"), \
            engine.begin() as conn:
        conn.execute(S.meta.insert().values(key="x", value="y"))
    engine.dispose()

    lite = str(tmp_path / "s.sqlite")
    assert import_run(run[1], db=lite).run_id == rep.run_id
    pg_rows, lite_rows = _run_rows(pg_url, rep.run_id), _run_rows(lite, rep.run_id)
    for name in pg_rows:
        pd.testing.assert_frame_equal(pg_rows[name], lite_rows[name], check_dtype=False,
                                      obj=name)
    files = export_store(tmp_path / "csv", db=pg_url)
    assert len(pd.read_csv(files["runs"])) == n + 1


def test_postgres_two_writers_at_once(pg_url, run, tmp_path):
    """Two processes import into the server at the same time (holding the advisory lock
    1 s each): both land intact."""
    init_store(pg_url)
    code = ("import sys; from cmbbench.store import import_run; "
            "print(import_run(sys.argv[1], db=sys.argv[2]).run_id)")
    dirs = []
    for n in range(2):
        d = tmp_path / f"run{n}"
        shutil.copytree(run[1], d)
        dirs.append(d)
    env = {**os.environ, "CMBBENCH_STORE_HOLD_S": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(d), pg_url], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for d in dirs]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert time.perf_counter() - t0 >= 2.0
    ids = [o.strip() for o, _ in outs]
    assert len(set(ids)) == 2  # different run directories: different runs
    for rid in ids:
        rows = _run_rows(pg_url, rid)
        assert len(rows["scan_metrics"]) == 6 and len(rows["aggregates"]) > 50
