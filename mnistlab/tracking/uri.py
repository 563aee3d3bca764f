"""Tracking and storage URIs: resolved from flags or the environment, credentials masked, checked.

``mask`` makes any text that may hold a URL safe to print, log and record; ``check_reachable``
asks a tracking server's health check before anything is created.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from mnistlab.util.errors import UserError
from mnistlab.util.waiting import Wait

SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "http", "https", "file")


def resolve_uri(uri: str | None = None, recorded: str | None = None) -> str:
    """The one rule for the MLflow tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
    the URI a study ``recorded`` (unless it was recorded masked: its password is gone), else
    ``mlflow.db`` in the working folder."""
    if recorded and "***" in recorded:
        recorded = None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded or f"sqlite:///{Path('mlflow.db').resolve()}"
    uri = quote_userinfo(uri)
    scheme = split_url(uri, "tracking URI").scheme
    if scheme == "" and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()  # a bare folder is MLflow's legacy file store
    elif scheme not in SCHEMES:
        raise UserError(f"tracking URI {mask(uri)!r}: unsupported scheme {scheme!r}")
    return uri


# Query parameters that carry credentials in SQLAlchemy, libpq, MySQL and cloud storage URLs
# (password, passwd, pwd, token, api_key, secret, sslpassword, sas signatures, ...), their names
# read percent-decoded (?pass%77ord= is ?password=). Names are bounded to keep matching linear.
_QUERY_PARAM = re.compile(r"([?&;])([\w.%+-]{1,200})=([^&;#\s'\"]*)")
_SECRET_NAME = re.compile(r"(?i)pass(?:word|wd)?|pwd|token|secret|key|credential|auth|sig")
# user:password@ after a scheme, up to the last '@' of the URL: a password may hold '@', ':', and
# also an unencoded '/', '?' or '#' that cut the URL short for a parser (over-masking a path that
# holds an '@' is the safe side). The look-behind starts a match only where a scheme can start.
_USERINFO = re.compile(r"((?<![\w+.-])[a-z][\w+.-]*://[^:/@\s'\"]*):([^\s'\"]*)@", re.IGNORECASE)
# Variables whose values are secrets mnistlab, MLflow or a database driver reads.
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD",
              "MYSQL_PWD", "POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD")
_MIN_SECRET = 4  # shorter fragments of a secret are left: masking every "ab" would garble the text


def mask(text: str, *sources: str) -> str:
    """``text`` with every credential replaced by ***, safe to print, log and record.

    Masks what URLs in ``text`` carry (``user:password@`` and secret query parameters such as
    ``?password=``), the values of the secret environment variables (SECRET_ENV), and the
    secrets of each URL in ``sources`` wherever they appear, also in pieces: a driver that
    splits ``user:p@ss@host`` at the first '@' reports the host "ss@host".
    """
    secrets = {v for name in SECRET_ENV if len(v := os.environ.get(name, "")) >= _MIN_SECRET}
    for url in (text, *sources):
        secrets.update(_secrets_of(url))
    out = _USERINFO.sub(r"\1:***@", text)
    out = _QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}=***" if _secret_param(m[2]) else m[0], out)
    for secret in sorted(secrets, key=len, reverse=True):
        out = out.replace(secret, "***")
    return out


def split_url(url: str, what: str) -> Any:
    """``urlsplit``, with a malformed URL (e.g. an unclosed IPv6 bracket) as one masked UserError."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here, not later in a driver
    except ValueError as exc:
        detail = str(exc)
        if "could not be cast" in detail:  # the message quotes the "port", which may be a piece of a password
            detail = "its port is not a number; a password holding '/', '?', '#' or '@' must be percent-encoded"
        raise UserError(f"{what} {mask(url)!r}: not a valid URL ({mask(detail, url)})") from None
    return parts


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store or storage; None for any other (or one in memory)."""
    if urlsplit(uri).scheme != "sqlite":
        return None
    path = uri.split("sqlite:///", 1)[-1]
    return None if path in ("", ":memory:") else Path(path)


def quote_userinfo(url: str) -> str:
    """``url`` with any '@' or ':' inside its password percent-encoded.

    Python reads ``user:p@ss@host`` up to the last '@', SQLAlchemy up to the first (password
    "p", host "ss@host"), so the driver would connect elsewhere and print a piece of the password.
    """
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not sep or not at or not colon or ("@" not in password and ":" not in password):
        return url
    return f"{scheme}://{user}:{quote(password, safe='%')}@{host}{slash}{tail}"


def _secrets_of(url: str) -> set[str]:
    """The credentials in a URL (raw and percent-decoded), and their '@'/':' separated pieces."""
    from urllib.parse import unquote

    found = [m[2] for m in _USERINFO.finditer(url)] + [m[3] for m in _QUERY_PARAM.finditer(url) if _secret_param(m[2])]
    out: set[str] = set()
    for secret in found:
        for form in {secret, unquote(secret)}:
            out.add(form)
            out.update(re.split(r"[@:/?#]", form))
    return {s for s in out if len(s) >= _MIN_SECRET}


def _secret_param(name: str) -> bool:
    from urllib.parse import unquote_plus

    return _SECRET_NAME.search(unquote_plus(name)) is not None


def _without_userinfo(uri: str) -> str:
    """``uri`` without ``user:password@``: urllib cannot log in with it (MLflow's client can)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()


def _check_database(uri: str, wait: float) -> None:
    """UserError in one line, within seconds, when a database tracking store cannot be connected to
    (MLflow itself retries for about two minutes, then prints a traceback). A server that is not up
    yet is waited for, with ``wait``, like a tracking server."""
    import sqlalchemy

    waiting = Wait(wait)
    while True:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.NullPool)
        try:
            with engine.connect():
                return
        except Exception as exc:  # the driver's OperationalError (a missing database, a refused login, no server)
            detail = mask(str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300], uri)
            starting = any(sign in detail.lower() for sign in ("connection refused", "could not connect",
                                                               "starting up", "timeout expired"))
            if not starting or waiting.over():
                raise UserError(f"tracking store {mask(uri)}: cannot connect ({detail}){waiting.waited()}; "
                                "nothing was trained") from None
            waiting.again(f"waiting for the tracking store {mask(uri)} ({detail})")
        finally:
            engine.dispose()


def check_reachable(uri: str, timeout: float = 5.0, wait: float = 0.0) -> None:
    """UserError in one line when a tracking server does not answer its health check.

    With ``wait``, a server that is not up yet (connection refused, unknown host) is retried
    every 2 s for that many seconds, with one line on stderr saying so.
    """
    scheme = split_url(uri, "tracking URI").scheme
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri, wait)
        return
    if scheme not in ("http", "https"):
        return
    health = _without_userinfo(uri).rstrip("/") + "/health"
    waiting = Wait(wait)
    while True:
        try:
            with urllib.request.urlopen(health, timeout=timeout) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            raise UserError(f"MLflow server {mask(uri)} answered its health check with HTTP {exc.code}") from None
        except ValueError as exc:  # http.client.InvalidURL: a URL urllib cannot send
            raise UserError(f"tracking URI {mask(uri)!r}: not a valid URL ({mask(str(exc), uri)})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if waiting.over():
                raise UserError(f"MLflow server {mask(uri)} is unreachable ({reason}){waiting.waited()}; "
                                "nothing was trained") from None
            waiting.again(f"waiting for the MLflow server {mask(uri)} ({reason})")
            continue
        raise UserError(f"MLflow server {mask(uri)} answered its health check with an error")
