"""The command line's surface: light start-up (no torch, no optuna), choices listed by --help, renamed options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compress_helpers import build_tiny_cache
from microser.cache import SPLITS
from microser.search_config import RAM_MODES, SAMPLERS

REPO = Path(__file__).resolve().parent.parent

# Runs `main(argv)` in a fresh interpreter, then prints which heavy libraries it imported.
_RUN = """
import json, sys
from microser.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({"torch": "torch" in sys.modules, "optuna": "optuna" in sys.modules}))
"""


def _run(*argv: str, columns: int = 200) -> tuple[str, dict]:
    out = subprocess.run([sys.executable, "-c", _RUN, *argv], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "COLUMNS": str(columns), "PYTHONPATH": str(REPO)})
    *text, last = out.stdout.rstrip("\n").split("\n")
    return "\n".join(text), json.loads(last)


def test_importing_the_cli_loads_neither_torch_nor_optuna():
    code = "import sys, microser.cli; print('torch' in sys.modules, 'optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_help_and_cache_info_run_without_torch_or_optuna(tmp_path):
    text, loaded = _run("--help")
    assert "search" in text and "cache" in text and loaded == {"torch": False, "optuna": False}
    text, loaded = _run("cache", "info", "--help")
    assert "Cache folder" in text and loaded == {"torch": False, "optuna": False}
    cache = build_tiny_cache(tmp_path)
    text, loaded = _run("cache", "info", str(cache), "--json")
    assert json.loads(text)["items"] > 0 and loaded == {"torch": False, "optuna": False}


@pytest.mark.parametrize("argv, choices", [
    (("search", "--help"), SAMPLERS), (("search", "--help"), RAM_MODES), (("describe", "--help"), RAM_MODES),
    (("evaluate", "--help"), SPLITS)])
def test_help_lists_the_choices_of_fixed_choice_options(argv, choices):
    text, _ = _run(*argv)
    assert "<" + "|".join(choices) + ">" in text


def test_renamed_options_are_refused_under_their_old_names_and_listed_in_the_readme():
    text, _ = _run("compress", "--help")
    assert "--prune-steps" in text and "--steps " not in text
    text, _ = _run("cache", "build", "--help")
    assert "--teacher-batch-size" in text and "--batch-size " not in text
    out = subprocess.run([sys.executable, "-c", _RUN, "compress", "--study", "s", "--trial", "0", "--steps", "3"],
                         cwd=REPO, capture_output=True, text=True)
    assert "No such option: --steps" in out.stderr
    readme = (REPO / "README.md").read_text()
    changelog = readme[readme.index("## Changelog"):]
    for old, new in (("compress --steps", "--prune-steps"), ("cache build --batch-size", "--teacher-batch-size"),
                     ("search --timeout", "--time"), ("search --steps", "--rungs")):
        assert old in changelog and new in changelog, (old, new)
