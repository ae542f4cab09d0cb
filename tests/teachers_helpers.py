"""Test helpers for teachers and caches: tiny audio files, a tiny random wav2vec2 teacher, a tiny ONNX teacher.

Each teacher comes with an independent reference implementation (plain
transformers / numpy), so tests compare microser against it, not against itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def write_clip(path: Path, seconds: float, *, seed: int, sr: int = 16000, channels: int = 1) -> Path:
    """A voiced-ish test clip: a harmonic tone with a syllable envelope plus noise, deterministic by seed."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = 100 + 100 * rng.random()
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) * 0.2 + 0.01 * rng.standard_normal(n)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), sr, subtype="PCM_16")
    return path


def tiny_hf_model(folder: Path, *, feat_extract_norm: str = "layer", seed: int = 0) -> Path:
    """Save a randomly initialised audeering-layout dimensional model (hidden 32, 2 layers) to ``folder``."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    from microser.teachers import _emotion_model_class

    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm=feat_extract_norm, do_stable_layer_norm=feat_extract_norm == "layer",
        num_labels=3, final_dropout=0.1, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
        mask_time_prob=0.0, vocab_size=8,
    )
    torch.manual_seed(seed)
    model = _emotion_model_class()(config)
    with torch.no_grad():  # make the head's outputs vary visibly across clips
        model.classifier.out_proj.weight.mul_(20.0)
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder


def hf_reference(folder: Path, clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Direct forward pass, one clip at a time: feature extractor -> Wav2Vec2Model -> mean -> dense/tanh/out_proj."""
    from safetensors.torch import load_file
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    fe = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    encoder = Wav2Vec2Model.from_pretrained(folder).eval()
    sd = load_file(str(folder / "model.safetensors"))
    targets, pooled = [], []
    with torch.no_grad():
        for x in clips:
            inp = fe(x, sampling_rate=16000, return_tensors="pt").input_values  # (1, T)
            h = encoder(inp).last_hidden_state.mean(dim=1)  # (1, H)
            z = torch.tanh(h @ sd["classifier.dense.weight"].T + sd["classifier.dense.bias"])
            targets.append((z @ sd["classifier.out_proj.weight"].T + sd["classifier.out_proj.bias"])[0].numpy())
            pooled.append(h[0].numpy())
    return np.stack(targets), np.stack(pooled)


class _TinyOnnx(torch.nn.Module):
    """(B, T) waveform -> logits (B, 3) = sigmoid(features @ W + b), hidden_states (B, 4) = features."""

    W = torch.tensor([[2.0, -1.0, 0.5], [10.0, 3.0, -4.0], [-1.0, 2.0, 1.0], [5.0, -6.0, 2.0]])
    b = torch.tensor([0.1, -0.2, 0.3])

    def __init__(self, three_outputs: bool):
        super().__init__()
        self.three = three_outputs

    def forward(self, x):
        feats = torch.stack([x.mean(1), (x * x).mean(1).sqrt(), x.abs().amax(1), x.abs().mean(1)], dim=1)
        logits = torch.sigmoid(feats @ self.W + self.b)
        if self.three:  # valence, arousal, dominance as separate outputs, deliberately out of order
            return logits[:, 2:3], logits[:, 0:1], logits[:, 1:2]
        return logits, feats


def onnx_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy version of `_TinyOnnx` for one clip: (3,), (4,)."""
    x = x.astype(np.float64)
    feats = np.array([x.mean(), np.sqrt((x * x).mean()), np.abs(x).max(), np.abs(x).mean()])
    logits = 1 / (1 + np.exp(-(feats @ _TinyOnnx.W.double().numpy() + _TinyOnnx.b.double().numpy())))
    return logits, feats


def tiny_onnx(path: Path, *, three_outputs: bool = False) -> Path:
    """Export `_TinyOnnx` with dynamic batch and time axes."""
    names = ["valence", "arousal", "dominance"] if three_outputs else ["logits", "hidden_states"]
    torch.onnx.export(_TinyOnnx(three_outputs), (torch.zeros(1, 16000),), str(path), input_names=["signal"],
                      output_names=names, dynamic_axes={"signal": {0: "batch", 1: "time"}},
                      opset_version=17, dynamo=False)
    return path
