"""The one exporter: BN folded, dynamic time axis after onnxsim, names kept, docs stripped, ORT parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchaudio
from torch import nn

from microser.errors import MicroserError
from microser.onnxio import export_onnx, ort_session, run_onnx


class TinySER(nn.Module):
    """A hand-made student with the family contract: frontend / body / head, audio (B, T) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.frontend = _LogMel()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.head = _Head()

    def forward(self, audio):  # (B, T)
        return self.head(self.body(self.frontend(audio).unsqueeze(1)))


class _LogMel(nn.Module):
    def __init__(self, n_fft=64, hop=32, n_mels=8):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft))
        self.register_buffer("mel", torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, 8000.0, n_mels, 16000))

    def forward(self, x):  # (B, T) -> (B, frames, mels)
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, center=False, return_complex=False)
        power = spec.pow(2).sum(-1)  # (B, F, frames); the legacy exporter has no complex STFT
        return 10 * torch.log10(power.transpose(1, 2) @ self.mel + 1e-6)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(5)  # not after a conv: becomes Mul + Add
        self.linear = nn.Linear(5, 4)
        self.bn_linear = nn.BatchNorm1d(4)  # after a Linear: folded into the Gemm
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # (B, C, T, F)
        pooled = self.norm(x.mean(dim=(2, 3)))
        return self.out(torch.relu(self.bn_linear(self.linear(pooled))))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine, so folding errors would show in the output."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize_bn(TinySER()).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "sub" / "tiny.onnx", sample_seconds=0.25)
    return model, path


def test_export_writes_file_and_restores_training_mode(tmp_path):
    model = TinySER().train()
    path = export_onnx(model, tmp_path / "m.onnx", sample_seconds=0.1)
    assert path == tmp_path / "m.onnx" and path.stat().st_size > 0
    assert model.training


def test_batchnorm_is_folded(exported):
    model, path = exported
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 2
    # the head's BN1d on pooled features had no conv/linear before it: it became a per-channel Mul + Add
    assert any(n.op_type == "Mul" and n.name.startswith("/head/norm/") for n in graph.node)
    # the BN after head.linear was folded into that Gemm: its weight is W * gamma / sqrt(var + eps)
    bn, lin = model.head.bn_linear, model.head.linear
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    expected_w = (lin.weight * scale[:, None]).detach().numpy()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    assert any(w.shape == expected_w.shape and np.allclose(w, expected_w, atol=1e-6) for w in inits.values())


def test_dynamic_time_axis_after_simplification(exported):
    model, path = exported
    graph = onnx.load(path).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "samples"]
    session = ort_session(path)
    g = torch.Generator().manual_seed(7)
    for batch, samples in ((1, 3000), (3, 7777)):  # neither is the traced 4000 samples
        audio = torch.rand(batch, samples, generator=g) - 0.5
        with torch.no_grad():
            expected = model(audio).numpy()
        got = run_onnx(session, audio.numpy())
        assert got.shape == (batch, 3)
        assert np.max(np.abs(got - expected)) <= 1e-4


def test_names_kept_and_doc_strings_stripped(exported):
    _, path = exported
    proto = onnx.load(path)
    names = [n.name for n in proto.graph.node]
    for prefix in ("/frontend/", "/body/", "/head/"):
        assert any(name.startswith(prefix) for name in names), prefix
    assert proto.doc_string == "" and proto.graph.doc_string == ""
    assert all(n.doc_string == "" for n in proto.graph.node)
    assert [o.name for o in proto.graph.output] == ["adv"]
    assert "STFT" in [n.op_type for n in proto.graph.node]  # an operator, not a DFT matrix
    assert max(int(np.prod(t.dims)) for t in proto.graph.initializer) < 33 * 33  # no 33x64 DFT basis stored


class _BakedLength(nn.Module):
    """Divides by the traced length as a Python int: ONNX bakes it in, so other lengths differ."""

    def forward(self, audio):
        n = int(audio.shape[1])
        return (audio.abs().sum(1, keepdim=True) / n).repeat(1, 3)


def test_parity_failure_names_the_difference(tmp_path):
    with pytest.raises(MicroserError, match=r"differs from PyTorch by max abs .* expected <= 0\.0001"):
        export_onnx(_BakedLength(), tmp_path / "bad.onnx", sample_seconds=0.1)
    assert not (tmp_path / "bad.onnx").exists()
    export_onnx(_BakedLength(), tmp_path / "unchecked.onnx", sample_seconds=0.1, check=False)  # check=False skips


def test_argument_errors(tmp_path):
    with pytest.raises(MicroserError, match="opset 16 has no STFT"):
        export_onnx(TinySER(), tmp_path / "m.onnx", opset=16)
    with pytest.raises(MicroserError, match="does not exist"):
        ort_session(tmp_path / "missing.onnx")


def test_ort_session_and_run_onnx_accept_bytes_and_1d(exported):
    model, path = exported
    session = ort_session(path.read_bytes())
    audio = np.linspace(-0.3, 0.3, 4000, dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(audio)[None]).numpy()
    assert np.max(np.abs(run_onnx(session, audio) - expected)) <= 1e-4
    with pytest.raises(MicroserError, match=r"shape \(1, 2, 3\): expected \(batch, samples\)"):
        run_onnx(session, np.zeros((1, 2, 3), np.float32))


class _TwinConvs(nn.Module):
    """Two conv+BN layers of equal width: untrained, both fold to equal (zero) biases."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 4, 3, bias=False), nn.BatchNorm1d(4),
                                  nn.Conv1d(4, 4, 3, bias=False), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, audio):  # (B, T)
        return self.head(self.body(audio.unsqueeze(1)).mean(-1))


def test_equal_constants_are_not_deduplicated(tmp_path):
    """The stored size must not depend on the weights' values (trained biases differ, untrained ones are equal)."""
    path = export_onnx(_TwinConvs(), tmp_path / "twin.onnx", sample_seconds=0.01)
    inits = onnx.load(path).graph.initializer
    floats = sum(int(np.prod(t.dims)) for t in inits if t.data_type == onnx.TensorProto.FLOAT)
    # conv weights 4*1*3 + 4*4*3, one folded bias of 4 per conv, Linear 4*3 + 3
    assert floats == 12 + 48 + 4 + 4 + 12 + 3
