"""Bench: the speed probe a `--time` search runs, and the plan it buys on this machine.

Runs ``microser.components.probe_step_seconds`` (the fixed probe model,
``fidelity.PROBE_SPEC``, with the search's default recipe) ``--repeats``
times per cache and thread count, and prints the median seconds per step,
the speed relative to ``fidelity.CALIBRATION_STEP_SECONDS`` and the rungs and
final-stage steps that the default 10-minute budget then plans. Re-measure
the calibration constant with it when the calibration machine or torch
changes (2 threads, the median over the caches). Usage::

    python bench/machine_speed.py --cache CACHE [--cache CACHE2] --threads 2,1 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_recipe import machine_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", action="append", default=None,
                    help="cache folder (repeatable; default: the demo cache)")
    ap.add_argument("--threads", default="2", help="comma-separated torch thread counts")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from microser.cache import Cache
    from microser.components import probe_step_seconds
    from microser.fidelity import CALIBRATION_STEP_SECONDS, PROBE_SPEC, measure_time_plan, resolve_fidelity
    from microser.search_config import SearchConfig

    caches = args.cache
    if not caches:
        from microser.demo import ensure_demo_cache

        caches = [str(ensure_demo_cache())]
    config = SearchConfig()
    threads_list = [int(t) for t in args.threads.split(",")]
    print(f"{machine_line(max(threads_list))}; probe {PROBE_SPEC}, calibration {CALIBRATION_STEP_SECONDS:.3f} s/step")
    print(f"{'cache':<28} {'threads':>7} {'median s/step':>13} {'min..max':>13} {'probe wall':>10} {'speed':>6}  "
          "10-minute plan")
    for cache in caches:
        data = Cache.open(cache)
        fidelity = resolve_fidelity(config, data)
        for threads in threads_list:
            torch.set_num_threads(threads)
            per_step, walls = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                per_step.append(probe_step_seconds(data, fidelity.train_config(1, config.seed, threads)))
                walls.append(time.perf_counter() - started)
            median = statistics.median(per_step)
            plan = measure_time_plan(config, None, lambda train_config: median, threads)   # what search plans
            speed = plan["speed"]
            planned = resolve_fidelity(config, data, speed, plan["final_share_steps"])
            rungs, final = planned.rungs, planned.final_steps
            print(f"{Path(cache).name[:28]:<28} {threads:>7} {median:>13.4f} "
                  f"{min(per_step):>6.3f}..{max(per_step):<6.3f} {statistics.median(walls):>9.1f}s {speed:>6g}  "
                  f"rungs {', '.join(map(str, rungs))}, final {final}", flush=True)


if __name__ == "__main__":
    main()
