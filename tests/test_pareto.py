"""Pareto front, counts and plots on a hand-made study whose front is known by construction."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from microser.errors import MicroserError
from microser.pareto import front_report, non_dominated, plot_front, plot_front_html, trial_detail
from microser.storage import FINAL_PREFIX, SETTINGS_ATTR

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
    report = front_report(study, stage="search")
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


def test_final_stage_ccc_replaces_search_ccc_and_moves_the_front(study):
    study.set_user_attr(f"{FINAL_PREFIX}2", {"ccc": _ccc(0.80)})  # retrained: now the best CCC
    final = front_report(study, stage="final")
    by_number = {r.number: r for r in final.feasible}
    assert by_number[2].ccc_stage == "final" and by_number[2].ccc["mean"] == 0.80
    assert by_number[1].ccc_stage == "search"
    # 2 (.80 @ 3k, 35k) now dominates 3 (.70 @ 5k, 80k); 5 keeps the least RAM
    assert [r.number for r in final.front] == [0, 1, 2, 5]
    assert [r.number for r in front_report(study, stage="search").front] == [0, 1, 3, 5]


def test_png_is_written_and_draws_exactly_the_json_points(study, tmp_path):
    report = front_report(study, stage="search")
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
    report = front_report(study, stage="search")
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
    main(["pareto", "--study", "hand", "--storage", url, "--stage", "search", "--plot", str(tmp_path / "p.png"),
          "--json"])
    printed = json.loads(capsys.readouterr().out)
    expected = json.loads(json.dumps(front_report(study, stage="search").to_dict()))
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
