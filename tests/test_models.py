"""Student families: the one contract every model meets (shapes, names, JSON, ONNX parity), and hand counts."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from microser.errors import MicroserError
from microser.frontends import FrontendSpec
from microser.models import REFERENCES, ArchSpec, MobileNetBody, Wav2SmallBody, build_model, resolve_spec
from microser.models.mobilenet import make_divisible
from microser.models.wav2small import band_counts
from microser.space import SearchSpace

RANDOM_SPECS = SearchSpace.load("default").sample(20, seed=11)
ALL_SPECS = list(REFERENCES.values()) + RANDOM_SPECS
IDS = list(REFERENCES) + [f"random{i}" for i in range(len(RANDOM_SPECS))]


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def calibrated(spec: ArchSpec, x: torch.Tensor) -> torch.nn.Module:
    """A model in eval mode whose BatchNorm statistics come from ``x``, so activations do not vanish."""
    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass sets the statistics of x
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def audio(batch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gain = torch.tensor([0.02, 0.3, 1.0, 0.1][:batch]).unsqueeze(1)
    return (gain * torch.randn(batch, n, generator=g)).cumsum(1).remainder(2.0).sub(1.0)  # varied, non-white


def test_wav2small_ref_has_the_papers_10806_trainable_parameters():
    convs = 1 * 13 * 9 + 6 * 13 * 13 * 9  # 3x3 convs, no bias before BatchNorm: 9243
    batchnorm = 7 * 2 * 13  # weight and bias: 182
    attention = 2 * (13 * 13 + 13)  # values and scores 1x1 convs with bias: 364
    head = 338 * 3 + 3  # 1017
    assert convs + batchnorm + attention + head == 10806
    model = build_model("wav2small-ref")
    assert trainable(model) == 10806
    assert model.head.fc.in_features == 13 * 13 + 13 * 13  # attention on 13 bands (ceil(26 / 2)) + Gram
    assert band_counts(REFERENCES["wav2small-ref"].body, 26) == [26, 26, 26, 13, 13, 13, 13, 13]


def test_mobilenet_channel_rounding_by_hand():
    assert make_divisible(16 * 0.25, 8) == 8  # never below the divisor
    assert make_divisible(96 * 0.5, 8) == 48
    assert make_divisible(88 * 0.35, 8) == 32  # 30.8 -> 32
    assert make_divisible(88 * 0.35, 4) == 32  # 30.8 -> 32 (nearest multiple of 4 is 32 too)
    assert make_divisible(24 * 0.35, 4) == 8  # 8.4 -> 8
    assert make_divisible(40 * 0.35, 8) == 16  # 14 -> 16
    assert make_divisible(40 * 0.35, 4) == 16  # 14 -> int(14 + 2) // 4 * 4 = 16
    assert make_divisible(36 * 0.3, 8) == 16  # 10.8 -> 8 is below 0.9 * 10.8, so 16


def test_mobilenet_layouts_match_timm_tables():
    v4 = build_model("mobilenetv4-s")
    convs = [m for m in v4.body.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].in_channels == 1 and convs[0].out_channels == 32 and convs[0].stride == (2, 2)
    assert convs[-1].out_channels == 960 and v4.head.hidden[0].out_features == 1280
    assert sum(c.stride == (2, 2) for c in convs) == 5  # 32x downsampling, as in timm
    assert sum(c.groups > 1 for c in convs) == 15  # depthwise convs (start and/or mid) of the 12 UIB blocks
    v3 = build_model("mobilenetv3-s")
    convs = [m for m in v3.body.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert [c.out_channels for c in convs] == [16, 16, 72, 88, 96, 240, 240, 120, 144, 288, 576, 576]
    assert v3.head.hidden[0].in_features == 576 and v3.head.hidden[0].out_features == 1024
    # torchvision's mobilenet_v3_small has 2,542,856 parameters: minus its 1000-class layer (1,025,000),
    # minus 2 input channels of the 3x3 stem (2 * 16 * 9), plus our 3-output layer (1024 * 3 + 3)
    assert trainable(v3) - trainable(v3.frontend) == 2_542_856 - 1_025_000 - 2 * 16 * 9 + 1024 * 3 + 3


@pytest.mark.parametrize("spec", ALL_SPECS, ids=IDS)
def test_forward_shape_on_1s_and_0_3s(spec):
    model = build_model(spec).eval()
    assert [name for name, _ in model.named_children()] == ["frontend", "body", "head"]
    with torch.no_grad():
        for n in (16000, 4800):
            y = model(audio(2, n, seed=n))
            assert y.shape == (2, 3) and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_minimum_input_length_with_heavy_downsampling():
    spec = ArchSpec("wav2small", FrontendSpec(n_fft=512, hop=320, n_mels=20),
                    Wav2SmallBody(channels=(8,) * 6, stem_stride=2, pool_after=(0, 1, 2, 3, 4, 5)))
    with torch.no_grad():
        assert build_model(spec).eval()(audio(1, 4000, seed=0)).shape == (1, 3)  # 0.25 s: 12 frames -> 1


@pytest.mark.parametrize("spec", ALL_SPECS, ids=IDS)
def test_json_round_trip_is_exact(spec):
    text = spec.to_json()
    again = ArchSpec.from_json(text)
    assert again == spec and again.to_json() == text
    assert ArchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert resolve_spec(text) == spec
    assert again.summary() == spec.summary()


def test_resolve_spec_accepts_names_json_and_files(tmp_path):
    assert resolve_spec("wav2small-ref") is REFERENCES["wav2small-ref"]
    path = tmp_path / "s.json"
    path.write_text(REFERENCES["mobilenetv4-s"].to_json())
    assert resolve_spec(str(path)) == REFERENCES["mobilenetv4-s"]
    with pytest.raises(MicroserError, match=r"'wav2small' is not a known name \(wav2small-ref, mobilenetv3-s, "
                                            r"mobilenetv4-s\)"):
        resolve_spec("wav2small")
    with pytest.raises(MicroserError, match=r"spec file .*missing.json does not exist"):
        resolve_spec(str(tmp_path / "missing.json"))
    with pytest.raises(MicroserError, match=r"spec JSON is not valid JSON"):
        resolve_spec("{family: 1}")


def test_summary_lines():
    assert REFERENCES["wav2small-ref"].summary() == "w2s 13x7 k3 bn pool@2 att+gram | stft64/32 m26 log clip"
    assert REFERENCES["mobilenetv4-s"].summary() == "mnv4 w1 r8 h1280 | stft512/160w400 m64 log clip"
    spec = ArchSpec("wav2small", FrontendSpec(n_fft=512, hop=160, n_mels=40, compression="pcen", center=True),
                    Wav2SmallBody(channels=(8, 16, 24), kernel=5, norm="layer", pool_after=(), stem_stride=2,
                                  pooling="meanstd"))
    assert spec.summary() == "w2s [8,16,24] k5 s2 ln nopool meanstd | stft512/160 center m40 pcen clip"


def test_from_dict_refuses_bad_specs_naming_the_key():
    good = REFERENCES["wav2small-ref"].to_dict()
    with pytest.raises(MicroserError, match=r"spec key 'family': 'resnet' is unknown, expected one of wav2small, "
                                            r"mobilenet"):
        ArchSpec.from_dict({**good, "family": "resnet"})
    with pytest.raises(MicroserError, match=r"spec key 'extra' is unknown: allowed keys are family, frontend, body"):
        ArchSpec.from_dict({**good, "extra": 1})
    with pytest.raises(MicroserError, match=r"spec key 'body.norm': 'group' is not allowed, expected one of "
                                            r"'batch', 'layer', 'none'"):
        ArchSpec.from_dict({**good, "body": {**good["body"], "norm": "group"}})
    with pytest.raises(MicroserError, match=r"spec key 'body.channels\[1\]': 2.5 is a float, "
                                            r"expected a list .* each an int"):
        ArchSpec.from_dict({**good, "body": {**good["body"], "channels": [8, 2.5]}})
    with pytest.raises(MicroserError, match=r"spec key 'body.pool_after': \[3, 1\] must be increasing block indices"):
        ArchSpec.from_dict({**good, "body": {**good["body"], "pool_after": [3, 1]}})
    with pytest.raises(MicroserError, match=r"spec key 'body.kernel' is missing"):
        ArchSpec.from_dict({**good, "body": {k: v for k, v in good["body"].items() if k != "kernel"}})
    with pytest.raises(MicroserError, match=r"spec key 'body.width' is unknown: allowed keys there are channels"):
        ArchSpec.from_dict({**good, "body": {**good["body"], "width": 0.5}})
    with pytest.raises(MicroserError, match=r"family 'mobilenet' needs a MobileNetBody, got Wav2SmallBody"):
        ArchSpec("mobilenet", FrontendSpec(), Wav2SmallBody())
    with pytest.raises(MicroserError, match=r"spec key 'body.width': 3.0 is out of range, "
                                            r"expected a float in \[0.05, 2.0\]"):
        MobileNetBody(width=3.0)


PARITY_SPECS = list(REFERENCES.values()) + RANDOM_SPECS[:5]


@pytest.mark.parametrize("spec", PARITY_SPECS, ids=IDS[:len(PARITY_SPECS)])
def test_onnx_export_runs_in_onnxruntime_like_pytorch(spec):
    model = calibrated(spec, audio(4, 16000, seed=1))
    f = io.BytesIO()
    torch.onnx.export(model, (audio(1, 8000, seed=2),), f, opset_version=17, dynamo=False,
                      dynamic_axes={"audio": {0: "batch", 1: "samples"}}, input_names=["audio"], output_names=["adv"])
    graph = onnx.load_from_string(f.getvalue()).graph
    compute = [n.name for n in graph.node if n.op_type not in ("Constant", "Identity")]
    assert all(name.startswith(("/frontend/", "/body/", "/head/")) for name in compute)
    assert any(n.op_type == "STFT" for n in graph.node)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(f.getvalue(), options)
    x = audio(3, 12345, seed=3)  # another batch size and length than the export's
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {"audio": x.numpy()})[0]
    assert got.shape == (3, 3)
    # onnxruntime's STFT (a DFT for n_fft 400) and torch's FFT differ in float32 rounding: up to ~0.01 dB on
    # log-mels near the -100 dB floor, up to ~5e-4 on the outputs (mnv3 w0.1 on stft400/256 m64); a wrong
    # operator, padding or constant is off by 1e-2 and more
    assert np.abs(got - want).max() <= 1e-3
    assert want.std(0).max() > 1e-4  # the outputs depend on the input: the comparison means something


@pytest.mark.parametrize("name", ["wav2small-ref", "mobilenetv3-s"])
def test_family_abilities_on_the_registry_decide_pruning_qat_and_c_export(name):
    """Every place that asks what a family can do reads the registry's facts (no comparisons of family names)."""
    from microser.cgen.plan import check_exportable, int8_c_unavailable
    from microser.cgen.ram import streaming_costs
    from microser.compress import pruned_spec
    from microser.models.spec import FAMILIES
    from microser.qat import check_qat

    spec = REFERENCES[name]
    family = FAMILIES[spec.family]
    model = build_model(spec)
    for able, check in ((family.c_export, lambda: check_exportable(spec)), (family.qat, lambda: check_qat(spec)),
                        (family.prunable, lambda: pruned_spec(spec, model))):
        if able:
            check()
        else:
            with pytest.raises(MicroserError, match=spec.family):
                check()
    assert (int8_c_unavailable(spec) is None) == family.c_export
    costs = streaming_costs(spec, {"ram_bytes": 123}, input_seconds=1.0)
    assert costs["ram_bytes_offline"] == 123 and (costs["ram_mode"] == "streaming") == family.c_export
    assert family.per_block == (("channels", "pool_after") if spec.family == "wav2small" else ())
