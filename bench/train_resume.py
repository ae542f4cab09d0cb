"""Bench: kill -9 during `microser train`, run the same command again: same best validation CCC as uninterrupted?

Makes two throwaway studies on ``--cache`` holding one trial each (``--model``:
``pick`` or ``ref``, see bench/train_recipe.py), then in the first runs
``microser train --steps N --eval-every E --threads T --device cpu --json``,
sends SIGKILL ``--kill-after`` seconds after its first checkpoint appears, and
runs the same command again to the end; in the second it runs the command once,
uninterrupted. Prints the step the kill lost back to (the checkpoint the
resumed run started from), both runs' best validation CCC, their difference
(goal: within 0.005; bit-exact expected with the same thread count) and the
test CCC. Usage::

    nice -n 10 python bench/train_resume.py --cache CACHE --steps 1000 --kill-after 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_recipe import machine_line, resolve_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_study(folder: Path, cache: str, spec) -> str:
    """A sqlite study made the way `microser search` records a trial: settings (cache, artifacts) and one spec."""
    import optuna

    from microser.storage import SETTINGS_ATTR, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    url = f"sqlite:///{folder}/s.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url, "s"), directions=["maximize"])
    study.set_user_attr(SETTINGS_ATTR, {"cache": str(Path(cache).resolve()), "artifacts": str(folder / "artifacts"),
                                        "objectives": [], "budgets": [], "input_seconds": 1.0})
    study.add_trial(optuna.create_trial(values=[0.0], user_attrs={"spec": spec.to_json(), "summary": spec.summary(),
                                                                  "family": spec.family}))
    return url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="a cache folder (built with the csv teacher)")
    ap.add_argument("--model", default="pick")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kill-after", type=float, default=20.0, help="seconds after the first checkpoint")
    args = ap.parse_args()
    spec = resolve_model(args.model)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(machine_line(args.threads))
    print(f"data: {args.cache}; model {args.model}: {spec.summary()}; {args.steps} steps, validation every "
          f"{args.eval_every}, no early stopping")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in ("killed", "whole"):
            folder = Path(tmp) / name
            folder.mkdir()
            url = make_study(folder, args.cache, spec)
            command = [sys.executable, "-m", "microser.cli", "train", "--study", "s", "--trial", "0", "--storage",
                       url, "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--patience", "0",
                       "--threads", str(args.threads), "--device", "cpu", "--json"]
            t0 = time.perf_counter()
            if name == "killed":
                proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=env)
                ckpts = folder / "artifacts" / "trained" / "trial-0"
                while proc.poll() is None and not list(ckpts.glob("seed-*.ckpt")):
                    time.sleep(0.2)
                time.sleep(args.kill_after)
                if proc.poll() is not None:
                    sys.exit("the run ended before the kill: raise --steps or lower --kill-after")
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                print(f"killed with SIGKILL {time.perf_counter() - t0:.0f} s after the start")
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(done.stderr[-2000:])
            results[name] = (json.loads(done.stdout), time.perf_counter() - t0)
        (killed, t_killed), (whole, t_whole) = results["killed"], results["whole"]
        run = killed["seeds"][0]
        diff = killed["ccc"]["mean"] - whole["ccc"]["mean"]
        print(f"{'run':22s} {'resumed at':>10s} {'best step':>9s} {'best valid CCC':>15s} {'test CCC':>9s} {'wall s':>7s}")
        print(f"{'killed, then resumed':22s} {run['resumed_at']:>10} {run['best_step']:>9} "
              f"{killed['ccc']['mean']:>15.6f} {killed['test_ccc']['mean']:>9.4f} {t_killed:>7.0f}")
        print(f"{'uninterrupted':22s} {'-':>10s} {whole['seeds'][0]['best_step']:>9} {whole['ccc']['mean']:>15.6f} "
              f"{whole['test_ccc']['mean']:>9.4f} {t_whole:>7.0f}")
        same = killed["ccc"] == whole["ccc"] and run["curve"] == whole["seeds"][0]["curve"]
        print(f"difference in best validation CCC: {diff:+.6f} (goal: within 0.005); curves and CCC bit-identical: "
              f"{same}")


if __name__ == "__main__":
    main()
