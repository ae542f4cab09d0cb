"""Benchmark: real-time factor of `microser cache build` for the csv teacher and a tiny random wav2vec2 teacher.

    python bench/cache_build.py [--hf-clips 128] [--large] [--threads N]

Data: the espeak-emo corpus (../shared/data/espeak-emo) when present, else 64
generated clips. ``--large`` adds a randomly initialised wav2vec2 of the
audeering teacher's size (hidden 1024, 12 transformer layers, 16 heads, as
in wav2vec2-large-robust-12-ft-emotion-msp-dim): the compute of the real teacher,
without downloading it. RTF = wall seconds per audio second (lower is faster),
end to end: listing, decoding, hashing, teacher, writing, finalising.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny teachers live with the tests: one definition

import torch  # noqa: E402

from microser.cache_build import build_cache

ESPEAK = Path(os.environ.get("MICROSER_ESPEAK_DIR", REPO.parent / "shared" / "data" / "espeak-emo"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}{gpu}"


def corpus(tmp: Path) -> tuple[Path, str]:
    """labels.csv of the benchmark data and its description."""
    if (ESPEAK / "labels.csv").is_file():
        return ESPEAK / "labels.csv", f"espeak-emo ({ESPEAK})"
    from teachers_helpers import write_clip

    rows = ["path,speaker,arousal,dominance,valence"]
    for k in range(64):
        write_clip(tmp / "gen" / f"c{k:02d}.wav", 2.0 + (k % 5) * 0.5, seed=k)
        rows.append(f"c{k:02d}.wav,s{k % 8},0.5,0.5,0.5")
    (tmp / "gen" / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp / "gen" / "labels.csv", "64 generated clips (2-4 s, 16 kHz)"


def subset(labels: Path, n: int, tmp: Path, name: str) -> Path:
    """A CSV with the first ``n`` rows of ``labels`` (absolute paths) for the slower teachers."""
    lines = labels.read_text().splitlines()
    head, rows = lines[0].split(","), lines[1 : n + 1]
    p = head.index("path")
    out = tmp / f"{name}.csv"
    fixed = []
    for r in rows:
        cells = r.split(",")
        cells[p] = str((labels.parent / cells[p]).resolve())
        fixed.append(",".join(cells))
    out.write_text("\n".join([lines[0], *fixed]) + "\n")
    return out


def large_model(folder: Path) -> Path:
    """A random model with the audeering teacher's shape (wav2vec2-large-robust, 12 layers kept)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    from microser.teachers import _emotion_model_class

    cfg = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=4096,
                         feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, num_labels=3)
    _emotion_model_class()(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


def run(label: str, audio: Path, teacher: str, out: Path, batch_size: int) -> dict:
    """One cold build; ``load_s`` (making the teacher: reading weights, hashing them) is timed separately."""
    from microser.teachers import make_teacher

    t0 = time.perf_counter()
    make_teacher(teacher, audio=audio)
    load = time.perf_counter() - t0
    r = build_cache(audio, [teacher], out, teacher_batch_size=batch_size, allow_absolute_paths=True)
    return {"teacher": label, "clips": r.n_sources, "items": r.n_items, "audio_s": r.run_audio_seconds,
            "wall_s": r.elapsed_seconds, "load_s": load, "rtf": r.rtf,
            "rtf_run": max(r.elapsed_seconds - load, 0.0) / r.run_audio_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-clips", type=int, default=128, help="clips for the tiny hf teacher")
    ap.add_argument("--large", action="store_true", help="also time a random teacher-sized wav2vec2")
    ap.add_argument("--large-clips", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from teachers_helpers import tiny_hf_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels, data = corpus(tmp)
        rows.append(run("csv", labels, f"csv:{labels}", tmp / "c_csv", 8))
        hf = tiny_hf_model(tmp / "tiny_hf")
        rows.append(run("hf tiny (hidden 32, 2 layers)", subset(labels, args.hf_clips, tmp, "hf"), f"hf:{hf}",
                        tmp / "c_hf", 8))
        if args.large:
            big = large_model(tmp / "large_hf")
            rows.append(run("hf large-12 random (teacher-sized)", subset(labels, args.large_clips, tmp, "large"),
                            f"hf:{big}", tmp / "c_large", 4))
    print(f"machine: {machine()}")
    print(f"data: {data}")
    print("RTF: wall / audio seconds of the whole build; RTF w/o load: minus the teacher's load time")
    print(f"{'teacher':36} {'clips':>6} {'items':>6} {'audio s':>9} {'wall s':>8} {'load s':>7} {'RTF':>8} "
          f"{'RTF w/o load':>13} {'x realtime':>11}")
    for r in rows:
        print(f"{r['teacher']:36} {r['clips']:>6} {r['items']:>6} {r['audio_s']:>9.1f} {r['wall_s']:>8.2f} "
              f"{r['load_s']:>7.2f} {r['rtf']:>8.4f} {r['rtf_run']:>13.4f} {1 / r['rtf_run']:>11.1f}")


if __name__ == "__main__":
    main()
