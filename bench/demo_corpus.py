"""Demo corpus benchmark: generation time and a cheap learnability check (ridge on log-mel statistics).

    python bench/demo_corpus.py [--clips 1000] [--speakers 24] [--seed 0]

Prints the generation time on this machine, the CCC ceiling the teacher noise
leaves, and the CCC per dimension of a ridge regression on utterance-level
log-mel statistics (mean and std per band, waveform level-normalised as a
student would see it), cross-validated with held-out speakers (4 folds).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchaudio

from microser import SAMPLE_RATE, TARGETS
from microser.demo import generate_corpus
from microser.metrics import ccc


def logmel_stats(x: np.ndarray, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """Mean and std over time of the log-mel bands of one level-normalised clip."""
    x = torch.from_numpy(x / (np.sqrt(np.mean(x**2)) + 1e-8)).float()
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE)
    mel = torch.log(spec.T @ fb + 1e-6)  # (T, n_mels)
    d = mel[1:] - mel[:-1]
    return torch.cat([mel.mean(0), mel.std(0), d.std(0)]).numpy()


def ridge_cv(features: np.ndarray, y: np.ndarray, groups: np.ndarray, alpha: float = 1.0, folds: int = 4) -> np.ndarray:
    """Held-out-speaker predictions of a ridge regression (features standardised on the training part)."""
    speakers = np.unique(groups)
    pred = np.empty_like(y)
    for f in range(folds):
        test = np.isin(groups, speakers[f::folds])
        mu, sd = features[~test].mean(0), features[~test].std(0) + 1e-8
        xtr = (features[~test] - mu) / sd
        xte = (features[test] - mu) / sd
        ym = y[~test].mean(0)
        w = np.linalg.solve(xtr.T @ xtr + alpha * len(xtr) * np.eye(xtr.shape[1]), xtr.T @ (y[~test] - ym))
        pred[test] = xte @ w + ym
    return pred


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--speakers", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    corpus = generate_corpus(n_clips=args.clips, n_speakers=args.speakers, seed=args.seed)
    gen_s = time.perf_counter() - t0
    audio_s = corpus.durations.sum()
    print(f"generated {args.clips} clips, {args.speakers} speakers, {audio_s / 60:.1f} min of audio "
          f"in {gen_s:.1f} s on one core ({audio_s / gen_s:.0f}x real time)")
    print("teacher ceiling CCC:", {k: round(v, 3) for k, v in corpus.ceiling.items()})
    corr = np.corrcoef(corpus.latents.T)
    print(f"latent correlation: A-D {corr[0, 1]:.2f}  A-V {corr[0, 2]:.2f}  D-V {corr[1, 2]:.2f}")

    groups = np.array(corpus.speakers)
    for n_fft, hop, n_mels in ((64, 32, 26), (512, 160, 40)):
        feats = np.stack([logmel_stats(a, n_fft, hop, n_mels) for a in corpus.audio])
        for alpha in (0.01, 0.1, 1.0):
            pred = ridge_cv(feats, corpus.targets, groups, alpha)
            c = ccc(pred, corpus.targets)
            print(f"ridge on log-mel stats (STFT {n_fft}/{hop}, {n_mels} mels, alpha {alpha}), held-out speakers: "
                  + "  ".join(f"{k} {v:.3f}" for k, v in zip(TARGETS, c)) + f"  mean {c.mean():.3f}")


if __name__ == "__main__":
    main()
