"""Search spaces: packaged files load, one trial gives one ArchSpec, conditional parameters, invalid files refused."""

from __future__ import annotations

import optuna
import pytest

from microser.errors import MicroserError
from microser.frontends import FrontendSpec
from microser.models import REFERENCES, ArchSpec, MobileNetBody, Wav2SmallBody
from microser.space import SPACES_DIR, SearchSpace


def write(tmp_path, text: str):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_packaged_spaces_load_and_sample_their_families():
    assert sorted(p.stem for p in SPACES_DIR.glob("*.toml")) == ["default", "mobilenet", "wav2small"]
    default = SearchSpace.load("default")
    assert default.families == ("wav2small", "mobilenet")
    specs = default.sample(40, seed=0)
    assert {s.family for s in specs} == {"wav2small", "mobilenet"}
    assert all(isinstance(s, ArchSpec) for s in specs)
    assert {s.family for s in SearchSpace.load(SPACES_DIR / "wav2small.toml").sample(10, seed=1)} == {"wav2small"}
    assert {s.family for s in SearchSpace.load("mobilenet").sample(10, seed=1)} == {"mobilenet"}


def test_sample_is_reproducible_by_seed():
    space = SearchSpace.load("default")
    assert space.sample(15, seed=4) == space.sample(15, seed=4)
    assert space.sample(15, seed=4) != space.sample(15, seed=5)


def test_sampled_values_stay_inside_the_default_ranges():
    for s in SearchSpace.load("default").sample(60, seed=2):
        fe = s.frontend
        assert fe.n_fft in (128, 256, 400, 512) and fe.hop in (64, 128, 160, 256, 320)
        assert 20 <= fe.n_mels <= 64 and fe.n_mels % 4 == 0
        if s.family == "wav2small":
            assert 3 <= len(s.body.channels) <= 8 and all(8 <= c <= 64 for c in s.body.channels)
            assert all(i < len(s.body.channels) for i in s.body.pool_after)
        else:
            assert 0.1 <= s.body.width <= 0.35 and s.body.head_hidden == 0
            assert round(s.body.width / 0.05, 6) == round(s.body.width / 0.05)  # on the 0.05 grid, no 0.30000000004


def test_one_trial_gives_one_spec_with_conditional_per_block_parameters():
    params = {
        "family": "wav2small",
        "frontend.prenorm": "running", "frontend.n_fft": 512, "frontend.hop": 160, "frontend.n_mels": 40,
        "frontend.compression": "log", "frontend.filterbank": "mel",
        "wav2small.depth": 3, "wav2small.channels.0": 8, "wav2small.channels.1": 16, "wav2small.channels.2": 24,
        "wav2small.kernel": 3, "wav2small.norm": "batch", "wav2small.stem_stride": 1,
        "wav2small.pool_after.0": False, "wav2small.pool_after.1": True, "wav2small.pool_after.2": False,
        "wav2small.pooling": "attention+gram",
    }
    spec = SearchSpace.load("default").suggest(optuna.trial.FixedTrial(params))
    assert spec == ArchSpec("wav2small", FrontendSpec(prenorm="running", n_fft=512, hop=160, n_mels=40),
                            Wav2SmallBody(channels=(8, 16, 24), kernel=3, norm="batch", pool_after=(1,),
                                          stem_stride=1, pooling="attention+gram"))


def test_family_specific_parameters_exist_only_for_their_family():
    space = SearchSpace.load("default")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(30):
        trial = study.ask()
        spec = space.suggest(trial)
        other = "mobilenet" if spec.family == "wav2small" else "wav2small"
        assert not any(name.startswith(other + ".") for name in trial.params)
        if spec.family == "wav2small":
            depth = trial.params["wav2small.depth"]
            assert {f"wav2small.channels.{i}" for i in range(depth)} <= set(trial.params)
            assert f"wav2small.channels.{depth}" not in trial.params
        study.tell(trial, 0.0)


def test_fixed_values_reproduce_the_reference(tmp_path):
    path = write(tmp_path, """
family = "wav2small"
[frontend]
prenorm = "clip"
n_fft = 64
hop = 32
n_mels = 26
[wav2small]
channels = [13, 13, 13, 13, 13, 13, 13]
kernel = 3
norm = "batch"
pool_after = [2]
pooling = "attention+gram"
""")
    assert SearchSpace.load(path).sample(3, seed=0) == [REFERENCES["wav2small-ref"]] * 3


def test_one_channel_value_for_every_block_and_log_float_width(tmp_path):
    path = write(tmp_path, """
family = { choices = ["wav2small", "mobilenet"] }
[wav2small]
depth = 4
channels = 12
[mobilenet]
version = "v3"
width = { low = 0.1, high = 0.4, log = true }
""")
    for spec in SearchSpace.load(path).sample(12, seed=0):
        if spec.family == "wav2small":
            assert spec.body.channels == (12, 12, 12, 12) and spec.body.pool_after == (2,)
        else:
            assert isinstance(spec.body, MobileNetBody) and 0.1 <= spec.body.width <= 0.4


INVALID = [
    ("family = 'wav2small'\n[frontend]\nn_fft = 512\ncolour = 'red'\n",
     r"key 'frontend.colour' is unknown; allowed keys are prenorm, n_fft"),
    ("family = 'wav2small'\nsampler = 'tpe'\n", r"key 'sampler' is unknown; allowed top-level keys"),
    ("family = { choices = ['wav2small', 'resnet'] }\n",
     r"key 'family.choices\[1\]': 'resnet' is not allowed, expected one of 'wav2small', 'mobilenet'"),
    ("[frontend]\nn_fft = 512\n", r"key 'family' is missing"),
    ("family = 'wav2small'\n[frontend]\nn_mels = { low = 64, high = 20 }\n",
     r"key 'frontend.n_mels': `low <= high` must hold, but got \(low=64, high=20\)"),
    ("family = 'wav2small'\n[wav2small]\nkernel = { choices = [] }\n",
     r"key 'wav2small.kernel.choices': \[\] must be a non-empty list"),
    ("family = 'wav2small'\n[frontend]\nhop = { low = 128.0, high = 320 }\n",
     r"key 'frontend.hop.low': 128.0 is a float, expected an int"),
    ("family = 'wav2small'\n[frontend]\ncenter = 'yes'\n", r"key 'frontend.center': 'yes' is a str, expected a bool"),
    ("family = 'wav2small'\n[wav2small]\nnorm = { choices = ['batch', 'group'] }\n",
     r"key 'wav2small.norm.choices\[1\]': 'group' is not allowed, expected one of 'batch', 'layer', 'none'"),
    ("family = 'wav2small'\n[wav2small]\nkernel = { choices = [3, 7] }\n",
     r"key 'wav2small.kernel.choices\[1\]': 7 is not allowed, expected one of 3, 5"),
    ("family = 'wav2small'\n[frontend]\nprenorm = { low = 1, high = 2 }\n",
     r"key 'frontend.prenorm': a low/high range needs a numeric field"),
    ("family = 'wav2small'\n[frontend]\nn_mels = { low = 0, high = 64, log = true }\n",
     r"key 'frontend.n_mels.low': 0 is out of range"),
    ("family = 'mobilenet'\n[mobilenet]\nwidth = { low = 0.1, high = 1.0, step = 0.1, log = true }\n",
     r"key 'mobilenet.width': log = true cannot be combined with step = 0.1"),
    ("family = 'wav2small'\n[frontend]\nn_mels = { lo = 20, high = 64 }\n",
     r"key 'frontend.n_mels.lo' is not understood"),
    ("family = 'wav2small'\n[wav2small]\nchannels = { low = 8, high = 64 }\n",
     r"key 'wav2small.depth' is missing; a per-block channels value needs a depth"),
    ("family = 'wav2small'\n[wav2small]\ndepth = 5\nchannels = [8, 8, 8]\n",
     r"key 'wav2small.depth': must be left out \(or equal 3\) when channels is a fixed list"),
    ("family = 'wav2small'\n[wav2small]\ndepth = { low = 3, high = 6 }\npool_after = [4]\n",
     r"key 'wav2small.pool_after': \[4\] must be increasing block indices below the smallest depth 3"),
    ("family = 'wav2small'\n[wav2small]\ndepth = 4\npool_after = { choices = [0, 1] }\n",
     r"key 'wav2small.pool_after.choices\[0\]': 0 is a int, expected a bool"),
    ("family = 'wav2small'\n[wav2small]\npool_after = 2\n", r"key 'wav2small.pool_after': 2 is not allowed"),
    ("family = 'wav2small'\n[mobilenet]\nwidth = 0.5\n",
     r"key 'mobilenet': table given but family 'mobilenet' is not in 'family'"),
    ("family = 'wav2small'\n[frontend\n", r"not valid TOML"),
]


@pytest.mark.parametrize("text,message", INVALID, ids=[m.split("'")[1] if "'" in m else m for _, m in INVALID])
def test_invalid_space_files_are_refused_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(MicroserError, match=rf"^{path}: .*" + message):
        SearchSpace.load(path)


def test_missing_space_names_the_packaged_ones(tmp_path):
    with pytest.raises(MicroserError, match=r"search space .*nope.toml does not exist; pass a TOML file or one of: "
                                            r"default, mobilenet, wav2small"):
        SearchSpace.load(tmp_path / "nope.toml")


def test_a_cross_field_conflict_names_the_space_and_trial(tmp_path):
    path = write(tmp_path, "family = 'wav2small'\n[frontend]\nfmin = { low = 7000.0, high = 8000.0 }\nfmax = 7000.0\n")
    with pytest.raises(MicroserError, match=rf"^{path}: trial 0 drew an invalid spec .*fmin.*must be below fmax"):
        SearchSpace.load(path).sample(1, seed=0)


def test_packaged_warm_starts_are_the_documented_front_ends_and_widths():
    import optuna

    for name in ("default", SPACES_DIR / "wav2small.toml"):
        space = SearchSpace.load(name)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        specs = []
        for params in space.warm_starts:
            study.enqueue_trial(params)
            specs.append(space.suggest(study.ask()))
        # the paper's 7-block topology at 24 channels on STFT 400/320; the search's 5-block stride-2 find on
        # the same framing; 16 channels x 7 with a stride-2 5x5 first conv on STFT 128/64
        assert [s.body.channels for s in specs] == [(24,) * 7, (31, 12, 19, 20, 12), (16,) * 7]
        assert [(s.frontend.n_fft, s.frontend.hop, s.frontend.n_mels) for s in specs] == \
            [(400, 320, 40), (400, 320, 44), (128, 64, 40)]
        assert [(s.body.kernel, s.body.stem_stride, s.body.pool_after) for s in specs] == \
            [(3, 1, (2,)), (5, 2, (0, 1)), (5, 2, (2,))]
        for s in specs:
            assert s.frontend.prenorm == "clip" and s.frontend.compression == "log"
            assert s.body.norm == "batch" and s.body.pooling == "attention+gram"


@pytest.mark.parametrize("entry, match", [
    ('"frontend.nfft" = 512', r"warm_start\[0\]\.frontend\.nfft' is not a parameter"),
    ('"frontend.n_fft" = 1024', r"warm_start\[0\]\.frontend\.n_fft': 1024 is outside"),
    ('"wav2small.depth" = 99', r"warm_start\[0\]\.wav2small\.depth': 99 is outside"),
])
def test_a_bad_warm_start_is_refused_with_its_key(tmp_path, entry, match):
    text = (SPACES_DIR / "wav2small.toml").read_text().split("[[warm_start]]")[0]
    path = tmp_path / "space.toml"
    path.write_text(text + "\n[[warm_start]]\n" + entry + "\n")
    with pytest.raises(MicroserError, match=match):
        SearchSpace.load(path)
