"""Study storage URLs, stale-trial recovery and trial weights as Optuna artifacts.

Every command that reads a study goes through :func:`load_study` with the same
``--study`` / ``--storage`` meaning:

* no URL: ``sqlite:///studies/<study>.db`` (relative to the working directory);
* ``sqlite:///FILE.db``: SQLite through ``RDBStorage`` with heartbeats
  (``HEARTBEAT_SECONDS``; a trial silent for ``GRACE_SECONDS`` is failed and its
  parameters re-queued by ``RetryHeartbeatStaleTrialCallback``; the environment
  variables ``MICROSER_HEARTBEAT_SECONDS`` / ``MICROSER_GRACE_SECONDS`` override
  both, e.g. to recover faster in tests) and a 60 s lock
  timeout, so several worker processes can share the file;
* ``journal:FILE`` or a path ending in ``.log`` / ``.journal``: Optuna's journal
  file storage (one machine, no heartbeats);
* ``postgresql://...`` (or any other SQLAlchemy URL): ``RDBStorage`` with heartbeats,
  for workers on many machines.

Journal storage has no heartbeats, and a heartbeat needs a grace period, so
microser also fails stale trials itself when a search starts
(:func:`fail_dead_trials`): every trial records the ``worker`` (host and pid)
running it, and a RUNNING trial whose process no longer exists on this host is
marked FAIL with a ``fail_reason`` user attribute and its parameters re-queued.

Weights are stored with ``optuna.artifacts.FileSystemArtifactStore`` in the
study's artifacts folder (default ``studies/<study>-artifacts`` beside the
study file); the artifact id and the file's sha256 go into the trial's user
attributes (``weights``); :func:`load_weights` reads one back, checked against
its sha256. Evaluations after the first rung (higher rungs, the final stage)
live in a companion study: ``microser.rungs``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from microser.errors import MicroserError, one_line
from microser.teachers import sha256_file
from microser.urls import (check_storage_url, check_study_name, default_storage_url, file_of, journal_path, safe_url,
                           storage_kind)

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
SETTINGS_ATTR = "config"     # study user attr: the search settings (objectives, budgets, cache, ...)
_SCHEMA_RACE_TRIES = 6         # attempts to open a database whose tables another worker is creating


def _env_seconds(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise MicroserError(f"{name}={text!r} is not understood: expected whole seconds >= 1, e.g. {name}={default}")
    return value


def heartbeat_seconds() -> int:
    """Seconds between a running trial's heartbeats (RDB storages): ``MICROSER_HEARTBEAT_SECONDS`` or 10."""
    return _env_seconds("MICROSER_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)


def heartbeats_on(storage: optuna.storages.BaseStorage) -> bool:
    """True for storages that record running trials' heartbeats (RDB storages opened by :func:`open_storage`)."""
    return getattr(storage, "get_heartbeat_interval", lambda: None)() is not None


def grace_seconds() -> int:
    """Heartbeat silence after which a running trial is failed and retried: ``MICROSER_GRACE_SECONDS`` or 30.

    Never below twice the heartbeat interval, so one late beat does not fail a live trial.
    """
    return max(_env_seconds("MICROSER_GRACE_SECONDS", GRACE_SECONDS), 2 * heartbeat_seconds())


def open_storage(url: str | None, study_name: str) -> optuna.storages.BaseStorage:
    """Open (creating files and folders as needed) the storage named by ``url``; see the module doc."""
    url = given = check_storage_url(url or default_storage_url(study_name))
    kind = storage_kind(url)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # replaying the log failed
            bad = _bad_journal_line(path)   # Optuna tolerates only a torn last line
            what = f"{bad} is not valid JSON" if bad else \
                f"an entry cannot be replayed ({type(e).__name__}: {one_line(e, 80)})"
            raise MicroserError(f"journal file {path}: {what} (the file was edited or damaged): restore it from a "
                                "backup, or pass another --storage to start afresh") from None
    engine_kwargs: dict[str, Any] = {}
    if kind == "sqlite":
        path = file_of(url)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}   # writers wait for the lock instead of failing
    elif url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}
        url = _postgres_driver(url)
    import sqlalchemy.exc

    for attempt in range(_SCHEMA_RACE_TRIES):
        try:
            with warnings.catch_warnings():   # heartbeat_interval is marked experimental; it is what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_seconds(),
                    grace_period=grace_seconds(),
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                )
                if kind == "sqlite":
                    _lock_on_begin(storage.engine)
                return storage
        except ImportError as e:
            raise MicroserError(f"storage {safe_url(given)!r} needs a database driver that is not installed "
                                f"({_first_line(e)}): pip install 'microser[postgres]'") from None
        except sqlalchemy.exc.SQLAlchemyError as e:
            # Workers started together on an empty database all create Optuna's tables; the losers see
            # "already exists" / a duplicate key. The winner's tables are there a moment later: try again.
            if attempt + 1 < _SCHEMA_RACE_TRIES and _schema_race(e):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise MicroserError(f"storage {safe_url(given)!r} refused the connection ({_first_line(e)}): start the "
                                "database or pass another --storage, e.g. sqlite:///studies/NAME.db") from None
    raise AssertionError("unreachable")


def _lock_on_begin(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    By default pysqlite begins a transaction at the first write, so Optuna's "WAITING -> RUNNING only if
    still WAITING" reads the state before holding the lock: two workers can both pop the same waiting trial
    (a retry, a warm start) and train it twice, and the second one's tell then fails ("Cannot tell a
    COMPLETE trial"), which stopped that worker. With the lock taken at BEGIN the check and the write are
    one step. PostgreSQL needs nothing: Optuna reads the row FOR UPDATE there.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None   # let the "begin" event below issue BEGIN itself

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()   # pooled connections opened before the listeners: reopen them with the listeners


def _bad_journal_line(path: Path) -> str | None:
    """``"line N of M"``: the first line of a journal file that is not JSON (a torn last line excepted), or None."""
    import json

    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        try:
            json.loads(line)
        except ValueError:
            return f"line {number} of {len(lines) - 1}"
    return None


def _schema_race(e: Exception) -> bool:
    """True for the errors of two processes creating Optuna's tables at once (not for a refused connection)."""
    text = str(getattr(e, "orig", None) or e).lower()
    return "already exists" in text or "duplicate key" in text or "unique constraint" in text


def _postgres_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; use psycopg2 (the ``postgres`` extra) when only it exists."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return text[0].strip() if text else type(e).__name__


def load_study(study_name: str, storage: str | None = None) -> optuna.Study:
    """Open an existing study; MicroserError naming the storage and the studies it holds if absent."""
    check_study_name(study_name)
    url = storage or default_storage_url(study_name)
    path = file_of(url)
    if path is not None and not path.exists():
        raise MicroserError(f"study {study_name!r}: storage file {path} does not exist: run "
                            f"`microser search --study {study_name}` first or pass --storage")
    store = open_storage(url, study_name)
    try:
        return optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        raise MicroserError(f"study {study_name!r} is not in {safe_url(url)} (it holds: "
                            f"{', '.join(names) or 'no studies'}): pass --study with one of those names") from None


def study_settings(study: optuna.Study) -> dict:
    """The search settings a ``microser search`` stored on the study (objectives, budgets, cache, artifacts, ...)."""
    settings = study.user_attrs.get(SETTINGS_ATTR)
    if settings is None:
        raise MicroserError(f"study {study.study_name!r} was not created by `microser search` (no "
                            f"{SETTINGS_ATTR!r} user attribute): use a study made by microser")
    return settings


# ---- stale trials -------------------------------------------------------------------------------


def worker_tag() -> dict:
    """``{"host", "pid"}`` of this process, recorded on each trial it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_gone(trial: FrozenTrial) -> bool:
    """True when a RUNNING trial's worker ran on this host and its process no longer exists."""
    worker = trial.user_attrs.get("worker") or {}
    return (trial.state == TrialState.RUNNING and worker.get("host") == socket.gethostname()
            and worker.get("pid") != os.getpid() and not _pid_alive(int(worker.get("pid", 0))))


def fail_dead_trials(study: optuna.Study, *, untagged_after_s: float = 600.0) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone; re-queue their parameters.

    Also fails RUNNING trials with no ``worker`` tag that started more than
    ``untagged_after_s`` ago (a worker killed between creating the trial and
    tagging it). Trials of workers on other hosts are left to heartbeats.

    Returns:
        Numbers of the trials failed.
    """
    now = datetime.datetime.now()
    failed = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker:
            if not worker_gone(t):
                continue
            reason = (f"worker {worker['host']}:{worker['pid']} stopped while the trial was running; "
                      f"failed by pid {os.getpid()} at {now.isoformat(timespec='seconds')}")
        else:
            if t.datetime_start is None or (now - t.datetime_start).total_seconds() < untagged_after_s:
                continue
            reason = (f"running for over {untagged_after_s:.0f} s without a worker tag; failed by pid "
                      f"{os.getpid()} at {now.isoformat(timespec='seconds')}")
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process finished or failed it first
        failed.append(t.number)
        attrs = {k: v for k, v in t.user_attrs.items() if k not in ("worker", "fail_reason", "stage")}
        attrs["retry_of"] = attrs.get("retry_of", t.number)   # the first of a chain of retries: its seed is reused
        if t.params:
            study.enqueue_trial(t.params, user_attrs=attrs)
        elif "job" in attrs:   # a queued evaluation (microser.rungs): queue it again as it was
            study.add_trial(optuna.create_trial(state=TrialState.WAITING, user_attrs=attrs))
    return failed


# ---- artifacts ----------------------------------------------------------------------------------


def artifact_store(folder: str | Path) -> FileSystemArtifactStore:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def save_weights(state_dict: dict, *, store: FileSystemArtifactStore, study_or_trial, name: str) -> dict:
    """Upload ``state_dict`` (``torch.save``) as an artifact; returns ``{"artifact_id", "sha256"}``.

    ``study_or_trial`` is a running ``optuna.Trial`` or a ``Study`` (finished
    trials cannot take artifacts, so the final stage attaches to the study).
    """
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.pt"
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path)
        digest = sha256_file(path)
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study_or_trial)
    return {"artifact_id": artifact_id, "sha256": digest}


def load_weights(study: optuna.Study, weights: dict, *, what: str, artifacts: str | Path | None = None) -> dict:
    """The state dict stored as ``weights`` (``{"artifact_id", "sha256"}``), checked against its sha256.

    ``what`` names it in messages (``"trial 3"``); ``artifacts`` overrides the folder recorded in the study
    (for a moved study). Which weights a trial has at which stage is ``microser.rungs.load_trial_weights``.
    """
    import torch

    folder = Path(artifacts) if artifacts is not None else Path(study_settings(study)["artifacts"])
    store = FileSystemArtifactStore(str(folder))
    where = folder / weights["artifact_id"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        try:
            download_artifact(artifact_store=store, file_path=str(path), artifact_id=weights["artifact_id"])
        except (ArtifactNotFound, FileNotFoundError):
            raise MicroserError(f"weights of {what} (study {study.study_name!r}) are missing: {where} "
                                "was deleted or moved: put the file back, or retrain the trial") from None
        digest = sha256_file(path)
        if digest != weights["sha256"]:
            raise MicroserError(f"weights of {what} at {where} have sha256 {digest[:12]}... but the "
                                f"study recorded {weights['sha256'][:12]}...: the file was changed; retrain the trial")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # more than tensors inside: refused, never executed
            raise MicroserError(f"weights of {what} at {where} are not a plain state dict "
                                f"({' '.join(str(e).split())[:100]}): retrain the trial") from None
