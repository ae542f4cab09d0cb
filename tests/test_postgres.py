"""Many machines: `microser search` workers sharing one PostgreSQL study, one of them killed with SIGKILL mid-trial.

Needs a server: MICROSER_TEST_POSTGRES_URL=postgresql://USER:PASS@HOST:PORT/DB (``.ci/run`` starts PostgreSQL on
loopback and sets it; the role needs CREATEDB for the empty-database test). Every test uses its own study name
and deletes it afterwards. Heartbeats are shortened through MICROSER_HEARTBEAT_SECONDS / MICROSER_GRACE_SECONDS
so a killed worker's trial is failed and retried within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search_helpers import build_tiny_search_root

URL = os.environ.get("MICROSER_TEST_POSTGRES_URL")
needs_server = pytest.mark.skipif(not URL, reason="MICROSER_TEST_POSTGRES_URL is not set: no PostgreSQL server to "
                                                  "test against (.ci/run starts one and sets it)")
pytestmark = pytest.mark.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.WARNING)

FAST_HEARTBEAT = {"MICROSER_HEARTBEAT_SECONDS": "1", "MICROSER_GRACE_SECONDS": "3"}
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """24 short clips of 6 speakers with random targets, cached through the csv teacher; a tiny space."""
    return build_tiny_search_root(tmp_path_factory.mktemp("tiny"), 24)


def test_workers_started_alike_draw_different_candidates(tmp_path):
    """Workers on many hosts run the same command (same seed); each trial must still draw its own candidate."""
    from dataclasses import replace

    from microser.components import open_study
    from microser.search_config import SearchConfig

    config = SearchConfig(study="s", storage=f"sqlite:///{tmp_path}/a.db", sampler="random", seed=5)
    host_a, host_b = open_study(config, create=True), open_study(config)
    draws = []
    for study in (host_a, host_b, host_b, host_a, host_b):
        trial = study.ask()
        draws.append((trial.number, trial.suggest_int("w", 0, 10**9)))
        study.tell(trial, [0.0, 1.0, 1.0])
    assert len({w for _, w in draws}) == len(draws)
    # trial n draws the same whichever worker runs it: one worker on a fresh storage repeats the values
    alone = open_study(replace(config, storage=f"sqlite:///{tmp_path}/b.db"), create=True)
    for number, w in draws:
        trial = alone.ask()
        assert (trial.number, trial.suggest_int("w", 0, 10**9)) == (number, w)
        alone.tell(trial, [0.0, 1.0, 1.0])


@pytest.fixture
def study_name():
    """A study name no other test (or earlier run) uses; the study is deleted afterwards."""
    from microser.storage import open_storage

    name = f"pytest-{uuid.uuid4().hex[:12]}"
    yield name
    storage = open_storage(URL, name)
    if name in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        optuna.delete_study(study_name=name, storage=storage)


def _is_trained(t) -> bool:
    return t.state == TrialState.COMPLETE and "ccc" in t.user_attrs and not t.user_attrs.get("rejected")


@needs_server
def test_three_workers_finish_the_study_after_one_is_killed_mid_trial(tiny, tmp_path, study_name):
    from microser.rungs import load_trial_weights
    from microser.storage import load_study

    trials = 4
    shared = tmp_path / "shared-artifacts"          # what every host mounts at the same path (NFS, ...)
    config = tmp_path / "study.toml"
    config.write_text(f'study = "{study_name}"\nstorage = "{URL}"\nartifacts = "{shared}"\n'
                      f'cache = "{tiny / "cache"}"\nspace = "{tiny / "space.toml"}"\nbudgets = ["3k-params"]\n'
                      f'trials = {trials}\nrungs = [150]\nbatch_size = 8\ncrop_seconds = 0.5\ncrops_per_segment = 1\n'
                      f'final_k = 0\nreferences = []\nthreads = 1\nseed = 5\nsampler = "random"\n')
    env = {**os.environ, **FAST_HEARTBEAT, "COLUMNS": "200"}
    workers = []
    for k in range(3):                               # one working folder each, like separate hosts
        (tmp_path / f"host{k}").mkdir()
        workers.append(subprocess.Popen([sys.executable, "-m", "microser.cli", "search", "--config", str(config)],
                                        cwd=tmp_path / f"host{k}", env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    by_pid = {p.pid: p for p in workers}
    victim = killed = None
    try:
        deadline = time.monotonic() + 150
        while victim is None and time.monotonic() < deadline:   # a worker's trial is training: kill -9 it
            try:
                running = [t for t in load_study(study_name, URL).get_trials(states=(TrialState.RUNNING,))
                           if t.user_attrs.get("stage") == "training"
                           and t.user_attrs.get("worker", {}).get("pid") in by_pid]
            except Exception:                                    # the study is not created yet
                running = []
            if running:
                killed = running[0].number
                victim = by_pid[running[0].user_attrs["worker"]["pid"]]
                victim.send_signal(signal.SIGKILL)
                victim.wait()
            time.sleep(0.2)
        if victim is None:
            ended = [p.communicate()[0][-2000:] for p in workers if p.poll() is not None]
            pytest.fail("no trial started training within 150 s; workers that ended said: " + " | ".join(ended))
        survivors = [p for p in workers if p is not victim]
        outputs = [p.communicate(timeout=240)[0] for p in survivors]
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(survivors, outputs):
        assert p.returncode == 0, out[-3000:]

    study = load_study(study_name, URL)
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    trained = [t for t in study.get_trials() if _is_trained(t)]
    assert len(trained) == trials
    specs = [t.user_attrs["spec"] for t in trained]
    assert len(set(specs)) == len(specs)                        # all distinct candidates
    assert len({t.user_attrs["worker"]["pid"] for t in trained}) == 2   # both survivors trained some
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL
    retried = [t for t in study.get_trials() if killed in (t.user_attrs.get("retry_of"), t.system_attrs.get("failed_trial"))]
    assert len(retried) == 1 and retried[0].params == dead.params and _is_trained(retried[0])
    # trial weights live in the shared artifacts folder, loadable by any worker that mounts it
    assert study.user_attrs["config"]["artifacts"] == str(shared)
    for t in trained:
        assert load_trial_weights(study, t, stage="search")


@needs_server
def test_workers_started_together_on_an_empty_database_all_open_it(tmp_path):
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(URL)
    db = f"pytest_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                             dbname=url.database)
    admin.autocommit = True
    try:
        admin.cursor().execute(f"CREATE DATABASE {db}")
    except psycopg2.Error as e:
        admin.close()
        pytest.skip(f"cannot create a database as {url.username} ({e.pgerror or e}): grant CREATEDB to test this")
    fresh = url.set(database=db).render_as_string(hide_password=False)
    child = ("import sys, optuna; from microser.storage import open_storage; "
             "optuna.create_study(study_name='s', storage=open_storage(sys.argv[1], 's'), load_if_exists=True)")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", child, fresh], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, "\n".join(outs)[-3000:]
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()
