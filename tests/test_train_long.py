"""Long training in distill.train: EMA, best checkpoint, early stopping, resume, device, speed perturbation, mixup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from microser.batches import AudioBank, draw_batch, mix, resample
from microser.checkpoint import EMA
from microser.distill import evaluate, resolve_device, train
from microser.train_config import TrainConfig
from compress_helpers import tiny_spec
from microser.errors import MicroserError
from microser.models.spec import build_model
from test_distill import ConstantStudent, ToneData


def _model(seed: int = 0) -> nn.Module:
    """A 3-block Wav2Small on a 128/64 STFT (about 2k parameters; 7x faster than wav2small-ref here), seeded."""
    torch.manual_seed(seed)
    return build_model(tiny_spec())


# A few hundred steps of a tiny student on generated tones: validation every 20 steps, EMA, best kept.
LONG = TrainConfig(steps=200, batch_size=8, crop_seconds=0.4, crops_per_segment=1, eval_every=20, ema_decay=0.95,
                   keep_best=True, threads=1, device="cpu")


@pytest.fixture(scope="module")
def tones():
    return ToneData()


@pytest.fixture(scope="module")
def long_run(tones):
    model = _model()
    return model, train(model, tones, LONG)


def test_ema_follows_the_recursion_with_its_warm_up_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = EMA(model, decay=0.9)
    expected = model[0].weight.detach().clone().numpy()
    for t in range(5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        ema.update(t)
        d = min(0.9, (1 + t) / (10 + t))  # 0.1, 2/11, 3/12, 4/13, 5/14: the warm-up is below 0.9 here
        expected = d * expected + (1 - d) * model[0].weight.detach().numpy()
    np.testing.assert_allclose(ema.state["0.weight"].numpy(), expected, rtol=1e-6)
    assert int(ema.state["1.num_batches_tracked"]) == 5  # an integer buffer is copied, not averaged
    # after the warm-up the decay is the configured one
    assert min(0.9, (1 + 100) / (10 + 100)) == 0.9


def test_best_validated_weights_are_returned_with_their_ccc(tones, long_run):
    model, result = long_run
    assert result.steps == result.total_steps == 200 and not result.early_stopped
    assert [h["step"] for h in result.history] == list(range(20, 201, 20))
    means = [h["valid"]["mean"] for h in result.history]
    best = int(np.argmax(means))
    assert result.best_step == result.history[best]["step"]
    assert result.ccc == result.history[best]["valid"]
    # the model holds the returned weights, and a fresh model loaded with them scores exactly that CCC
    assert evaluate(model, tones) == result.ccc
    fresh = _model(seed=7)
    fresh.load_state_dict(result.state_dict)
    assert evaluate(fresh, tones) == result.ccc
    # learned (measured: mean CCC .51 at step 20, .96 at its best step; the tone targets are easy)
    assert result.ccc["mean"] > 0.8 and result.ccc["mean"] > result.history[0]["valid"]["mean"] + 0.2


def test_evaluations_score_the_moving_average_not_the_raw_weights(tones):
    config = TrainConfig(**{**LONG.to_dict(), "noise_snr_db": (15.0, 40.0), "steps": 40, "keep_best": False})
    raw = TrainConfig(**{**config.to_dict(), "noise_snr_db": (15.0, 40.0), "ema_decay": 0.0})
    with_ema, without = _model(), _model()
    a, b = train(with_ema, tones, config), train(without, tones, raw)
    # the same steps were taken (same seed): the raw runs' last weights differ from the EMA's returned weights
    assert any(not torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict if "weight" in k)
    assert a.ccc != b.ccc and a.ccc == a.history[-1]["valid"]


def test_early_stopping_after_patience_validations_without_a_better_ccc(tones):
    # a constant student scores CCC exactly 0 at every validation: the first one is the best, the next
    # `patience` ones are not better, so training stops at step eval_every * (1 + patience)
    config = TrainConfig(steps=300, batch_size=8, crop_seconds=0.3, eval_every=5, patience=3, keep_best=True,
                         threads=1, device="cpu")
    result = train(ConstantStudent(), tones, config)
    assert result.early_stopped and result.steps == 20 and result.total_steps == 300
    assert [h["step"] for h in result.history] == [5, 10, 15, 20]
    assert result.best_step == 5 and result.collapsed


def test_hold_schedule_keeps_the_peak_then_anneals_and_stops_after_a_plateau(tones, tmp_path):
    from microser.distill import _lr_factor

    # warm-up 2 of 20 steps, hold at the peak until step 12, cosine to 0 at step 16
    assert [round(_lr_factor(s, 20, 0.1, (12, 16)), 4) for s in range(18)] == [
        0.505, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    # no plateau: the decay is the last `decay` fraction of the steps (here 8 of 40)
    data = ToneData(n=12, n_train=8)
    plain = train(_model(), data, TrainConfig(steps=40, batch_size=4, crop_seconds=0.3, eval_every=8, warmup=0.0,
                                              schedule="hold", decay=0.2, threads=1, device="cpu"))
    assert [h["lr"] for h in plain.history] == pytest.approx([3e-3, 3e-3, 3e-3, 3e-3 * _lr_factor(32, 40, 0.0, (32, 40)),
                                                              0.0])
    assert plain.steps == 40 and not plain.early_stopped
    # a constant student never improves after its first validation (CCC exactly 0): with patience 3 the decay
    # starts at step 20 and lasts 0.2 / 0.8 x 20 = 5 steps; the run ends at 25 of 300 steps
    config = TrainConfig(steps=300, batch_size=8, crop_seconds=0.3, eval_every=5, patience=3, warmup=0.0,
                         schedule="hold", decay=0.2, keep_best=True, threads=1, device="cpu")
    result = train(ConstantStudent(), tones, config)
    assert [h["step"] for h in result.history] == [5, 10, 15, 20, 25]
    assert [h["lr"] for h in result.history] == pytest.approx([3e-3, 3e-3, 3e-3, 3e-3, 0.0])
    assert result.early_stopped and result.steps == 25 and result.total_steps == 300
    # stopped inside the decay and resumed: the decay the checkpoint holds is kept
    calls = iter(range(1000))
    train(ConstantStudent(), tones, config, checkpoint=tmp_path / "c.ckpt", should_stop=lambda: next(calls) >= 22)
    resumed = train(ConstantStudent(), tones, config, checkpoint=tmp_path / "c.ckpt")
    assert resumed.resumed_at == 22 and resumed.steps == 25 and resumed.early_stopped
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in result.history]
    assert torch.equal(resumed.state_dict["value"], result.state_dict["value"])


def test_stopped_run_resumes_from_its_checkpoint_to_identical_weights(tones, tmp_path):
    config = TrainConfig(**{**LONG.to_dict(), "noise_snr_db": (15.0, 40.0), "steps": 90, "patience": 2,
                            "schedule": "hold", "speed_perturb": 0.1, "mixup_prob": 0.5})
    whole = train(_model(), tones, config)
    calls = iter(range(1000))
    stopped = train(_model(), tones, config, checkpoint=tmp_path / "run.ckpt", should_stop=lambda: next(calls) >= 33)
    assert stopped.stopped and stopped.steps == 33
    resumed = train(_model(seed=3), tones, config, checkpoint=tmp_path / "run.ckpt")  # other init: overwritten
    assert resumed.resumed_at == 33 and resumed.steps == whole.steps
    for k, v in whole.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
    strip = [{k: h[k] for k in ("step", "epoch", "loss", "lr", "valid")} for h in whole.history]
    assert [{k: h[k] for k in ("step", "epoch", "loss", "lr", "valid")} for h in resumed.history] == strip
    assert resumed.ccc == whole.ccc and resumed.best_step == whole.best_step
    # a finished checkpoint returns the same result without training again
    again = train(_model(seed=4), tones, config, checkpoint=tmp_path / "run.ckpt")
    assert again.resumed_at == again.steps == whole.steps and again.ccc == whole.ccc


def test_a_checkpoint_of_other_settings_or_another_file_is_refused_in_one_line(tones, tmp_path):
    config = TrainConfig(steps=6, batch_size=8, crop_seconds=0.3, eval_every=3, threads=1, device="cpu")
    train(_model(), tones, config, checkpoint=tmp_path / "a.ckpt")
    other = TrainConfig(**{**config.to_dict(), "noise_snr_db": (15.0, 40.0), "lr": 1e-3})
    with pytest.raises(MicroserError, match=r"^training checkpoint .*a.ckpt was written by another run "
                                            r"\(lr 0.003 there, 0.001 here\): pass that run's settings"):
        train(_model(), tones, other, checkpoint=tmp_path / "a.ckpt")
    with pytest.raises(MicroserError, match="data differs"):
        train(_model(), ToneData(seed=1), config, checkpoint=tmp_path / "a.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(MicroserError, match=r"junk.ckpt cannot be read .*: delete it to start this run over"):
        train(_model(), tones, config, checkpoint=tmp_path / "junk.ckpt")
    # threads and device may differ: they change speed, not the run
    same = TrainConfig(**{**config.to_dict(), "noise_snr_db": (15.0, 40.0), "threads": 2})
    assert train(_model(), tones, same, checkpoint=tmp_path / "a.ckpt").resumed_at == 6


def test_device_auto_falls_back_to_cpu_and_a_missing_gpu_is_one_line(monkeypatch, tones):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MicroserError, match=r"^device 'cuda': torch .* sees no CUDA GPU here .*: pass --device cpu"):
        resolve_device("cuda")
    with pytest.raises(MicroserError, match="device 'cuda:1'"):
        train(_model(), tones, TrainConfig(steps=2, device="cuda:1"))  # refused before any step
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MicroserError, match=r"has 1 CUDA device\(s\) \(0..0\)"):
        resolve_device("cuda:1")
    with pytest.raises(MicroserError, match="device 'tpu' is not known: expected auto, cpu, cuda or cuda:N"):
        TrainConfig(device="tpu")
    assert TrainConfig().device == "cpu"   # the search's brief runs stay on the CPU unless asked


def test_resampling_is_linear_interpolation_at_pixel_centres():
    x = np.sin(np.arange(110) * 0.3).astype(np.float32)
    got = resample(x, 100).numpy()  # 110 samples squeezed into 100: a 1.1x speed-up
    positions = np.clip((np.arange(100) + 0.5) * 110 / 100 - 0.5, 0, 109)
    np.testing.assert_allclose(got, np.interp(positions, np.arange(110), x), atol=1e-5)  # float32 positions
    assert np.array_equal(resample(x, 110).numpy(), x)  # no speed change: the crop as it is


def test_speed_perturbation_reads_longer_or_shorter_spans_and_resamples_them(tones):
    config = TrainConfig(crop_seconds=0.3, speed_perturb=0.2, gain_db=0, noise_prob=0, time_masks=0, freq_masks=0)
    bank = AudioBank(tones, tones.split_indices("train"))
    pos = np.arange(6)
    targets = torch.from_numpy(tones.targets[tones.split_indices("train")])
    x, y = draw_batch(bank, targets, pos, config, np.random.default_rng(5), torch.Generator(), False)
    assert x.shape == (6, 4800) and torch.equal(y, targets[pos])
    rng = np.random.default_rng(5)  # the same draws by hand: factor, then start
    factors = rng.uniform(0.8, 1.2, 6)
    sources = np.minimum(np.round(4800 * factors).astype(int), bank.lengths[pos])
    starts = rng.integers(0, bank.lengths[pos] - sources + 1)
    for b in range(6):
        span = tones.audio(b)[starts[b]:starts[b] + sources[b]]
        np.testing.assert_allclose(x[b].numpy(), resample(span, 4800).numpy())
    assert len(set(sources)) > 1  # factors differ per crop


def test_mixup_mixes_crops_and_targets_with_the_same_weight_and_keeps_the_own_share_larger():
    x = torch.arange(4 * 5, dtype=torch.float32).view(4, 5)
    y = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.4, 0.6], [0.9, 0.1, 0.5]])
    config = TrainConfig(mixup_prob=1.0, mixup_alpha=0.4)
    mx, my = mix(x, y, config, np.random.default_rng(3))
    rng = np.random.default_rng(3)  # the same draws by hand: who is mixed, with whom, how much
    on, partner, w = rng.random(4) < 1.0, rng.permutation(4), rng.beta(0.4, 0.4, 4)
    w = np.maximum(w, 1 - w)
    assert on.all() and (w >= 0.5).all()
    for b in range(4):
        np.testing.assert_allclose(mx[b].numpy(), w[b] * x[b].numpy() + (1 - w[b]) * x[partner[b]].numpy(), rtol=1e-6)
        np.testing.assert_allclose(my[b].numpy(), w[b] * y[b].numpy() + (1 - w[b]) * y[partner[b]].numpy(), rtol=1e-6)
    nx, ny = mix(x, y, TrainConfig(mixup_prob=0.0), np.random.default_rng(3))
    assert torch.equal(nx, x) and torch.equal(ny, y)


def test_long_training_settings_are_checked_in_one_line():
    for kw, pattern in [({"speed_perturb": 0.6}, "speed_perturb=0.6: expected a fraction in"),
                        ({"mixup_prob": 1.5}, "mixup_prob=1.5"), ({"mixup_alpha": 0}, "mixup_alpha=0"),
                        ({"eval_every": 0}, "eval_every=0: expected steps >= 1"),
                        ({"ema_decay": 1.0}, "ema_decay=1.0: expected 0 \\(off\\) or a decay in"),
                        ({"patience": 0}, "patience=0: expected validations >= 1"),
                        ({"schedule": "step"}, "schedule='step', decay=0.2: expected a schedule in cosine, hold"),
                        ({"decay": 1.0}, "decay=1.0")]:
        with pytest.raises(MicroserError, match=pattern):
            TrainConfig(**kw)
    config = TrainConfig(eval_every=5, ema_decay=0.99, keep_best=True, patience=4, speed_perturb=0.1, mixup_prob=0.3)
    assert TrainConfig.from_dict(config.to_dict()) == config
