"""`mnistlab doctor`: one screen of what mnistlab sees on this machine, and whether it is usable.

Each line is a finding with a verdict: ``ok``, ``--`` (nothing to judge, or nothing made yet, such
as the default stores before a first study) or ``FAIL`` (something the user asked for, in an
option or the environment, cannot be used). The exit code is 1 when any line fails. Nothing is
created: a store that does not exist yet is reported, not made, and SQLite files open read-only.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mnistlab.util.errors import UserError, clip

OK, NOTE, FAIL = "ok", "--", "FAIL"
LINE_LIMIT = 500  # characters of one finding


@dataclass(frozen=True)
class Finding:
    topic: str
    text: str
    verdict: str = NOTE


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def torch_build() -> str:
    """``2.14.1, CUDA 12.8 build`` or ``2.13.0+cpu, CPU build``: which PyTorch this is."""
    import torch

    if torch.version.cuda:
        kind = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        kind = f"ROCm {torch.version.hip} build"
    else:
        kind = "CPU build"
    return f"{torch.__version__}, {kind}"


def versions_line() -> str:
    """What `mnistlab --version` prints."""
    return (f"mnistlab {_version('mnistlab')} (torch {torch_build()}; optuna {_version('optuna')}; "
            f"mlflow {_version('mlflow')}; python {platform.python_version()})")


def _software() -> list[Finding]:
    return [
        Finding("mnistlab", f"{_version('mnistlab')} at {Path(__file__).parent}"),
        Finding("python", f"{platform.python_version()} ({sys.executable}), {platform.system()} {platform.machine()}"),
        Finding("torch", torch_build()),
        Finding("optuna", _version("optuna")),
        Finding("mlflow", _version("mlflow")),
    ]


def _devices(device: str | None) -> list[Finding]:
    import torch

    from mnistlab.core.train import resolve_device
    from mnistlab.search.runner import most_workers

    found = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(gpus))
        found.append(Finding("gpus", names, OK))
    elif torch.version.cuda:
        found.append(Finding("gpus", "none visible to this CUDA build (no driver or no device)"))
    else:
        found.append(Finding("gpus", "none: this torch is a CPU build"))
    try:
        chosen = resolve_device(device or "auto")
        found.append(Finding("device", f"{device or 'auto'} trains on {chosen}", OK))
    except UserError as exc:
        found.append(Finding("device", str(exc), FAIL))
    most, why = most_workers(device)
    found.append(Finding("workers", f"`study run --workers N` starts at most {most} here ({why})"))
    return found


def _data(data_dir: Path) -> Finding:
    from mnistlab.core import data

    cache = data_dir / data.CACHE_FILE
    try:
        if cache.exists():
            arrays = data.load_arrays(data_dir)  # checks the manifest's SHA-256
            sizes = ", ".join(f"{s} {len(y):,}" for s, (_, y) in arrays.items())
            return Finding("data", f"cache {cache} verifies ({sizes})", OK)
        data.read_packaged()
        return Finding("data", f"no cache at {cache} yet; the shipped MNIST files verify, and the first "
                               "command that needs them (or `mnistlab data prepare`) builds it", NOTE)
    except UserError as exc:
        return Finding("data", str(exc), FAIL)


def _sqlite_count(path: Path, table: str) -> int:
    """Rows of ``table`` in a SQLite file opened read-only (no journal or WAL file is made)."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - a fixed table name
    finally:
        con.close()


def _database_count(url: str, table: str) -> str:
    """Connect to a database server within seconds; its version and the rows of ``table`` if it has one."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5}, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as con:
            server = con.dialect.server_version_info or ()
            have = sqlalchemy.inspect(con).has_table(table)
            rows = con.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar() if have else None
    finally:
        engine.dispose()
    where = f"server {'.'.join(map(str, server[:2]))}" if server else "server"
    return f"{where} answers; " + (f"{rows} {table}" if rows is not None else f"no {table} table yet")


def _store(topic: str, url: str, given: bool, table: str, noun: str,
           remote: Callable[[str], str] | None = None) -> Finding:
    """One store: where it is, whether it opens, how much it holds. ``given``: named by an option or
    the environment (a failure then fails the check) rather than the default of this folder."""
    from mnistlab.tracking.uri import mask, sqlite_file

    shown = mask(url)
    source = "given" if given else "default"
    try:
        path = sqlite_file(url)
        if url.startswith("sqlite"):
            if path is None or not path.exists():
                return Finding(topic, f"{shown} ({source}): not created yet; the first study makes it",
                               FAIL if given and (path is None or not path.parent.is_dir()) else NOTE)
            return Finding(topic, f"{shown} ({source}): opens, {_sqlite_count(path, table)} {noun}", OK)
        if remote is not None:
            return Finding(topic, f"{shown} ({source}): {remote(url)}", OK)
        return Finding(topic, f"{shown} ({source}): {_database_count(url, table)}", OK)
    except UserError as exc:
        return Finding(topic, mask(str(exc).removesuffix("; nothing was trained")), FAIL)
    except Exception as exc:  # a driver's or SQLite's error: the store does not open
        detail = mask(str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300] if str(exc).strip() else
                      type(exc).__name__, url)
        return Finding(topic, f"{shown} ({source}): does not open ({detail})", FAIL)


def _mlflow_server(url: str) -> str:
    from mnistlab.tracking.uri import check_reachable

    check_reachable(url, timeout=5)
    return "the server answers its health check"


def _file_store(url: str) -> str:
    folder = Path(url.removeprefix("file://"))
    if not folder.is_dir():
        raise UserError(f"{url}: no such folder")
    return f"a folder of {sum(1 for p in folder.iterdir() if p.name.isdigit())} experiments"


def findings(data_dir: Path, storage: str | None, tracking_uri: str | None, device: str | None) -> list[Finding]:
    from mnistlab.search.storage import storage_url
    from mnistlab.tracking.uri import resolve_uri

    out = [*_software(), *_devices(device), _data(data_dir)]
    storage_given = bool(storage or os.environ.get("MNISTLAB_STORAGE"))
    try:
        out.append(_store("storage", storage_url(storage), storage_given, "studies", "studies"))
    except UserError as exc:
        out.append(Finding("storage", str(exc), FAIL))
    tracking_given = bool(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        uri = resolve_uri(tracking_uri)
        remote = _mlflow_server if uri.startswith(("http:", "https:")) else \
            _file_store if uri.startswith("file:") else None
        out.append(_store("tracking", uri, tracking_given, "experiments", "experiments", remote))
    except UserError as exc:
        out.append(Finding("tracking", str(exc), FAIL))
    return out


def run(data_dir: Path, storage: str | None, tracking_uri: str | None, device: str | None) -> int:
    """Print the findings; 1 when any fails."""
    from mnistlab.tracking.uri import mask

    found = findings(data_dir, storage, tracking_uri, device)
    width = max(len(f.topic) for f in found)
    for f in found:
        text = mask(f.text)
        if not text.isprintable() or len(text) > LINE_LIMIT:  # a URL from the user: escaped and cut short
            text = clip(text, LINE_LIMIT)
        print(f"{f.verdict:>4}  {f.topic:<{width}}  {text}")
    failed = [f.topic for f in found if f.verdict == FAIL]
    print(f"\n{'FAIL: ' + ', '.join(failed) + ' cannot be used' if failed else 'everything asked for is usable'}")
    return 1 if failed else 0
