"""The `microser` command line: one short function per command (parse, call the library, print).

Imports at the top are light (no torch, no optuna), so `microser --help` and `microser cache info` start fast;
each command imports the library it calls.
"""

from __future__ import annotations

import enum
import sys
import time as _time
from pathlib import Path
from typing import Annotated, Optional

import typer

from microser.budgets import BUDGET_HELP
from microser.cache import SPLITS
from microser.errors import MicroserError
from microser.search_config import FOLDS, RAM_MODES, SAMPLERS
from microser.search_config import SearchConfig as _SC
from microser.train_config import SCHEDULES
from microser.trainer import DEFAULT_STEPS as _DEFAULT_STEPS
from microser.trainer import EVAL_EVERY as _EVAL_EVERY
from microser.trainer import PATIENCE as _PATIENCE
from microser.trainer import SCHEDULE as _SCHEDULE


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A str Enum of ``values`` (taken from the module that defines them), so `--help` lists the choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


RamMode = _choices("RamMode", RAM_MODES)
Sampler = _choices("Sampler", SAMPLERS)
Split = _choices("Split", SPLITS)
Folds = _choices("Folds", FOLDS)
Schedule = _choices("Schedule", SCHEDULES)


def _value(choice: enum.Enum | None) -> str | None:
    return None if choice is None else choice.value

app = typer.Typer(
    help="Find, compress and export micro speech-emotion-recognition models for hearing-aid firmware.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Build and inspect teacher caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

# Shared option types, so the same option reads the same in every command.
InputSeconds = Annotated[
    float,
    typer.Option("--input-seconds", help="Audio duration (s) at which MACs and peak RAM are measured."),
]
StudyOpt = Annotated[str, typer.Option("--study", help="Optuna study name.")]
StorageOpt = Annotated[
    Optional[str],
    typer.Option(
        "--storage",
        help="Study storage: sqlite:///FILE.db, a journal file (FILE.log or journal:FILE), or postgresql://... "
        "Default: sqlite file studies/<study>.db.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
RamModeOpt = Annotated[RamMode, typer.Option("--ram-mode", help="offline: peak activations of the whole-clip graph; "
                                         "streaming: state + arena of the generated C library (wav2small family), "
                                         "independent of the clip length.")]


# ---- commands (each section: parse, call one library function, render with microser.show) ----


# -- cache --


def _pair(text: Optional[str], option: str) -> Optional[tuple[float, float]]:
    """'LO,HI' -> (LO, HI) for --target-range / --rescale-from."""
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise MicroserError(f"{option} {text!r} is not understood: expected LO,HI, e.g. {option} 0,1") from None
    return lo, hi


@cache_app.command("build")
def cache_build(
    audio: Annotated[Path, typer.Option("--audio", help="Folder of audio (recursive) or CSV with path[,speaker][,split].")],
    teacher: Annotated[list[str], typer.Option("--teacher", help="csv:FILE, hf:NAME_OR_PATH, onnx:FILE or demo; "
                                                "repeat to average several teachers.")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder to write (an interrupted build there resumes).")],
    max_seconds: Annotated[float, typer.Option("--max-seconds", help="Longer files are cut into segments of this length.")] = 8.0,
    overlap_seconds: Annotated[float, typer.Option("--overlap-seconds", help="Overlap of consecutive segments.")] = 1.0,
    target_range: Annotated[str, typer.Option("--target-range", help="Scale of the targets, LO,HI.")] = "0,1",
    rescale_from: Annotated[Optional[str], typer.Option("--rescale-from", help="Map CSV labels from LO,HI onto the target range.")] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also store the teacher's pooled hidden states.")] = False,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Seed of the train/valid/test split.")] = 0,
    teacher_batch_size: Annotated[int, typer.Option("--teacher-batch-size", help="Segments per teacher call (and "
                                  "per journal entry of the resumable build).")] = 8,
    allow_absolute_paths: Annotated[bool, typer.Option("--allow-absolute-paths", help="Let CSV paths leave the CSV's folder.")] = False,
) -> None:
    """Run the teacher(s) once over every segment of the audio and store audio + A/D/V targets."""
    from microser import show
    from microser.cache_build import build_cache

    with show.cache_progress() as progress:
        report = build_cache(audio, teacher, out, max_seconds=max_seconds, overlap_seconds=overlap_seconds,
                             split_seed=split_seed, target_range=_pair(target_range, "--target-range"),
                             rescale_from=_pair(rescale_from, "--rescale-from"), embeddings=embeddings,
                             teacher_batch_size=teacher_batch_size, allow_absolute_paths=allow_absolute_paths,
                             progress=progress)
    show.cache_built(report)


@cache_app.command("info")
def cache_info(path: Annotated[Path, typer.Argument(help="Cache folder.")], json_: JsonOpt = False) -> None:
    """Items, hours, speakers, splits, target statistics and teachers of a cache."""
    from microser import show
    from microser.cache import cache_info as info

    show.cache_info(info(path), as_json=json_)


@cache_app.command("verify")
def cache_verify(path: Annotated[Path, typer.Argument(help="Cache folder.")]) -> None:
    """Check a cache's integrity (sizes, checksums, shapes, NaN); exit 1 with the problems, else print ok."""
    from microser import show
    from microser.cache import verify_cache

    problems = verify_cache(path)
    show.cache_verified(path, problems)
    if problems:
        raise typer.Exit(1)


# -- demo --


@app.command("demo")
def demo(
    out: Annotated[Optional[Path], typer.Option("--out", help="Demo folder (corpus/ and cache/ inside). "
                                                "Default: $MICROSER_HOME/demo, i.e. ~/.cache/microser/demo.")] = None,
    clips: Annotated[int, typer.Option("--clips", help="Number of synthetic clips (1.5-4 s each).")] = 1000,
    speakers: Annotated[int, typer.Option("--speakers", help="Number of synthetic speakers.")] = 24,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed (same seed, same audio).")] = 0,
    json_: JsonOpt = False,
) -> None:
    """Build the embedded SYNTHETIC demo corpus and its teacher cache (no download; reused when present)."""
    from microser import checks, show
    from microser.demo import build_demo

    checks.seed("--seed", seed)
    if out is not None:
        checks.out_folder("--out", out)
    with show.cache_progress() as progress:
        report = build_demo(out, n_clips=clips, n_speakers=speakers, seed=seed, progress=progress)
    show.demo_built(report, as_json=json_)


# -- describe --


@app.command("describe")
def describe(
    spec: Annotated[str, typer.Argument(help="Reference name (wav2small-ref, mobilenetv3-s, mobilenetv4-s), "
                                        "spec JSON or a .json file.")],
    input_seconds: InputSeconds = 1.0,
    ram_mode: RamModeOpt = RamMode.offline,
    json_: JsonOpt = False,
) -> None:
    """Print every cost of one architecture: params, MACs, ONNX bytes, peak RAM (int8 and fp32)."""
    from microser import checks, show
    from microser.costs import measure_report

    checks.number("--input-seconds", input_seconds, high=checks.MAX_INPUT_SECONDS, example=1)  # > 0: costs.py
    streaming = None
    if ram_mode is RamMode.streaming:  # before the slow offline measurement: a MobileNet spec fails fast
        from microser.cgen.ram import streaming_report

        streaming = streaming_report(spec, input_seconds)
    show.cost_report(measure_report(spec, input_seconds=input_seconds), as_json=json_, streaming=streaming)


# -- search --


def _csv(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


@app.command()
def search(
    budget: Annotated[Optional[list[str]], typer.Option("--budget", help=BUDGET_HELP)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Study config TOML with these options' "
                                                   "keys (e.g. studies/demo.toml); flags given here override it.")] = None,
    cache: Annotated[Optional[str], typer.Option("--cache", help="Cache folder. Default: the embedded "
                                                 "demo cache, built on first use.")] = None,
    space: Annotated[Optional[str], typer.Option("--space", help="Search space TOML, or a packaged space's name "
                                                 "(default, wav2small, mobilenet). Default: default.")] = None,
    time: Annotated[Optional[str], typer.Option("--time", help="Wall-clock budget of the whole command (search "
                    "and final stage), e.g. 10m, 1h30m, 900s, or 'none'; it plans the rungs and final steps and "
                    "stops drawing candidates in time for the final stage. Default 10m (none when only --trials "
                    "is given).")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", help="At most this many candidates trained at the "
                      "first rung (rejected candidates and references not counted). Default: as many as --time "
                      "allows.")] = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    artifacts: Annotated[Optional[str], typer.Option("--artifacts", help="Folder for trial weights. Default: "
                                                     "<study folder>/<study>-artifacts.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes searching one storage. "
                                                   "Default 1.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch threads per worker. Default: "
                                                   "cores / workers.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=f"Sampler and training seed. Default {_SC.seed}.")] = None,
    sampler: Annotated[Optional[Sampler], typer.Option("--sampler", help="tpe is multivariate TPE (bench/samplers.py "
                       f"compares them). Default {_SC.sampler}.")] = None,
    objectives: Annotated[Optional[str], typer.Option("--objectives", help="Costs minimised beside mean CCC, "
                          "comma-separated from params, ram_bytes, onnx_bytes, macs, instr (int8 C instructions per "
                          "second of audio). Default params,ram_bytes: fp32 "
                          "ONNX bytes track params closely and a 4-D front keeps almost every trial; every cost "
                          "is recorded anyway.")] = None,
    rungs: Annotated[Optional[str], typer.Option("--rungs", help="Optimizer steps of each rung, comma-separated "
                     "(e.g. 60,200,600): every candidate trains at the first, the best 1/eta go up. Default: "
                     "planned from --time (60,200,600 at 10m).")] = None,
    eta: Annotated[Optional[int], typer.Option("--eta", help=f"Promote the best 1/eta of a rung. "
                                               f"Default {_SC.eta}.")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Instead of --rungs: one rung of this "
                                                    "many epochs of the cache.")] = None,
    crop_seconds: Annotated[Optional[float], typer.Option("--crop-seconds", help=f"Training crop length. "
                                                          f"Default {_SC.crop_seconds:g}.")] = None,
    crops_per_segment: Annotated[Optional[int], typer.Option("--crops-per-segment", help=f"Crops per segment "
                                 f"and epoch (with --epochs). Default {_SC.crops_per_segment}.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=f"Training crops per batch. "
                                                     f"Default {_SC.batch_size}.")] = None,
    valid_seconds: Annotated[Optional[float], typer.Option("--valid-seconds", help="Audio seconds per rung "
                             "validation (the final stage reads 4x as much, and as much of the test split): larger "
                             "splits are subsampled over speakers so a trial costs the same on any cache. "
                             f"Default {_SC.valid_seconds:g}.")] = None,
    input_seconds: Annotated[Optional[float], typer.Option("--input-seconds", help="Audio duration (s) at which "
                             f"MACs and peak RAM are measured. Default {_SC.input_seconds:g}.")] = None,
    final_k: Annotated[Optional[int], typer.Option("--final-k", help=f"Trials with the best validation CCC at the "
                       f"highest rungs, trained in the final stage. Default {_SC.final_k}.")] = None,
    final_steps: Annotated[Optional[int], typer.Option("--final-steps", help="Optimizer steps of the final stage. "
                           "Default: planned from --time (1000 at 10m).")] = None,
    final_epochs: Annotated[Optional[float], typer.Option("--final-epochs", help="Instead of --final-steps: "
                            "epochs of the cache.")] = None,
    final_seeds: Annotated[Optional[int], typer.Option("--final-seeds", help=f"Seeds per final-stage trial "
                           f"(mean and spread reported). Default {_SC.final_seeds}.")] = None,
    folds: Annotated[Optional[Folds], typer.Option("--folds", help="auto: with few validation speakers, each "
                     "final seed validates on other speakers (folds by speaker; test untouched); none: the "
                     f"cache's split only. Default {_SC.folds}.")] = None,
    references: Annotated[Optional[str], typer.Option("--references", help="Comma-separated reference models "
                          "trained with the same recipe, outside budgets: wav2small-ref, mobilenetv3-s, "
                          "mobilenetv4-s or spec JSON files; '' for none. Default wav2small-ref.")] = None,
    ram_mode: Annotated[Optional[RamMode], typer.Option("--ram-mode", help="offline: ram budgets and objectives "
                        "use the whole-clip int8 activation peak; streaming: the generated C library's state + arena "
                        f"(wav2small; MobileNet keeps its offline peak). Default {_SC.ram_mode}.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Search architectures for the best CCC within budgets (Optuna multi-objective, successive halving), then
    train the best and the references with several seeds."""
    from microser import show
    from microser.search import run_search
    from microser.search_config import SearchConfig

    cfg = SearchConfig.load(
        config, budgets=tuple(budget) if budget else None, cache=cache, space=space, time=time, trials=trials,
        study=study, storage=storage, artifacts=artifacts, workers=workers, threads=threads, seed=seed,
        sampler=_value(sampler), objectives=_csv(objectives), rungs=rungs, eta=eta, epochs=epochs,
        crop_seconds=crop_seconds, crops_per_segment=crops_per_segment, batch_size=batch_size,
        valid_seconds=valid_seconds, input_seconds=input_seconds, final_k=final_k, final_steps=final_steps,
        final_epochs=final_epochs, final_seeds=final_seeds, folds=_value(folds), references=_csv(references),
        ram_mode=_value(ram_mode))
    with show.search_live() as progress:
        summary = run_search(cfg, progress=progress, started=started_at)
    show.search_summary(summary, as_json=json_)


# -- pareto, trials, show: inspect a study --

RungOpt = Annotated[str, typer.Option("--rung", help="The one fidelity the front is built at: a rung's steps "
                                     "(e.g. 600), 'final' (the final stage, mean over seeds), 'first' (every "
                                     "candidate) or 'auto' (the highest level at least 3 feasible trials reached).")]
TrialOpt = Annotated[int, typer.Option("--trial", help="Trial number (see `microser trials`).")]
WideOpt = Annotated[bool, typer.Option("--wide", help="Every column, each line as long as it needs (the default "
                                       "fits 80 columns: mean CCC, params, int8 RAM, the architecture).")]


@app.command()
def pareto(
    study: StudyOpt,
    storage: StorageOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the 3-panel front plot (PNG/PDF/SVG).")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write the same plot as interactive HTML.")] = None,
    rung: RungOpt = "auto",
    wide: WideOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Show the feasible Pareto-optimal trials of a study at one fidelity (references below), with plots."""
    from microser import checks, show
    from microser.pareto import front_report, plot_front, plot_front_html
    from microser.storage import load_study

    for option, path in (("--plot", plot), ("--html", html)):
        if path is not None:
            checks.out_file(option, path)
    report = front_report(load_study(study, storage), level=rung)
    if plot:
        plot_front(report, plot)
    if html:
        plot_front_html(report, html)
    show.pareto_front(report, as_json=json_, files=tuple(str(f) for f in (plot, html) if f), wide=wide)


@app.command("trials")
def trials_cmd(study: StudyOpt, storage: StorageOpt = None, rung: RungOpt = "auto", wide: WideOpt = False,
               json_: JsonOpt = False) -> None:
    """List every trial of a study: state, CCC at every rung it reached, costs, rejected reason, reference."""
    from microser import show
    from microser.pareto import all_rows
    from microser.storage import load_study

    show.trials_table(all_rows(load_study(study, storage), level=rung), as_json=json_, wide=wide)


@app.command("show")
def show_cmd(study: StudyOpt, trial: TrialOpt, storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Show one trial in full: spec, costs, CCC, constraints, weights, final stage, compression."""
    from microser import show
    from microser.pareto import trial_detail
    from microser.storage import load_study

    show.trial_full(trial_detail(load_study(study, storage), trial), as_json=json_)


CacheOpt = Annotated[Optional[str], typer.Option("--cache", help="Cache folder. Default: the study's cache.")]


# -- train: the chosen architecture, to convergence --


@app.command("train")
def train_cmd(
    study: StudyOpt,
    trial: TrialOpt,
    storage: StorageOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help=f"Optimizer steps per seed (batches of 16 x 1 s "
                     f"crops). Default {_DEFAULT_STEPS:,}: about 15 minutes for a 30k-parameter model on 2 cores; "
                     "early stopping may end sooner.")] = None,
    time_: Annotated[Optional[str], typer.Option("--time", help="Train for about this long in all, split over the "
                     "seeds, instead of --steps: e.g. 15m, 1h30m, 90s (a few steps are timed first).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Train K seeds, keep the best on validation, report the "
                     "spread.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="First seed (seeds S .. S+K-1).")] = 0,
    init: Annotated[bool, typer.Option("--init", help="Start from the trial's most trained weights (trained > final "
                    "> search; the compressed weights with --compressed) instead of from scratch.")] = False,
    compressed: Annotated[bool, typer.Option("--compressed", help="Train the pruned architecture `microser "
                          "compress` wrote for this trial.")] = False,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help=f"Steps between validations on the "
                          f"whole validation split (each saves the checkpoint). Default {_EVAL_EVERY}.")] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help=f"After this many validations without a "
                        f"better mean CCC, anneal and stop (--schedule hold) or stop (cosine); 0: never. "
                        f"Default {_PATIENCE}.")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option("--schedule", help=f"hold: the peak learning rate until "
                        "validation plateaus, then a cosine anneal over a quarter of the steps held, then stop; "
                        f"cosine: decay over all --steps (early stopping cuts it at a high rate). Default "
                        f"{_SCHEDULE}.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when torch sees a GPU, else CPU), cpu, cuda "
                      "or cuda:N.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch threads. Default: every core.")] = None,
    cache: CacheOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Train one trial's architecture to convergence: EMA, best checkpoint, early stopping, K seeds.

    The result is the trial's "trained" stage, which compress, export and evaluate then use. Killed, the same
    command continues from its last checkpoint.
    """
    from microser import show
    from microser.durations import parse_duration
    from microser.storage import load_study
    from microser.trainer import train_trial

    seconds = parse_duration(time_, what="--time") if time_ is not None else None
    recipe = {k: v for k, v in {"eval_every": eval_every, "patience": patience,
                                "schedule": schedule.value if schedule else None}.items() if v is not None}
    if recipe.get("patience") == 0:
        recipe["patience"] = None
    with show.train_live() as progress:
        report = train_trial(load_study(study, storage), trial, steps=steps, seconds=seconds, seeds=seeds, seed=seed,
                             init=init, compressed=compressed, device=device, threads=threads, cache=cache,
                             progress=progress, **recipe)
    show.train_result(report, as_json=json_)


# -- compress, export: shrink a trial and hand it to firmware --

def _keep_float(text: str):
    return "auto" if text == "auto" else [] if text in ("", "none") else [t.strip() for t in text.split(",")]


@app.command()
def compress(
    study: StudyOpt,
    trial: TrialOpt,
    storage: StorageOpt = None,
    target_params: Annotated[Optional[int], typer.Option("--target-params", help="Prune body channels until "
                             "params (ONNX initializer elements) <= K.")] = None,
    prune_ratio: Annotated[Optional[float], typer.Option("--prune-ratio", help="Prune this fraction of the channels "
                           "of every body block but the last (0..1).")] = None,
    prune_steps: Annotated[int, typer.Option("--prune-steps", help="Iterative pruning steps, fine-tuned after "
                           "each (--finetune-epochs or --finetune-steps).")] = 3,
    epochs: Annotated[float, typer.Option("--epochs", help="Epochs of fine-tuning the trial's weights before "
                      "pruning, at --lr (0: none).")] = 10.0,
    finetune_epochs: Annotated[float, typer.Option("--finetune-epochs", help="Epochs of each fine-tuning after a "
                               "pruning step, and of quantization-aware training.")] = 2.0,
    finetune_steps: Annotated[Optional[int], typer.Option("--finetune-steps", help="Optimizer steps of each "
                              "fine-tuning after a pruning step and of quantization-aware training (instead of "
                              "--finetune-epochs).")] = None,
    qat: Annotated[Optional[bool], typer.Option("--qat/--no-qat", help="Quantization-aware training: every "
                   "operator after the log-mel int8, head included. Default: when post-training int8 loses more than "
                   "0.01 validation CCC.")] = None,
    keep_float: Annotated[str, typer.Option("--keep-float", help="Body ops kept float beside the front-end and the "
                          "head: 'auto' (measure the first/last conv on the validation split), 'none', or "
                          "comma-separated node-name prefixes / op types.")] = "auto",
    cache: CacheOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Fine-tuning and calibration seed.")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of fine-tuning (lower than training from "
                  "scratch: the weights are trained already).")] = 1e-3,
    json_: JsonOpt = False,
) -> None:
    """Fine-tune, prune (Torch-Pruning) and int8-quantize one trial (post-training, and quantization-aware when
    that loses too much or with --qat); print the before/after table."""
    from microser import show
    from microser.compress import compress_trial
    from microser.storage import load_study

    with show.step_progress() as progress:
        report = compress_trial(load_study(study, storage), trial, target_params=target_params,
                                prune_ratio=prune_ratio, prune_steps=prune_steps, epochs=epochs,
                                finetune_epochs=finetune_epochs,
                                finetune_steps=finetune_steps, qat=qat, cache=cache,
                                keep_float=_keep_float(keep_float), seed=seed, lr=lr, progress=progress)
    show.compress_result(report, as_json=json_)


@app.command()
def export(
    study: StudyOpt,
    trial: TrialOpt,
    out: Annotated[Path, typer.Option("--out", help="Bundle folder.")],
    storage: StorageOpt = None,
    compressed: Annotated[bool, typer.Option("--compressed", help="Export the result of `microser compress` "
                          "instead of the trial's trained weights.")] = False,
    c: Annotated[bool, typer.Option("--c", help="Also generate the dependency-free C library.")] = False,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest allowed mean-CCC drop fp32 -> int8 on "
                         "the validation and test splits; worse parity refuses the export.")] = 0.02,
    keep_float: Annotated[str, typer.Option("--keep-float", help="As for compress (without --compressed).")] = "auto",
    cache: CacheOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Write the firmware bundle: stripped fp32/int8 ONNX, model.h, model card, parity report."""
    from microser import show
    from microser.export import Tolerance, export_trial
    from microser.storage import load_study

    with show.step_progress() as progress:
        report = export_trial(load_study(study, storage), trial, out, compressed=compressed, cache=cache, c=c,
                              tolerance=Tolerance(int8_ccc_drop=tolerance), keep_float=_keep_float(keep_float),
                              progress=progress)
    show.bundle_result(report, as_json=json_)


# -- evaluate, predict: use a model --


@app.command()
def evaluate(
    model: Annotated[Optional[Path], typer.Argument(help="A bundle folder or an .onnx file (or give --study "
                     "and --trial).")] = None,
    study: StudyOpt = None,
    trial: Annotated[Optional[int], typer.Option("--trial", help="Trial number (see `microser trials`), "
                     "with --study.")] = None,
    storage: StorageOpt = None,
    compressed: Annotated[bool, typer.Option("--compressed", help="The trial's compressed model.")] = False,
    cache: Annotated[Optional[str], typer.Option("--cache", help="Cache folder. Default: the study's "
                     "or the bundle's cache (required for a bare .onnx).")] = None,
    split: Annotated[Split, typer.Option("--split", help="The cache split scored.")] = Split.test,
    json_: JsonOpt = False,
) -> None:
    """CCC per dimension of a trial, a compressed trial, a bundle or an ONNX file on a cache split."""
    from microser import show
    from microser.inference import evaluate_target
    from microser.storage import load_study

    loaded = load_study(study, storage) if study else None
    show.evaluation(evaluate_target(study=loaded, trial=trial, compressed=compressed, path=model, cache=cache,
                                    split=split.value), as_json=json_)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A bundle folder or an .onnx file.")],
    audio: Annotated[Path, typer.Argument(help="An audio folder or a CSV with a path column.")],
    out: Annotated[Path, typer.Option("--out", help="Output CSV: path, arousal, dominance, valence, segments.")],
    int8: Annotated[bool, typer.Option("--int8", help="Use the bundle's int8 graph.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Predict arousal, dominance, valence per audio file (any rate/channels; long files: mean over segments)."""
    from microser import show
    from microser.inference import predict_files

    show.predictions(predict_files(model, audio, out, int8=int8), as_json=json_)


started_at: float | None = None   # when main() began the command: `search --time` counts from it (torch's import too)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning MicroserError into a one-line message (exit 2)."""
    global started_at
    started_at = _time.monotonic()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="microser")  # returns typer.Exit's code
        if isinstance(code, int) and code:
            sys.exit(code)
    except MicroserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed work is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort,):
        sys.exit(1)
    except Exception as e:  # usage errors: click's, or those of the click copy inside typer >= 0.29
        import click

        usage = tuple(c for c in (click.exceptions.ClickException, getattr(typer, "TyperException", None)) if c)
        if isinstance(e, usage) and hasattr(e, "show"):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        raise


if __name__ == "__main__":
    main()
