"""A throwaway PostgreSQL server: initdb into a temporary folder, started on a free localhost port
with its unix socket in that folder, stopped and deleted at the end. Used by the ``postgres_dsn``
fixture (tests/conftest.py) and by tools/bench_checkpoint_bytes.py."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REQUIRED = ("initdb", "pg_ctl", "postgres")


def server_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: beside an initdb on PATH, `pg_config --bindir`,
    or /usr/lib/postgresql/<version>/bin (Debian's layout, newest first); None when none has them."""
    candidates = []
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    if pg_config := shutil.which("pg_config"):
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            candidates.append(Path(done.stdout.strip()))
    debian = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda path: int(path.parent.name), reverse=True)
    return next((path for path in candidates if all((path / name).is_file() for name in REQUIRED)), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def throwaway_postgres(bindir: Path) -> Iterator[str]:
    """Start a server from `bindir` and yield its connection string (superuser ``postgres``, trust
    authentication, fsync off). PostgreSQL refuses to run as root: as root the server runs as the
    ``postgres`` user (``nobody`` where there is none), which owns the temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="vpt-pg-"))
    as_user: dict = {}
    if os.geteuid() == 0:
        account = _server_account()
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    data, log, port = root / "data", root / "server.log", _free_port()

    def run(*argv: str | Path) -> None:
        done = subprocess.run([str(arg) for arg in argv], cwd=root, capture_output=True, text=True,
                              timeout=120, **as_user)
        if done.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}{server_log}")

    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        run(bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _server_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")
