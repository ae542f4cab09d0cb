"""The MobileNet family: MobileNetV3-small and MobileNetV4-conv-small on the 1-channel log-mel image.

Layouts follow timm/torchvision at width 1.0 (tables `V3_SMALL`, `V4_SMALL` below);
the only changes are the input (1 channel: the front-end's (B, 1, frames, n_mels)
image) and the head. Each channel count ``c`` of the tables becomes
``make_divisible(c * width, round_to)`` (timm's rule: round to the nearest
multiple, never below ``round_to`` nor below 90 % of ``c * width``).

``body``: stem Conv3x3/2 + BN + act, the blocks, and the final 1x1 conv
(576 channels for V3, 960 for V4, times width) + BN + act.

``head``: global average over time and frequency, then, if ``head_hidden > 0``,
Linear(C -> head_hidden) + act (timm's ``conv_head`` on the pooled vector: 1024
for V3, 1280 for V4; bias instead of V4's BatchNorm), then Linear(-> 3). The
reference specs keep timm's hidden sizes so their size is comparable with the
literature; micro searches use ``head_hidden = 0`` (a 1280-wide hidden layer alone
costs over a million weights).

Blocks: V3 inverted residual (1x1 expand unless the expansion equals the input,
kxk depthwise, optional squeeze-excite with ReLU and hard-sigmoid gate on
``make_divisible(expanded / 4, round_to)`` channels, 1x1 project; ReLU or
hard-swish); V4 conv-BN-ReLU and Universal Inverted Bottleneck blocks (optional
kxk depthwise at the start (no activation), 1x1 expand, optional kxk depthwise in
the middle, 1x1 project: ExtraDW, IR and ConvNeXt-like variants). A block adds
its input when its stride is 1 and its input and output channels are equal.
Every stride-2 layer maps a length n to ceil(n / 2) (padding k//2), so any
input of at least one frame works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from microser.frontends import FrontendSpec, Rule, check_fields, spec_from_dict, spec_to_dict

# MobileNetV3-small (timm mobilenetv3_small_100 / torchvision mobilenet_v3_small):
# (kernel, expanded channels, out channels, squeeze-excite, activation, stride)
V3_STEM, V3_LAST, V3_HEAD = 16, 576, 1024
V3_SMALL = (
    (3, 16, 16, True, "relu", 2),
    (3, 72, 24, False, "relu", 2),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hswish", 2),
    (5, 240, 40, True, "hswish", 1),
    (5, 240, 40, True, "hswish", 1),
    (5, 120, 48, True, "hswish", 1),
    (5, 144, 48, True, "hswish", 1),
    (5, 288, 96, True, "hswish", 2),
    (5, 576, 96, True, "hswish", 1),
    (5, 576, 96, True, "hswish", 1),
)

# MobileNetV4-conv-small (timm mobilenetv4_conv_small), all ReLU:
# ("cn", kernel, stride, out) conv-BN-ReLU; ("uib", start dw kernel, mid dw kernel, stride, expansion, out)
V4_STEM, V4_LAST, V4_HEAD = 32, 960, 1280
V4_SMALL = (
    ("cn", 3, 2, 32), ("cn", 1, 1, 32),
    ("cn", 3, 2, 96), ("cn", 1, 1, 64),
    ("uib", 5, 5, 2, 3.0, 96),  # ExtraDW
    *(("uib", 0, 3, 1, 2.0, 96),) * 4,  # IR
    ("uib", 3, 0, 1, 4.0, 96),  # ConvNeXt-like
    ("uib", 3, 3, 2, 6.0, 128),
    ("uib", 5, 5, 1, 4.0, 128),
    ("uib", 0, 5, 1, 4.0, 128),
    ("uib", 0, 5, 1, 3.0, 128),
    *(("uib", 0, 3, 1, 4.0, 128),) * 2,
)


@dataclass(frozen=True)
class MobileNetBody:
    """Body and head fields of a MobileNet-family spec (see the module docstring)."""

    version: str = "v4"  # "v3": MobileNetV3-small, "v4": MobileNetV4-conv-small
    width: float = 1.0  # channel multiplier
    round_to: int = 8  # channels are multiples of this
    head_hidden: int = 0  # 0: pooled features go straight to Linear(-> 3)

    RULES: ClassVar[dict[str, Rule]] = {
        "version": Rule(str, choices=("v3", "v4")),
        "width": Rule(float, low=0.05, high=2.0),
        "round_to": Rule(int, choices=(4, 8)),
        "head_hidden": Rule(int, low=0, high=4096),
    }

    def __post_init__(self):
        check_fields(self, "body.")

    def summary(self) -> str:
        """e.g. ``mnv4 w0.5 r8 h0``."""
        return f"mn{self.version} w{self.width:g} r{self.round_to} h{self.head_hidden}"

    def to_dict(self) -> dict:
        return spec_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MobileNetBody":
        return spec_from_dict(cls, data, "body.")


def make_divisible(v: float, divisor: int) -> int:
    """timm's channel rounding: nearest multiple of ``divisor``, >= divisor and >= 0.9 * v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "hswish": nn.Hardswish(), "none": nn.Identity()}[name]


class ConvBNAct(nn.Module):
    """Conv2d (no bias, padding k//2) -> BatchNorm2d -> activation."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: str = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(W2 relu(W1 mean_{T,F}(x))), W1: C -> squeeze, W2: squeeze -> C (1x1 convs with bias)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project (+ input when shapes allow)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, kernel: int, stride: int, se: bool, act: str, round_to: int):
        super().__init__()
        self.expand = ConvBNAct(c_in, c_mid, 1, act=act) if c_mid != c_in else nn.Identity()
        self.dw = ConvBNAct(c_mid, c_mid, kernel, stride, groups=c_mid, act=act)
        self.se = SqueezeExcite(c_mid, make_divisible(c_mid / 4, round_to)) if se else nn.Identity()
        self.project = ConvBNAct(c_mid, c_out, 1, act="none")
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class UniversalInvertedBottleneck(nn.Module):
    """MobileNetV4 UIB: [kxk dw start] -> 1x1 expand -> [kxk dw mid] -> 1x1 project (+ input when shapes allow)."""

    def __init__(self, c_in: int, c_out: int, start: int, mid: int, stride: int, expansion: float, round_to: int):
        super().__init__()
        c_mid = make_divisible(c_in * expansion, round_to)
        start_stride = 1 if mid else stride  # the stride sits in the middle depthwise when there is one
        self.dw_start = ConvBNAct(c_in, c_in, start, start_stride, groups=c_in, act="none") if start else nn.Identity()
        self.expand = ConvBNAct(c_in, c_mid, 1)
        self.dw_mid = ConvBNAct(c_mid, c_mid, mid, stride, groups=c_mid) if mid else nn.Identity()
        self.project = ConvBNAct(c_mid, c_out, 1, act="none")
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw_mid(self.expand(self.dw_start(x))))
        return x + y if self.residual else y


class Head(nn.Module):
    """Global average over (time, frequency) -> [Linear + act] -> Linear(-> 3). Stays float in int8 deployment."""

    def __init__(self, channels: int, hidden: int, act: str):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(channels, hidden), _act(act)) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x.mean((2, 3))))  # (B, C, T, F) -> (B, C) -> (B, 3)


def build(body: MobileNetBody, frontend: FrontendSpec) -> tuple[nn.Module, nn.Module]:
    """The ``body`` (stem, blocks, last 1x1 conv) and ``head`` modules for a MobileNet spec."""
    del frontend  # global pooling: the body does not depend on the image size

    def ch(c: float) -> int:
        return make_divisible(c * body.width, body.round_to)

    if body.version == "v3":
        act = "hswish"
        layers: list[nn.Module] = [ConvBNAct(1, ch(V3_STEM), 3, 2, act=act)]
        c_in = ch(V3_STEM)
        for kernel, expanded, out, se, block_act, stride in V3_SMALL:
            layers.append(InvertedResidual(c_in, ch(expanded), ch(out), kernel, stride, se, block_act, body.round_to))
            c_in = ch(out)
        last, head_act = ch(V3_LAST), "hswish"
    else:
        act = "relu"
        layers = [ConvBNAct(1, ch(V4_STEM), 3, 2, act=act)]
        c_in = ch(V4_STEM)
        for row in V4_SMALL:
            if row[0] == "cn":
                _, kernel, stride, out = row
                layers.append(ConvBNAct(c_in, ch(out), kernel, stride, act=act))
            else:
                _, start, mid, stride, expansion, out = row
                layers.append(UniversalInvertedBottleneck(c_in, ch(out), start, mid, stride, expansion, body.round_to))
            c_in = ch(out)
        last, head_act = ch(V4_LAST), "relu"
    layers.append(ConvBNAct(c_in, last, 1, act=act))
    return nn.Sequential(*layers), Head(last, body.head_hidden, head_act)
