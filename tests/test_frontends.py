"""Front-ends: framing, STFT power (torch and ONNX Runtime) vs numpy.fft, mel and window vs onnxruntime's operators,
the energy floor, PCEN, streaming."""

from __future__ import annotations

import io
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchaudio

from microser.errors import MicroserError
from microser.frontends import (
    FLOOR_DB, PCEN_ALPHA, PCEN_DELTA, PCEN_EPS, PCEN_R, PRENORM_EPS, PRENORM_PRIOR_COUNT, PRENORM_PRIOR_VAR, Frontend,
    FrontendSpec, Prenorm, energy_floor, full_scale_energy, hann_window, mel_matrix, num_frames, onnx_mel_matrix,
    pcen_fir, pcen_taps,
)


def audio(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Speech-like test signal: a harmonic tone with a slow envelope, plus noise and a DC offset."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    tone = torch.sin(2 * math.pi * 180 * t) + 0.5 * torch.sin(2 * math.pi * 360 * t)
    env = 0.5 + 0.4 * torch.sin(2 * math.pi * 3 * t)
    return (0.3 * tone * env + 0.05 * torch.randn(batch, n, generator=g) + 0.02).float()


# ---- numpy reference of the documented computation ----


def np_prenorm(x: np.ndarray, mode: str, n0: float = PRENORM_PRIOR_COUNT, v0: float = PRENORM_PRIOR_VAR) -> np.ndarray:
    x = x.astype(np.float64)
    if mode == "clip":
        return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + PRENORM_EPS)
    if mode == "running":
        out = np.zeros_like(x)
        for b in range(x.shape[0]):
            s = s2 = 0.0
            for t in range(x.shape[1]):  # two running sums, as firmware would keep them
                s += x[b, t]
                s2 += x[b, t] ** 2
                c = t + 1 + n0
                mu = s / c
                out[b, t] = (x[b, t] - mu) / (math.sqrt(max((s2 + n0 * v0) / c - mu * mu, 0.0)) + PRENORM_EPS)
        return out
    return x


def np_power(x: np.ndarray, spec: FrontendSpec) -> np.ndarray:
    """(B, T) -> (B, frames, n_fft//2+1), framing written out from the module docstring."""
    x = np_prenorm(x, spec.prenorm)
    left = spec.n_fft // 2 if spec.center else 0
    right = left + (spec.hop - 1 if spec.pad_end else 0)
    x = np.pad(x, ((0, 0), (left, right)))
    frames = 1 + (x.shape[1] - spec.n_fft) // spec.hop
    win = spec.window_length
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann
    window = np.zeros(spec.n_fft)
    window[(spec.n_fft - win) // 2:(spec.n_fft - win) // 2 + win] = hann
    out = []
    for k in range(frames):
        frame = x[:, k * spec.hop:k * spec.hop + spec.n_fft]
        if spec.prenorm == "window":
            frame = (frame - frame.mean(1, keepdims=True)) / (frame.std(1, keepdims=True) + PRENORM_EPS)
        out.append(np.abs(np.fft.rfft(frame * window, axis=1)) ** 2)
    return np.stack(out, 1)


class PowerOnly(torch.nn.Module):
    """The front-end up to the power spectrum, for checking that part alone in onnxruntime."""

    def __init__(self, spec: FrontendSpec):
        super().__init__()
        self.fe = Frontend(spec)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.fe.power(self.fe.prenorm(audio))


def run_onnx(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Export with a dynamic time axis at one length, run at the length of ``x``."""
    f = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.zeros(1, 3000),), f, opset_version=17, dynamo=False,
                      dynamic_axes={"audio": {0: "batch", 1: "samples"}}, input_names=["audio"], output_names=["y"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(f.getvalue(), options).run(None, {"audio": x.numpy()})[0]


SPECS = [
    FrontendSpec(prenorm="none", n_fft=512, hop=160),
    FrontendSpec(prenorm="clip", n_fft=400, hop=160, center=True),
    FrontendSpec(prenorm="running", n_fft=256, hop=128, pad_end=True),
    FrontendSpec(prenorm="window", n_fft=512, hop=320, win_length=400, center=True, pad_end=True),
    FrontendSpec(prenorm="clip", n_fft=64, hop=32, n_mels=26),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.summary())
def test_power_spectrum_equals_numpy_fft_in_torch_and_onnxruntime(spec):
    x = audio(4003)
    want = np_power(x.numpy(), spec)
    assert want.shape[1] == num_frames(spec, 4003)
    scale = want.max()
    with torch.no_grad():
        got = PowerOnly(spec)(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * scale
    got_onnx = run_onnx(PowerOnly(spec), x)
    assert got_onnx.shape == want.shape
    assert np.abs(got_onnx - want).max() <= 1e-5 * scale


def test_frame_counts_by_hand():
    # 1 s at 512/160: no padding 1 + 15488 // 160 = 97; pad_end adds 159 zeros: 1 + 15647 // 160 = 98;
    # center adds 256 + 256: 1 + 16000 // 160 = 101; both: 1 + 16159 // 160 = 101.
    base = dict(n_fft=512, hop=160)
    assert num_frames(FrontendSpec(**base), 16000) == 97
    assert num_frames(FrontendSpec(**base, pad_end=True), 16000) == 98
    assert num_frames(FrontendSpec(**base, center=True), 16000) == 101
    assert num_frames(FrontendSpec(**base, center=True, pad_end=True), 16000) == 101
    assert num_frames(FrontendSpec(**base), 511) == 0
    # Wav2Small: 64/32 on 1 s: 1 + 15936 // 32 = 499 frames, as in the paper's 13 x 499 x 26 activations
    assert num_frames(FrontendSpec(n_fft=64, hop=32), 16000) == 499
    with torch.no_grad():
        assert Frontend(FrontendSpec(**base, pad_end=True))(audio(16000, 1)).shape == (1, 1, 98, 40)


def ort_tables(n_mels: int, n_fft: int, fmin: float, fmax: float, win: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's own MelWeightMatrix and HannWindow outputs (a graph of just those two operators)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(v, dt), name) for v, dt, name in
             [(n_mels, np.int64, "m"), (n_fft, np.int64, "n"), (16000, np.int64, "r"), (fmin, np.float32, "lo"),
              (fmax, np.float32, "hi"), (win, np.int64, "w")]]
    graph = helper.make_graph(
        [helper.make_node("MelWeightMatrix", ["m", "n", "r", "lo", "hi"], ["mel"]),
         helper.make_node("HannWindow", ["w"], ["win"])], "tables", [],
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("win", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return tuple(ort.InferenceSession(model.SerializeToString(), options).run(None, {}))


def test_mel_matrix_by_hand():
    # 2 bands, n_fft 16, 0-8000 Hz: mel(8000) = 2840.02, 4 points 710 mel apart -> 0, 614.8, 1768.6, 3935.1 Hz
    # -> bins floor(17 f / 16000) = 0, 0, 1, 4. Band 0: empty rise -> a single 1 at bin 0 (its fall to bin 1
    # writes the same 1). Band 1: rises 0 -> 1 over bins 0..1, falls over bins 1..3: 1, 2/3, 1/3.
    want = np.zeros((9, 2), np.float32)
    want[0, 0] = 1
    want[1:4, 1] = [1, np.float32(2) / np.float32(3), np.float32(1) / np.float32(3)]
    assert np.array_equal(onnx_mel_matrix(2, 16, 0.0, 8000.0), want)
    # the example: 257 x 40 at 512 / 40 mels has 423 non-zeros of 10,280
    assert int((mel_matrix(FrontendSpec(n_fft=512, n_mels=40)) != 0).sum()) == 423


@pytest.mark.parametrize("n_mels,n_fft,fmin,fmax,win", [
    (26, 64, 0.0, 8000.0, 64), (40, 512, 0.0, 8000.0, 400), (64, 512, 0.0, 8000.0, 512), (12, 128, 0.0, 8000.0, 128),
    (40, 512, 20.0, 7600.0, 512), (20, 256, 0.0, 8000.0, 256), (64, 256, 0.0, 8000.0, 200), (60, 400, 50.0, 7000.0, 400),
    (24, 2048, 0.0, 8000.0, 1500), (128, 1024, 133.3, 6855.5, 1024), (256, 16, 0.0, 8000.0, 16), (3, 301, 10.0, 5000.0, 17),
])
def test_mel_matrix_and_window_equal_onnxruntime_operators_bit_for_bit(n_mels, n_fft, fmin, fmax, win):
    mel, window = ort_tables(n_mels, n_fft, fmin, fmax, win)
    spec = FrontendSpec(n_fft=n_fft, win_length=win, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert mel.shape == (n_fft // 2 + 1, n_mels) and np.array_equal(mel_matrix(spec).numpy(), mel)
    assert np.array_equal(hann_window(win).numpy(), window)
    fe = Frontend(spec)  # what training uses is what the graph makes
    assert np.array_equal(fe.fb.numpy(), mel) and np.array_equal(fe.power.window.numpy(), window)


def test_log_mel_equals_torchaudio_power_spectrum_times_the_mel_matrix():
    spec = FrontendSpec(prenorm="none", n_fft=512, hop=160, win_length=400, n_mels=40, fmin=20.0, fmax=7600.0)
    fe = Frontend(spec)
    assert isinstance(fe.fb, torch.Tensor) and not isinstance(fe.fb, torch.nn.Parameter)
    x = audio(8000)
    power = torchaudio.transforms.Spectrogram(n_fft=512, win_length=400, hop_length=160, center=False,
                                              power=2.0)(x)  # (B, F, frames), torch's own Hann window
    mel = power.transpose(1, 2) @ onnx_mel_matrix(40, 512, 20.0, 7600.0)  # (B, frames, n_mels)
    want = 10 * torch.log10(torch.clamp(mel, min=energy_floor(spec))).unsqueeze(1)
    with torch.no_grad():
        got = fe(x)
    assert got.shape == want.shape == (2, 1, num_frames(spec, 8000), 40)
    assert torch.allclose(got, want, atol=1e-3)  # dB


@pytest.mark.parametrize("compression", ["log", "pcen"])
def test_silence_and_quiet_sit_exactly_on_the_floor(compression):
    spec = FrontendSpec(prenorm="clip", n_fft=64, hop=32, n_mels=26, compression=compression)
    # full scale: a sine of amplitude 1 through a periodic Hann of 64 (sum 32) puts (32 / 2)**2 = 256 in its bin
    assert full_scale_energy(spec) == 256.0 and FLOOR_DB == -100.0
    assert energy_floor(spec) == np.float32(256.0 * 1e-10)
    t = torch.arange(16000) / 16000
    sine = torch.sin(2 * math.pi * 1000 * t)[None]  # 1000 Hz is bin 4 exactly (250 Hz bins)
    p = Frontend(FrontendSpec(prenorm="none", n_fft=64, hop=32)).power(sine)
    assert abs(float(p[0, 10, 4]) - full_scale_energy(spec)) < 1e-3
    fe = Frontend(spec)
    with torch.no_grad():
        silent = fe(torch.zeros(2, 24000))  # clip prenorm of zeros is zeros: no energy; 1.5 s fills the PCEN FIR
    floor = energy_floor(spec)
    if compression == "log":
        assert torch.equal(silent, torch.full_like(silent, 10 * math.log10(floor)))  # -75.9 dB
        assert abs(10 * math.log10(floor) - (10 * math.log10(256) - 100)) < 1e-5
    else:  # the smoother of a constant floor is the floor: (f / (eps + f)**alpha + delta)**r - delta**r
        want = (floor / (PCEN_EPS + floor) ** PCEN_ALPHA + PCEN_DELTA) ** PCEN_R - PCEN_DELTA ** PCEN_R
        assert torch.allclose(silent[:, :, -1], torch.full_like(silent[:, :, -1], want), atol=2e-5)  # float32
    if compression == "log":  # the quiet half of a loud clip sits on the floor too (PCEN divides by the loud past)
        with torch.no_grad():
            got = fe(torch.cat([sine[:, :4000], torch.zeros(1, 4000)], 1))
        assert float(got.min()) == float(silent.min())


def test_clip_prenorm_gives_zero_mean_unit_std():
    with torch.no_grad():
        y = Frontend(FrontendSpec(prenorm="clip")).prenorm(audio(5000) * 7 + 3)
    assert torch.allclose(y.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(y.std(1, unbiased=False), torch.ones(2), atol=1e-5)


def test_running_prenorm_equals_running_sums():
    x = audio(600)
    with torch.no_grad():
        y = Frontend(FrontendSpec(prenorm="running")).prenorm(x).numpy()
    assert np.abs(y - np_prenorm(x.numpy(), "running")).max() < 1e-4
    assert y[0, 0] == 0.0  # no prior: one sample has zero variance


def test_running_prenorm_prior_by_hand():
    assert (PRENORM_PRIOR_COUNT, PRENORM_PRIOR_VAR) == (0, 0)  # the documented definition: no prior
    prior = Prenorm("running", prior_count=800, prior_var=1e-4)  # the measured alternative
    # a constant 0.5 for 800 samples: c = 1600, mu = 400/1600 = 0.25, var = (200 + 0.08)/1600 - 0.0625 = 0.06255
    with torch.no_grad():
        y = prior(torch.full((1, 800), 0.5))
    assert float(y[0, -1]) == pytest.approx(0.25 / (math.sqrt(0.06255) + 1e-7), rel=1e-5)
    # near-silence (std 1e-4, -80 dBFS): without a prior it is blown up to unit variance, with it it stays small
    quiet = 1e-4 * torch.randn(1, 800, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(prior(quiet).abs().max()) < 0.06
        plain = Prenorm("running")(quiet)
    assert float(plain[0, 0]) == 0.0 and float(plain[0, 100:].std()) > 0.5
    assert np.abs(prior(quiet).numpy() - np_prenorm(quiet.numpy(), "running", 800, 1e-4)).max() < 1e-4


def test_running_prenorm_stays_exact_over_a_long_clip_in_onnxruntime():
    x = audio(16000 * 30, 1) * 0.1  # 30 s: float32 cumsums in the graph vs float64 sums
    want = np_prenorm(x.numpy(), "running")
    with torch.no_grad():
        got = Prenorm("running")(x).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(run_onnx(Prenorm("running"), x) - want).max() < 1e-4


def test_pcen_equals_its_formula_with_a_causal_fir():
    spec = FrontendSpec(prenorm="none", n_fft=256, hop=128, n_mels=20, compression="pcen")
    x = audio(6000)
    # three time constants of 0.4 s at 125 frames/s: ceil(3 * 50) = 150 taps
    assert pcen_taps(128) == 150 and pcen_taps(160) == 120
    h = pcen_fir(128).double().numpy()
    assert abs(h.sum() - 1) < 1e-6 and np.all(np.diff(h) < 0)
    energy = np_power(x.numpy(), spec) @ Frontend(spec).fb.double().numpy()  # (B, frames, n_mels)
    energy = np.maximum(energy, energy_floor(spec))
    smooth = np.zeros_like(energy)
    for t in range(energy.shape[1]):
        for k in range(min(len(h), t + 1)):
            smooth[:, t] += h[k] * energy[:, t - k]
    want = (energy / (PCEN_EPS + smooth) ** PCEN_ALPHA + PCEN_DELTA) ** PCEN_R - PCEN_DELTA ** PCEN_R
    with torch.no_grad():
        got = Frontend(spec)(x)[:, 0].double().numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(run_onnx(Frontend(spec), x)[:, 0] - want).max() < 1e-4


@pytest.mark.parametrize("prenorm", ["none", "running", "window"])
@pytest.mark.parametrize("compression", ["log", "pcen"])
def test_streaming_safe_front_ends_do_not_look_ahead(prenorm, compression):
    """A prefix of the audio gives exactly the leading frames of the whole: firmware can stream it."""
    spec = FrontendSpec(prenorm=prenorm, n_fft=400, hop=160, n_mels=32, compression=compression)
    x = audio(9000)
    fe = Frontend(spec)
    with torch.no_grad():
        whole, prefix = fe(x), fe(x[:, :5000])
    n = prefix.shape[2]
    assert n == num_frames(spec, 5000) and n < whole.shape[2]
    assert torch.allclose(prefix, whole[:, :, :n], atol=2e-3, rtol=1e-4)


def test_clip_prenorm_looks_at_the_whole_clip():
    fe = Frontend(FrontendSpec(prenorm="clip", n_fft=400, hop=160))
    x = audio(9000)
    x[:, 5000:] *= 10  # a louder second half changes the clip statistics
    with torch.no_grad():
        whole, prefix = fe(x), fe(x[:, :5000])
    assert not torch.allclose(prefix, whole[:, :, :prefix.shape[2]], atol=0.1)


def test_learnable_filterbank_starts_at_mel_and_trains():
    spec = FrontendSpec(filterbank="learnable", n_mels=24)
    fe = Frontend(spec)
    assert isinstance(fe.fb, torch.nn.Parameter)
    assert torch.equal(fe.fb.detach(), Frontend(FrontendSpec(n_mels=24)).fb)
    fe(audio(4000)).sum().backward()
    assert fe.fb.grad is not None and fe.fb.grad.abs().sum() > 0


def test_frontend_spec_refuses_bad_values():
    with pytest.raises(MicroserError, match=r"spec key 'frontend.prenorm': 'global' is not allowed, "
                                            r"expected one of 'none'"):
        FrontendSpec(prenorm="global")
    with pytest.raises(MicroserError, match=r"spec key 'frontend.n_fft': '512' is a str, expected an int"):
        FrontendSpec.from_dict({**FrontendSpec().to_dict(), "n_fft": "512"})
    with pytest.raises(MicroserError, match=r"spec key 'frontend.center': 1 is a int, expected a bool"):
        FrontendSpec(center=1)
    with pytest.raises(MicroserError, match=r"spec key 'frontend.win_length': 600 exceeds n_fft 512"):
        FrontendSpec(win_length=600)
    with pytest.raises(MicroserError, match=r"spec key 'frontend.fmax': 8000 Hz maps to FFT bin floor\(\(n_fft \+ 1\) "
                                            r"\* fmax / 16000\) = 201, past the last bin 200 of n_fft 401"):
        FrontendSpec(n_fft=401)
    assert FrontendSpec(n_fft=401, fmax=7900.0).n_freqs == 201  # an odd n_fft below the top bin is fine
    with pytest.raises(MicroserError, match=r"spec key 'frontend.nfft' is unknown: allowed keys there are prenorm"):
        FrontendSpec.from_dict({"nfft": 512})
