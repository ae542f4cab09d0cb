"""microser.teachers: one contract test run against every back-end, then each back-end's own rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from microser.audio import load_audio
from microser.errors import MicroserError
from microser.teachers import Segment, make_teacher
from teachers_helpers import hf_reference, onnx_reference, tiny_hf_model, tiny_onnx, write_clip

VALUES = {"a.wav": (0.1, 0.2, 0.3), "sub/b.wav": (0.9, 0.5, 0.25), "c.wav": (0.4, 0.6, 0.8)}
SECONDS = {"a.wav": 0.7, "sub/b.wav": 1.3, "c.wav": 1.0}


def _corpus(tmp_path):
    paths = [write_clip(tmp_path / name, SECONDS[name], seed=k) for k, name in enumerate(VALUES)]
    rows = ["path,speaker,arousal,dominance,valence"]
    rows += [f"{name},s{k},{v[0]},{v[1]},{v[2]}" for k, (name, v) in enumerate(VALUES.items())]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    segments = [Segment(load_audio(p), p, 0.0, SECONDS[n]) for p, n in zip(paths, VALUES)]
    return paths, segments


def _table_expected(segments):
    return np.array(list(VALUES.values()), dtype=np.float32), None


BACKENDS = ["csv", "demo", "onnx", "hf"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """(spec, make(), segments, expected targets, expected embeddings or None) for one back-end."""
    paths, segments = _corpus(tmp_path)
    kind = request.param
    if kind == "csv":
        spec, expected = f"csv:{tmp_path / 'labels.csv'}", _table_expected(segments)
    elif kind == "demo":
        (tmp_path / "demo.json").write_text(json.dumps({"seed": 3, "n_clips": 3}))
        spec, expected = "demo", _table_expected(segments)
    elif kind == "onnx":
        spec = f"onnx:{tiny_onnx(tmp_path / 'tiny.onnx')}"
        refs = [onnx_reference(s.audio) for s in segments]
        expected = np.stack([r[0] for r in refs]), np.stack([r[1] for r in refs])
    else:
        spec = f"hf:{tiny_hf_model(tmp_path / 'hf')}"
        expected = hf_reference(tmp_path / "hf", [s.audio for s in segments])
    make = lambda: make_teacher(spec, audio=tmp_path / "labels.csv")  # noqa: E731
    return kind, make, paths, segments, expected


def test_teacher_contract(backend):
    kind, make, paths, segments, (want_t, want_e) = backend
    teacher = make()
    ident = teacher.identity()
    assert ident["kind"] == kind
    assert json.loads(json.dumps(ident)) == ident  # JSON-able
    assert make().identity() == ident  # stable across instances
    teacher.check(paths)  # covers every file

    targets, emb = teacher.predict(segments)
    assert targets.shape == (3, 3) and targets.dtype == np.float32
    np.testing.assert_allclose(targets, want_t, atol=2e-5)
    assert emb is None  # not asked for

    targets2, emb2 = teacher.predict(segments, embeddings=True)
    np.testing.assert_allclose(targets2, targets, atol=1e-6)
    if want_e is None:
        assert emb2 is None
    else:
        assert emb2.dtype == np.float32 and emb2.shape == want_e.shape
        np.testing.assert_allclose(emb2, want_e, atol=2e-5)

    # batch composition never changes an output: reversed order, and one at a time
    rev, _ = teacher.predict(segments[::-1])
    np.testing.assert_allclose(rev[::-1], targets, atol=2e-5)
    for i, s in enumerate(segments):
        np.testing.assert_allclose(teacher.predict([s])[0][0], targets[i], atol=2e-5)


# ---- csv ----


def _write(path, text):
    path.write_text(text)
    return path


def test_csv_start_end_rows_give_the_overlap_weighted_mean(tmp_path):
    wav = write_clip(tmp_path / "long.wav", 10.0, seed=1)
    f = _write(tmp_path / "t.csv", "path,start,end,arousal,dominance,valence\n"
                                   "long.wav,0,4,0.0,0.3,1.0\nlong.wav,4,10,0.6,0.9,0.4\n")
    t = make_teacher(f"csv:{f}")
    x = np.zeros(16000, dtype=np.float32)
    out, _ = t.predict([Segment(x, wav, 2.0, 8.0), Segment(x, wav, 0.0, 3.0), Segment(x, wav, 5.0, 9.0)])
    # 2-8 s: 2 s of row 1, 4 s of row 2 -> (2*a + 4*b) / 6
    np.testing.assert_allclose(out[0], [(0 + 4 * 0.6) / 6, (2 * 0.3 + 4 * 0.9) / 6, (2 * 1.0 + 4 * 0.4) / 6],
                               atol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 0.3, 1.0], atol=1e-6)
    np.testing.assert_allclose(out[2], [0.6, 0.9, 0.4], atol=1e-6)
    with pytest.raises(MicroserError, match=r"no row for .*long.wav covers 10.00-12.00 s"):
        t.predict([Segment(x, wav, 10.0, 12.0)])


def test_csv_refuses_nan_naming_the_line(tmp_path):
    f = _write(tmp_path / "t.csv", "path,arousal,dominance,valence\na.wav,0.1,0.2,0.3\nb.wav,0.1,nan,0.3\n")
    with pytest.raises(MicroserError, match=r"line 3 \(b.wav\): NaN/Inf"):
        make_teacher(f"csv:{f}")


def test_csv_reports_out_of_range_values_with_count_min_max_and_fix(tmp_path):
    f = _write(tmp_path / "t.csv", "path,arousal,dominance,valence\na.wav,1,4,7\nb.wav,2,3,1\n")
    with pytest.raises(MicroserError, match=r"4 value\(s\) outside the target range 0,1 .*min 1, max 7.*"
                                            r"--target-range LO,HI.*--rescale-from LO,HI"):
        make_teacher(f"csv:{f}")
    # declaring the scale accepts the labels as they are
    t = make_teacher(f"csv:{f}", target_range=(1.0, 7.0))
    a = write_clip(tmp_path / "a.wav", 0.2, seed=0)
    np.testing.assert_allclose(t.predict([Segment(np.zeros(10, np.float32), a)])[0], [[1, 4, 7]])
    # rescaling maps 1..7 linearly onto 0..1: 4 -> 0.5
    t = make_teacher(f"csv:{f}", rescale_from=(1.0, 7.0))
    np.testing.assert_allclose(t.predict([Segment(np.zeros(10, np.float32), a)])[0], [[0.0, 0.5, 1.0]], atol=1e-6)
    assert t.identity()["rescale_from"] == [1.0, 7.0]


def test_csv_refuses_missing_columns(tmp_path):
    f = _write(tmp_path / "t.csv", "path,arousal,valence\na.wav,0.1,0.3\n")
    with pytest.raises(MicroserError, match=r"lacks column\(s\) dominance \(has: path, arousal, valence\)"):
        make_teacher(f"csv:{f}")


def test_csv_paths_cannot_leave_the_csv_folder(tmp_path):
    (tmp_path / "in").mkdir()
    f = _write(tmp_path / "in" / "t.csv", "path,arousal,dominance,valence\n../x.wav,0.1,0.2,0.3\n")
    with pytest.raises(MicroserError, match=r"'../x.wav' leaves the CSV's folder .*--allow-absolute-paths"):
        make_teacher(f"csv:{f}")
    t = make_teacher(f"csv:{f}", allow_absolute_paths=True)
    t.check([tmp_path / "x.wav"])


def test_csv_check_lists_the_first_few_uncovered_files(tmp_path):
    f = _write(tmp_path / "t.csv", "path,arousal,dominance,valence\na.wav,0.1,0.2,0.3\n")
    t = make_teacher(f"csv:{f}")
    missing = [tmp_path / f"m{k}.wav" for k in range(8)]
    with pytest.raises(MicroserError, match=r"no row for 8 audio file\(s\): .*m0.wav; .*m4.wav; \.\.\. and 3 more"):
        t.check([tmp_path / "a.wav", *missing])


def test_csv_refuses_duplicate_rows(tmp_path):
    f = _write(tmp_path / "t.csv", "path,arousal,dominance,valence\na.wav,0.1,0.2,0.3\na.wav,0.2,0.2,0.3\n")
    with pytest.raises(MicroserError, match="line 3: a.wav is listed twice"):
        make_teacher(f"csv:{f}")


def test_demo_identity_records_demo_json(tmp_path):
    _corpus(tmp_path)
    (tmp_path / "demo.json").write_text(json.dumps({"seed": 7}))
    ident = make_teacher("demo", audio=tmp_path / "labels.csv").identity()
    assert ident["demo"] == {"seed": 7} and ident["file"] == "labels.csv"
    with pytest.raises(MicroserError, match="teacher 'demo' reads .*labels.csv"):
        make_teacher("demo", audio=tmp_path)


def test_unknown_spec_is_refused():
    with pytest.raises(MicroserError, match=r"'wav2vec:x' is not understood: expected csv:FILE"):
        make_teacher("wav2vec:x")


# ---- onnx ----


def test_onnx_three_named_outputs_are_mapped_by_name(tmp_path):
    path = tiny_onnx(tmp_path / "three.onnx", three_outputs=True)  # outputs valence, arousal, dominance
    t = make_teacher(f"onnx:{path}")
    assert t.identity()["outputs"] == ["arousal", "dominance", "valence"]
    x = load_audio(write_clip(tmp_path / "a.wav", 0.5, seed=2))
    np.testing.assert_allclose(t.predict([Segment(x, tmp_path / "a.wav")])[0][0], onnx_reference(x)[0], atol=1e-5)


# ---- hf ----


def test_hf_group_norm_model_batches_only_equal_lengths(tmp_path):
    folder = tiny_hf_model(tmp_path / "hf", feat_extract_norm="group", seed=1)
    t = make_teacher(f"hf:{folder}")
    clips = [load_audio(write_clip(tmp_path / f"{k}.wav", s, seed=k)) for k, s in enumerate([0.5, 0.8, 0.5])]
    got, _ = t.predict([Segment(x, tmp_path / "x.wav") for x in clips])
    np.testing.assert_allclose(got, hf_reference(folder, clips)[0], atol=2e-5)


def test_hf_folder_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MicroserError, match=r"hf teacher .*empty.* does not load"):
        make_teacher(f"hf:{tmp_path / 'empty'}")
