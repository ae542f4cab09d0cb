"""Study names and storage URLs, checked and read without opening anything (no optuna here).

Every command accepts and refuses the same names and URLs: ``check_study_name``
(1-100 characters of ``A-Z a-z 0-9 . _ -``, first a letter or digit),
``check_storage_url`` (no in-memory SQLite, no folder, a writable place),
``default_storage_url`` (``sqlite:///studies/<study>.db``, the one default),
``default_artifacts_dir`` and ``safe_url`` (a password masked for messages).
``microser.storage`` opens what they name.
"""

from __future__ import annotations

import re
from pathlib import Path

from microser import checks
from microser.errors import MicroserError

_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_study_name(study_name) -> str:
    """The study name if it is safe as a file name in every storage: 1-100 characters from ``A-Z a-z 0-9 . _ -``,
    starting with a letter or digit; MicroserError otherwise. Every command checks it the same way."""
    if not isinstance(study_name, str) or not STUDY_NAME.fullmatch(study_name):
        bad = sorted({ch for ch in str(study_name) if not (ch.isascii() and (ch.isalnum() or ch in "._-"))})
        why = (f"has {', '.join(repr(ch) for ch in bad)}" if bad else
               "is empty" if not study_name else
               "is longer than 100 characters" if len(str(study_name)) > 100 else "starts with '.', '_' or '-'")
        raise MicroserError(f"study name {study_name!r} {why}; expected 1-100 characters from A-Z a-z 0-9 . _ - "
                            "starting with a letter or digit (it names files under studies/): pass e.g. --study ser80k")
    return study_name


def default_storage_url(study_name: str) -> str:
    """``sqlite:///studies/<study>.db``: the storage used when ``--storage`` is not given."""
    return f"sqlite:///studies/{check_study_name(study_name)}.db"


def check_storage_url(url: str) -> str:
    """The URL if it names a lasting storage whose file (sqlite, journal) can be written; MicroserError naming the
    URL and the fix otherwise: in-memory SQLite (``sqlite://``, ``sqlite:///``, ``sqlite:///:memory:``), an empty
    journal path, a folder, or a place that cannot be written. Runs before any study is opened or trained."""
    fix = "pass e.g. --storage sqlite:///studies/NAME.db"
    if url.startswith("sqlite:") and (not url.startswith("sqlite:///") or url[len("sqlite:///"):].split("?")[0]
                                      in ("", ":memory:")):
        raise MicroserError(f"storage {url!r} names no database file (SQLite would keep the study in memory and "
                            f"lose it at exit): {fix}")
    kind = storage_kind(url)
    if kind == "journal" and not str(journal_path(url)).strip(". "):
        raise MicroserError(f"storage {url!r} names no journal file: pass e.g. --storage journal:studies/NAME.log")
    path = file_of(url)
    if path is not None:
        if path.is_dir():
            raise MicroserError(f"storage {url!r}: {path} is a folder, expected a {kind} file: {fix}")
        if not path.exists():
            checks.out_file("--storage", path)
    return url


def storage_kind(url: str) -> str:
    """``"sqlite"``, ``"journal"`` or ``"rdb"`` (any other SQLAlchemy URL); MicroserError otherwise."""
    if url.startswith("sqlite:///"):
        return "sqlite"
    if url.startswith("journal:") or (("://" not in url) and url.endswith(_JOURNAL_SUFFIXES)):
        return "journal"
    if "://" in url:
        return "rdb"
    raise MicroserError(f"storage {url!r} is not understood: expected sqlite:///FILE.db, journal:FILE "
                        "(or FILE.log), or postgresql://USER:PASS@HOST/DB")


def journal_path(url: str) -> Path:
    path = url[len("journal:"):] if url.startswith("journal:") else url
    if path.startswith("///"):
        path = path[2:]
    elif path.startswith("//"):
        path = path[2:]
    return Path(path)


def file_of(url: str) -> Path | None:
    """The file a sqlite or journal URL points to (None for server databases)."""
    kind = storage_kind(url)
    if kind == "sqlite":
        return Path(url[len("sqlite:///"):])
    if kind == "journal":
        return journal_path(url)
    return None


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    try:
        import sqlalchemy

        if "://" in url and storage_kind(url) != "journal":
            return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # a URL sqlalchemy cannot parse is shown as given
        pass
    return url


def default_artifacts_dir(url: str | None, study_name: str) -> Path:
    """``<folder of the study file>/<study>-artifacts``; ``studies/<study>-artifacts`` for server databases."""
    check_study_name(study_name)
    url = url or default_storage_url(study_name)
    path = file_of(url)
    folder = path.parent if path is not None else Path("studies")
    return folder / f"{study_name}-artifacts"
