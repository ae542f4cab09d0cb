"""The Wav2Small family: a plain Conv2d stack on the log-mel image, attention/Gram pooling, a linear head.

The graph, block by block (written so that a C99 streaming generator can follow it):

``frontend``: (B, T) audio -> (B, 1, T0, F0) features (`microser.frontends`).

``body``: an `nn.Sequential` of `ConvBlock` i = 0 .. depth-1, each

    conv  Conv2d(c_{i-1} -> c_i, kernel k x k, stride s_i, padding k//2, bias only when norm="none")
          (c_{-1} = 1; s_0 = stem_stride, s_i = 1 otherwise)
    norm  "batch": BatchNorm2d(c_i)                      (folds into the conv at export)
          "layer": LayerNorm over (channel, frequency) of each time frame: `FrameLayerNorm`
          "none":  nn.Identity
    act   ReLU
    pool  MaxPool2d(3, stride 2, padding 1) if i is in pool_after, else nn.Identity

A stride-2 conv or a pool maps a length n (time or frequency) to ceil(n / 2);
stride-1 convs keep the length ("same" padding, zeros).

``head``: `AttentionPool` ("attention", "attention+gram") or `MeanStdPool`
("meanstd") turning (B, C, T, F) into a fixed vector, then ``fc`` = Linear(-> 3):

- attention: ``v = Conv1x1(C->C)(x)``, ``a = softmax_T(Conv1x1(C->C)(x))`` (softmax over
  time, separately for every channel and frequency), ``sum_T(v * a)`` -> (B, C*F), one
  ``einsum("bctf,bctf->bcf")`` (a dot product over time: one int32 accumulation in int8);
  quantized, the softmax is split (`softmax_pool`) so that its rounded part does not
  depend on the clip's length;
- Gram: ``einsum("bctf,bdtf->bcd", x, x) / (T*F)`` -> (B, C*C) (``g @ g^T / (T*F)`` with
  ``g = x.reshape(B, C, T*F)``);
- meanstd: mean ``mu`` and ``sqrt(var + MEANSTD_EPS)`` (population variance, ``einsum`` of
  ``x - mu`` with itself over time, / T) over time -> (B, 2*C*F).

Quantization points (``q_*``, ``nn.Identity`` here; quantization-aware training,
``microser.qat``, puts fake int8 quantizers there, and the int8 graph has a
QuantizeLinear/DequantizeLinear pair at each): every block's output after the
ReLU (and again after its max-pool, same scale), the conv output before a
LayerNorm, every head value (``v``, scores, the softmax's exponentials, attention, Gram,
mean, deviation, variance, std) and the output. The pooled features are a
concatenation of int8 parts with their own scales (no requantization).

The paper's student (``wav2small-ref``): 7 blocks of 13 channels, 3x3,
BatchNorm, pool after block 2, attention+Gram on F = ceil(26 / 2) = 13 bands:
13*13 + 13*13 = 338 features, 10,806 trainable parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from microser.frontends import FrontendSpec, Rule, check_fields, spec_from_dict, spec_to_dict
from microser.errors import MicroserError

MEANSTD_EPS = 1e-5
NORM_ABBREV = {"batch": "bn", "layer": "ln", "none": "nonorm"}
POOLING_ABBREV = {"attention+gram": "att+gram", "attention": "att", "meanstd": "meanstd"}


@dataclass(frozen=True)
class Wav2SmallBody:
    """Body and head fields of a Wav2Small-family spec (see the module docstring)."""

    channels: tuple[int, ...] = (13,) * 7  # one entry per conv block; depth = len(channels)
    kernel: int = 3
    norm: str = "batch"
    pool_after: tuple[int, ...] = (2,)  # block indices (0-based) followed by a 3x3/2 max-pool
    stem_stride: int = 1  # 2: the first conv halves time and frequency (early RAM reduction)
    pooling: str = "attention+gram"

    RULES: ClassVar[dict[str, Rule]] = {
        "channels": Rule(int, low=1, high=512, per_item=True, min_items=1),
        "kernel": Rule(int, choices=(3, 5)),
        "norm": Rule(str, choices=tuple(NORM_ABBREV)),
        "pool_after": Rule(int, low=0, high=31, per_item=True),
        "stem_stride": Rule(int, choices=(1, 2)),
        "pooling": Rule(str, choices=tuple(POOLING_ABBREV)),
    }

    def __post_init__(self):
        check_fields(self, "body.")
        if len(self.channels) > 32:
            raise MicroserError(f"spec key 'body.channels': {len(self.channels)} blocks, expected at most 32")
        pools = list(self.pool_after)
        if pools != sorted(set(pools)) or any(i >= len(self.channels) for i in pools):
            raise MicroserError(f"spec key 'body.pool_after': {pools} must be increasing block indices below "
                                f"the depth {len(self.channels)}")

    @property
    def depth(self) -> int:
        return len(self.channels)

    def summary(self) -> str:
        """e.g. ``w2s 13x7 k3 bn pool@2 att+gram``."""
        c = self.channels
        chans = f"{c[0]}x{len(c)}" if len(set(c)) == 1 else "[" + ",".join(map(str, c)) + "]"
        stem = " s2" if self.stem_stride == 2 else ""
        pools = "pool@" + ",".join(map(str, self.pool_after)) if self.pool_after else "nopool"
        return f"w2s {chans} k{self.kernel}{stem} {NORM_ABBREV[self.norm]} {pools} {POOLING_ABBREV[self.pooling]}"

    def to_dict(self) -> dict:
        return spec_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Wav2SmallBody":
        return spec_from_dict(cls, data, "body.")


def halve(n: int) -> int:
    """Length after a stride-2 conv (padding k//2) or a 3x3/2 max-pool with padding 1."""
    return math.ceil(n / 2)


def band_counts(body: Wav2SmallBody, n_mels: int) -> list[int]:
    """Frequency bands after each block's conv (what its LayerNorm sees), then those the head sees.

    Returns ``depth + 1`` numbers.
    """
    out, f = [], n_mels
    for i in range(body.depth):
        if i == 0 and body.stem_stride == 2:
            f = halve(f)
        out.append(f)
        if i in body.pool_after:
            f = halve(f)
    return out + [f]


class FrameLayerNorm(nn.Module):
    """LayerNorm over (channels, frequency) of each time frame: (B, C, T, F) -> same shape."""

    def __init__(self, channels: int, bands: int):
        super().__init__()
        self.norm = nn.LayerNorm((channels, bands))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)  # via (B, T, C, F)


class ConvBlock(nn.Module):
    """conv -> norm -> ReLU -> optional 3x3/2 max-pool, on (B, C, T, F); ``q_conv``, ``q`` quantization points."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int, stride: int, norm: str, bands: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none")
        if norm == "batch":
            self.norm = nn.BatchNorm2d(c_out)
        elif norm == "layer":
            self.norm = FrameLayerNorm(c_out, bands)
        else:
            self.norm = nn.Identity()
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if pool else nn.Identity()
        self.q_conv = nn.Identity()  # conv output, where a LayerNorm reads it (BatchNorm folds into the conv)
        self.q = nn.Identity()  # block output after the ReLU; applied again after the pool (max keeps the grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q(self.act(self.norm(self.q_conv(self.conv(x)))))
        return y if isinstance(self.pool, nn.Identity) else self.q(self.pool(y))


def softmax_pool(v: torch.Tensor, scores: torch.Tensor, q: nn.Module) -> torch.Tensor:
    """``sum_T(v * softmax_T(scores))`` as ``sum_T(v * e) / sum_T(e)`` with ``e = q(exp(scores - max_T scores))``.

    Equal to the softmax pooling in exact arithmetic. The quantization point
    ``q`` sits on ``e``, which lies in ``(0, 1]`` with the largest frame of every
    (channel, band) exactly 1, whatever the clip's length: int8 keeps 1/255
    steps of the peak. Quantizing the softmax weights themselves would round
    values near ``1 / T`` (a few int8 steps on a several-second clip, on a scale
    calibrated on short crops), and measured: on espeak-emo the int8 graph of
    wav2small-ref lost 0.07 test CCC to that one point. In integer arithmetic
    every step is exact or a table: the max and the difference are int8 code
    arithmetic, ``exp`` of a code difference in [-255, 0] is a 256-entry table,
    both sums over time are int32 accumulations, and the division of the two
    accumulators is requantized like any other output (``quantize.classify_nodes``).
    """
    e = q(torch.exp(scores - scores.amax(2, keepdim=True)))
    return torch.einsum("bctf,bctf->bcf", v, e) / e.sum(2)


class AttentionPool(nn.Module):
    """Attention over time (+ optional Gram features): (B, C, T, F) -> (B, C*F [+ C*C])."""

    def __init__(self, channels: int, gram: bool):
        super().__init__()
        self.values = nn.Conv2d(channels, channels, 1)
        self.scores = nn.Conv2d(channels, channels, 1)
        self.gram = gram
        self.q_values, self.q_scores, self.q_weights = nn.Identity(), nn.Identity(), nn.Identity()
        self.q_att, self.q_gram = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.q_values(self.values(x))  # (B, C, T, F)
        scores = self.q_scores(self.scores(x))
        if isinstance(self.q_weights, nn.Identity):   # float: one softmax over time, weights sum to 1 over T
            att = torch.einsum("bctf,bctf->bcf", v, torch.softmax(scores, dim=2))
        else:   # quantized: the softmax split so that its rounded part does not depend on the clip's length
            att = softmax_pool(v, scores, self.q_weights)
        att = self.q_att(att).flatten(1)  # (B, C*F)
        if not self.gram:
            return att
        count = x.size(2) * x.size(3)  # T*F
        gram = self.q_gram(torch.einsum("bctf,bdtf->bcd", x, x) / count)  # (B, C, C)
        return torch.cat([att, gram.flatten(1)], 1)


class MeanStdPool(nn.Module):
    """Mean and std over time: (B, C, T, F) -> (B, 2*C*F)."""

    def __init__(self):
        super().__init__()
        self.q_mean, self.q_dev, self.q_var, self.q_std = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.q_mean(x.mean(2))  # (B, C, F)
        d = self.q_dev(x - mu.unsqueeze(2))  # (B, C, T, F)
        var = self.q_var(torch.einsum("bctf,bctf->bcf", d, d) / x.size(2) + MEANSTD_EPS)
        sd = self.q_std(var.sqrt())
        return torch.cat([mu.flatten(1), sd.flatten(1)], 1)


class Head(nn.Module):
    """Pooling then Linear(features -> 3). Float in post-training int8; int8 after quantization-aware training."""

    def __init__(self, pool: nn.Module, features: int):
        super().__init__()
        self.pool = pool
        self.fc = nn.Linear(features, 3)
        self.q_out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no quantization point on the concatenated features: each part keeps its own scale (attention values and
        # the Gram product differ in range by an order of magnitude), the Linear reads both
        return self.q_out(self.fc(self.pool(x)))


def head_features(body: Wav2SmallBody, n_mels: int) -> int:
    """Length of the pooled vector fed to the Linear head."""
    c, f = body.channels[-1], band_counts(body, n_mels)[-1]
    return {"attention+gram": c * f + c * c, "attention": c * f, "meanstd": 2 * c * f}[body.pooling]


def build(body: Wav2SmallBody, frontend: FrontendSpec) -> tuple[nn.Module, nn.Module]:
    """The ``body`` (conv stack) and ``head`` (pooling + Linear) modules for a Wav2Small spec."""
    bands = band_counts(body, frontend.n_mels)
    blocks, c_in = [], 1
    for i, c in enumerate(body.channels):
        blocks.append(ConvBlock(c_in, c, kernel=body.kernel, stride=body.stem_stride if i == 0 else 1,
                                norm=body.norm, bands=bands[i], pool=i in body.pool_after))
        c_in = c
    pool = MeanStdPool() if body.pooling == "meanstd" else AttentionPool(c_in, gram=body.pooling == "attention+gram")
    return nn.Sequential(*blocks), Head(pool, head_features(body, frontend.n_mels))
