"""Pareto front, counts and plots on a hand-made study whose front is known by construction."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from microser.errors import MicroserError
from microser.pareto import front_report, non_dominated, plot_front, plot_front_html, trial_detail
from microser.rungs import FINAL, Job, RungQueue
from microser.storage import SETTINGS_ATTR

pytestmark = pytest.mark.filterwarnings("ignore")


def _ccc(x):
    return {"arousal": x, "dominance": x, "valence": x, "mean": x}


def _trial(number_ccc, params, ram, onnx_bytes, *, rejected=None, reference=None, violation=0.0):
    attrs = {"family": "wav2small", "summary": f"w2s p{params}", "train_seconds": 1.5,
             "costs": {"params": params, "ram_bytes": ram, "onnx_bytes": onnx_bytes, "macs": 10 * params}}
    if rejected:
        attrs["rejected"] = rejected
        attrs["ccc"] = _ccc(-1.0)
    else:
        attrs["ccc"] = _ccc(number_ccc)
    if reference:
        attrs["reference"] = reference
    return create_trial(values=[attrs["ccc"]["mean"], params, ram], user_attrs=attrs,
                        system_attrs={"constraints": [violation]})


@pytest.fixture
def study():
    """Trials 0..5 feasible; by hand the (ccc, params, ram) front is {0, 1, 3, 5}.

    0: .50 @ 1k params, 40k RAM   front (cheapest)
    1: .60 @ 2k, 30k              front
    2: .55 @ 3k, 35k              dominated by 1 (lower CCC, more params and RAM)
    3: .70 @ 5k, 80k              front
    4: .65 @ 6k, 90k              dominated by 3
    5: .72 @ 9k, 20k              front (best CCC, least RAM)
    6: rejected over budget; 7: infeasible (constraint 5 > 0); 8: reference; 9: failed
    """
    s = optuna.create_study(directions=["maximize", "minimize", "minimize"], study_name="hand")
    s.set_user_attr(SETTINGS_ATTR, {"objectives": ["params", "ram_bytes"],
                                    "budgets": [{"metric": "params", "limit": 10000, "text": "10k-params"}]})
    for ccc, p, r in [(.50, 1000, 40000), (.60, 2000, 30000), (.55, 3000, 35000), (.70, 5000, 80000),
                      (.65, 6000, 90000), (.72, 9000, 20000)]:
        s.add_trial(_trial(ccc, p, r, 4 * p + 2000))
    s.add_trial(_trial(None, 50000, 1000, 200000, rejected="over budget: params 50000 > 10000", violation=40000))
    s.add_trial(_trial(.99, 15000, 1000, 62000, violation=5000))
    s.add_trial(_trial(.66, 11000, 300000, 46000, reference="wav2small-ref"))
    s.add_trial(create_trial(state=TrialState.FAIL))
    return s


def test_non_dominated_matches_a_brute_force_check():
    rng = np.random.default_rng(0)
    scores, costs = rng.random(40), rng.random((40, 2))
    mask = non_dominated(scores, costs)
    for i in range(40):
        dominated = any(scores[j] >= scores[i] and np.all(costs[j] <= costs[i])
                        and (scores[j] > scores[i] or np.any(costs[j] < costs[i])) for j in range(40))
        assert mask[i] == (not dominated)


def test_front_counts_and_references_match_the_hand_made_study(study):
    report = front_report(study, level="first")
    assert [r.number for r in report.front] == [0, 1, 3, 5]
    assert [r.number for r in report.references] == [8]
    assert report.counts["feasible"] == 6
    assert report.counts["rejected"] == 1
    assert report.counts["infeasible"] == 1
    assert report.counts["failed"] == 1
    assert report.budgets == {"params": 10000.0}
    # per-panel 2-D fronts, by hand: CCC vs params {0,1,3,5}; vs RAM only 5 (best CCC and least RAM);
    # vs ONNX bytes (4 x params + 2000) the same as params
    assert report.panel_fronts == {"params": [0, 1, 3, 5], "ram_bytes": [5], "onnx_bytes": [0, 1, 3, 5]}


def _evaluated(study, number, rung, steps, seed, ccc):
    """A completed evaluation in the study's companion (what `microser search` records after the first rung)."""
    job = Job(of=number, rung=rung, steps=steps, seed=seed, fold=seed)
    RungQueue(study).queue.add_trial(create_trial(value=ccc, user_attrs={
        "job": job.to_dict(), "key": job.key, "ccc": _ccc(ccc), "test_ccc": _ccc(ccc - .1)}))


def test_each_level_is_its_own_front_never_two_fidelities_on_one_axis(study):
    study.set_user_attr(SETTINGS_ATTR, {**study.user_attrs[SETTINGS_ATTR], "fidelity": {"rungs": [60, 200]}})
    for n, ccc in ((1, .62), (3, .74), (5, .70)):
        _evaluated(study, n, 1, 200, 0, ccc)
    for n, (a, b) in ((3, (.75, .77)), (5, (.80, .78)), (8, (.60, .62))):
        _evaluated(study, n, FINAL, 1000, 0, a)
        _evaluated(study, n, FINAL, 1000, 1, b)
    auto = front_report(study)                     # the highest level at least 3 feasible trials reached
    assert auto.level == "200" and auto.levels == {"60": 6, "200": 3, "final": 2}
    assert {r.number: r.ccc["mean"] for r in auto.feasible} == {1: .62, 3: .74, 5: .70}
    assert {r.level for r in auto.feasible} == {"200"} and [r.number for r in auto.front] == [1, 3, 5]
    assert auto.references == []                   # the reference skipped the middle rung: not drawn there
    final = front_report(study, level="final")
    assert {r.number: round(r.ccc["mean"], 6) for r in final.feasible} == {3: .76, 5: .79}
    assert {r.number: round(r.ccc_std["mean"], 6) for r in final.feasible} == {3: .01, 5: .01}
    assert [r.number for r in final.references] == [8] and round(final.references[0].ccc["mean"], 6) == .61
    first = front_report(study, level="first")
    assert first.level == "60" and [r.number for r in first.front] == [0, 1, 3, 5]
    assert {r.number: r.levels for r in first.feasible}[3] == {"60": .70, "200": .74, "final": pytest.approx(.76)}
    with pytest.raises(MicroserError, match=r"level '999' is not one of this study's levels \(60, 200, final\)"):
        front_report(study, level="999")


def test_png_is_written_and_draws_exactly_the_json_points(study, tmp_path):
    report = front_report(study, level="first")
    points = json.loads(json.dumps(report.to_dict()))["points"]
    drawn = plot_front(report, tmp_path / "front.png")
    png = tmp_path / "front.png"
    assert png.stat().st_size > 10_000
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 500 and image.shape[1] > 1500
    assert image[..., :3].std() > 0.05  # not a blank canvas
    for key in ("params", "ram_bytes", "onnx_bytes"):
        expected = sorted((p["number"], float(p[key]), float(p["ccc"])) for p in points)
        assert sorted(drawn[key]) == expected
    assert {p["number"] for p in points} == {0, 1, 2, 3, 4, 5, 8}


def test_html_plot_holds_the_same_points(study, tmp_path):
    report = front_report(study, level="first")
    plot_front_html(report, tmp_path / "front.html")
    text = (tmp_path / "front.html").read_text()
    assert "plotly" in text.lower()
    for p in report.to_dict()["points"]:
        assert f"#{p['number']} " in text


def test_show_trial_in_full_and_unknown_trial_is_a_clear_error(study):
    detail = trial_detail(study, 3)
    assert detail["state"] == "COMPLETE" and detail["summary"] == "w2s p5000"
    assert detail["user_attrs"]["costs"]["params"] == 5000 and detail["values"] == [0.70, 5000, 80000]
    with pytest.raises(MicroserError, match="trial 42 is not in study 'hand'"):
        trial_detail(study, 42)


def test_cli_pareto_json_equals_the_library_and_writes_the_plot(study, tmp_path, capsys):
    from microser.cli import main

    url = f"sqlite:///{tmp_path}/hand.db"
    stored = optuna.create_study(storage=url, study_name="hand", directions=study.directions)
    for key, value in study.user_attrs.items():
        stored.set_user_attr(key, value)
    stored.add_trials(study.trials)
    main(["pareto", "--study", "hand", "--storage", url, "--rung", "first", "--plot", str(tmp_path / "p.png"),
          "--json"])
    printed = json.loads(capsys.readouterr().out)
    expected = json.loads(json.dumps(front_report(study, level="first").to_dict()))
    assert printed["points"] == expected["points"]
    assert [r["number"] for r in printed["front"]] == [0, 1, 3, 5]
    assert (tmp_path / "p.png").stat().st_size > 10_000
    main(["trials", "--study", "hand", "--storage", url, "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["number"] for r in rows] == list(range(10))
    assert rows[6]["rejected"].startswith("over budget") and rows[8]["reference"] == "wav2small-ref"
    with pytest.raises(SystemExit) as exit_info:
        main(["show", "--study", "hand", "--storage", url, "--trial", "99"])
    assert exit_info.value.code == 2
    assert "trial 99 is not in study 'hand'" in capsys.readouterr().err


def test_plotting_a_study_without_points_is_a_clear_error(tmp_path):
    empty = optuna.create_study(directions=["maximize", "minimize", "minimize"], study_name="empty")
    empty.add_trial(create_trial(state=TrialState.FAIL))
    with pytest.raises(MicroserError, match=r"study 'empty' has no feasible trial .*1 failed"):
        plot_front(front_report(empty), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


_LONG = "w2s 13x7 k3 bn pool@2 att+gram | stft64/32 m26 log clip"   # wav2small-ref's summary, 55 characters


def _stored_with_long_summaries(study, tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/hand.db"
    stored = optuna.create_study(storage=url, study_name="hand", directions=study.directions)
    for key, value in study.user_attrs.items():
        stored.set_user_attr(key, value)
    trials = study.trials
    for t in trials:
        if "summary" in t.user_attrs:
            t.user_attrs["summary"] = f"{_LONG} #{t.number}"
    stored.add_trials(trials)
    return url


def _cli_at_80_columns(*argv) -> list[str]:
    """``microser ARGV`` in a fresh process, stdout piped, COLUMNS=80: its lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    code = "import sys; from microser.cli import main; main(sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=repo, capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "80", "PYTHONPATH": str(repo)})
    return out.stdout.splitlines()


def _row_lines(lines: list[str], number: int) -> list[str]:
    """Trial ``number``'s row: the line whose first cell is the number, and the folded lines below it."""
    def first_cell(line: str) -> str:
        return line.split("│")[1].strip() if line.startswith("│") else "?"

    start = next(k for k, line in enumerate(lines) if first_cell(line) == str(number))
    end = next((k for k in range(start + 1, len(lines)) if first_cell(lines[k]) != ""), len(lines))
    return lines[start:end]


def test_pareto_and_trials_stay_readable_at_80_columns_and_wide_shows_every_column(study, tmp_path):
    url = _stored_with_long_summaries(study, tmp_path)
    cccs = {0: .50, 1: .60, 3: .70, 5: .72, 8: .66}
    lines = _cli_at_80_columns("pareto", "--study", "hand", "--storage", url, "--rung", "first")
    assert max(len(line) for line in lines) <= 80
    for number, ccc in cccs.items():     # the front and the reference: CCC whole, with 3 decimals, on the row
        row = _row_lines(lines, number)
        assert f" {ccc:.3f} " in row[0], row
        assert "w2s 13x7" in "".join(row), row    # the architecture folds in words' worth, not a character a line
    assert "reference wav2small-ref" in "\n".join(lines)
    lines = _cli_at_80_columns("trials", "--study", "hand", "--storage", url, "--rung", "first")
    assert max(len(line) for line in lines) <= 80
    for number in range(9):              # every trial with a summary: its CCC on its row (rejected: none)
        ccc = {2: .55, 4: .65, 7: .99}.get(number, cccs.get(number))
        row = _row_lines(lines, number)
        assert (f" {ccc:.3f} " if ccc else " COMPLETE │     - │") in row[0], row
        assert "w2s 13x7" in "".join(row), row
    assert "over budget: params 50000 > 10000" in " ".join(line.strip("│ ") for line in lines)
    wide = _cli_at_80_columns("pareto", "--study", "hand", "--storage", url, "--rung", "first", "--wide")
    header = next(line for line in wide if "ONNX KB" in line)
    assert all(name in header for name in ("family", "A", "D", "V", "MACs", "train s"))
    assert any(f"{_LONG} #3" in line for line in wide)   # every column whole: the summary on one line
