"""Security: checkpoints never run code (safetensors or weights-only torch.load), no remote code, CSV paths stay
under their folder unless absolute paths are allowed explicitly."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import optuna
import pytest
import torch

from microser.cache import Cache
from microser.cache_build import build_cache
from microser.errors import MicroserError
from microser.teachers import make_teacher
from teachers_helpers import tiny_hf_model, write_clip

pytestmark = pytest.mark.filterwarnings("ignore")

PACKAGE = Path(__file__).resolve().parents[1] / "microser"


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return files


class _RunsCode:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ---- static checks over microser/ ----------------------------------------------------------------


def test_no_trust_remote_code_anywhere_in_the_package():
    hits = [f"{p.relative_to(PACKAGE.parent)}:{n}" for p in _sources()
            for n, line in enumerate(p.read_text().splitlines(), 1) if "trust_remote_code" in line]
    assert hits == []


def _calls(name: str):
    """(file, line, ast.Call) for every call of ``<something>.<name>(...)`` in microser/."""
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                yield p.name, node.lineno, node


def _keyword(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<not a constant>"
    return None


def test_every_torch_load_is_weights_only():
    loads = [(f, n, c) for f, n, c in _calls("load") if isinstance(c.func.value, ast.Name) and c.func.value.id == "torch"]
    assert loads, "expected torch.load calls (trial weights, compressed models)"
    assert [(f, n) for f, n, c in loads if _keyword(c, "weights_only") is not True] == []


def test_every_from_pretrained_is_weights_only_and_no_pickle_loads():
    calls = list(_calls("from_pretrained"))
    assert calls, "expected the hf teacher's from_pretrained"
    assert [(f, n) for f, n, c in calls if _keyword(c, "weights_only") is not True] == []
    assert [(f, n) for f, n, c in _calls("load") if _keyword(c, "allow_pickle") not in (None, False)] == []
    imports = [(p.name, node.lineno) for p in _sources() for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and isinstance(node.func.value, ast.Name) and node.func.value.id in ("pickle", "dill", "joblib")
               and node.func.attr in ("load", "loads")]
    assert imports == []


# ---- behaviour: checkpoints that would run code are refused, and the code never runs --------------


def test_hf_teacher_refuses_a_pickle_checkpoint_without_running_it(tmp_path):
    folder = tiny_hf_model(tmp_path / "hf")
    marker = tmp_path / "ran"
    (folder / "model.safetensors").unlink()
    torch.save({"wav2vec2.masked_spec_embed": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(MicroserError, match=r"hf teacher .* has a pickle checkpoint that does not load weights-only "
                                            r"\(.*\): use its model.safetensors"):
        make_teacher(f"hf:{folder}")
    assert not marker.exists()


def test_hf_teacher_ignores_remote_code_in_the_model_folder(tmp_path):
    folder = tiny_hf_model(tmp_path / "hf")
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "from transformers import Wav2Vec2Model as EvilModel\n")
    config = folder / "config.json"
    import json

    cfg = json.loads(config.read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilModel"}
    config.write_text(json.dumps(cfg))
    teacher = make_teacher(f"hf:{folder}")       # the microser layout class loads; evil.py is never imported
    assert teacher.identity()["kind"] == "hf"
    assert not marker.exists()


def test_trial_weights_that_would_run_code_are_refused(tmp_path):
    from microser.rungs import load_trial_weights
    from microser.storage import SETTINGS_ATTR, artifact_store, open_storage, save_weights

    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url, "s"))
    study.set_user_attr(SETTINGS_ATTR, {"artifacts": str(tmp_path / "a")})
    weights = save_weights({"w": torch.zeros(2)}, store=artifact_store(tmp_path / "a"), study_or_trial=study, name="t")
    path = tmp_path / "a" / weights["artifact_id"]
    marker = tmp_path / "ran"
    torch.save({"w": _RunsCode(marker)}, path)   # replaced, and its checksum recorded too (a forged study)
    from microser.storage import sha256_file

    study.add_trial(optuna.create_trial(value=0.0, user_attrs={"weights": {**weights, "sha256": sha256_file(path)}}))
    with pytest.raises(MicroserError, match=r"weights of trial 0 at .* are not a plain state dict \(.*\): retrain"):
        load_trial_weights(study, 0)
    assert not marker.exists()


# ---- CSV paths stay under the CSV's folder ------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A clip outside ``tmp_path/in`` (the folder of the CSVs) and one inside it."""
    write_clip(tmp_path / "in" / "ok.wav", 0.5, seed=1)
    return write_clip(tmp_path / "secret.wav", 0.5, seed=2)


def _escapes(outside: Path) -> list[str]:
    return [str(outside), "sub/../../secret.wav", "./../secret.wav"]   # '../secret.wav': tests/test_cache.py


@pytest.mark.parametrize("which", ["audio list", "teacher"])
def test_csv_paths_cannot_escape_their_root_unless_allowed(tmp_path, outside, which):
    import re

    folder = tmp_path / "in"
    (folder / "sub").mkdir()
    teacher = folder / "teacher.csv"
    teacher.write_text("path,arousal,dominance,valence\nok.wav,0.5,0.5,0.5\n")
    audio = folder / "audio.csv"
    audio.write_text("path\nok.wav\n")
    for k, text in enumerate(_escapes(outside)):
        bad = folder / f"bad{k}.csv"
        if which == "audio list":
            bad.write_text(f"path\nok.wav\n{text}\n")
            args = (bad, [f"csv:{teacher}"])
        else:
            bad.write_text(f"path,arousal,dominance,valence\nok.wav,0.5,0.5,0.5\n{text},0.1,0.2,0.3\n")
            args = (audio, [f"csv:{bad}"])
        with pytest.raises(MicroserError, match=re.escape(f"{bad} line 3: path {text!r} leaves the CSV's folder "
                                                          f"{folder}; expected a path relative to it: ")
                           + ".*--allow-absolute-paths"):
            build_cache(*args, tmp_path / f"c{k}")
        assert not (tmp_path / f"c{k}").exists()        # refused before anything was read or written
    # explicitly allowed: the file outside is read and cached under its absolute path
    both = folder / "both.csv"
    both.write_text(f"path,arousal,dominance,valence\nok.wav,0.5,0.5,0.5\n{outside},0.1,0.2,0.3\n")
    cache = Cache.open(build_cache(both, [f"csv:{both}"], tmp_path / "allowed", allow_absolute_paths=True).out)
    assert sorted(it["source"] for it in cache.items) == sorted(["ok.wav", str(outside)])
