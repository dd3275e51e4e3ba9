"""``tolaria nightly`` and ``tolaria academy demo``: arguments, display, exit codes."""

from __future__ import annotations

import io

from rich.console import Console

from nightly_academy import PASSING, nightly_config, record_runs
from tolaria.academy.nightly import run_session, session_lock
from tolaria.academy.nightly_cli import decision, display, print_outcome
from tolaria.cli import main


def test_nothing_to_learn_exits_0_and_says_why(tmp_path, capsys):
    record_runs(tmp_path / "academy", 1)
    assert main(["nightly", "--academy", str(tmp_path / "academy")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("skipped: nothing to learn: 1 recent run(s)")
    assert "nightly session" in err and "champion v0" in err


def test_a_second_session_exits_2_naming_the_first(tmp_path, capsys):
    academy = tmp_path / "academy"
    record_runs(academy, 4)
    with session_lock(academy) as claim:
        claim("20260101T020000Z")
        assert main(["nightly", "--academy", str(academy)]) == 2
    err = capsys.readouterr().err
    assert "a nightly session is already running (session 20260101T020000Z, pid" in err
    assert "Traceback" not in err


def test_a_bad_override_exits_2_in_one_line(tmp_path, capsys):
    code = main(["nightly", "--academy", str(tmp_path), "--set", "academy.nightly.stepz=3"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "tolaria: error: <built-in default>: academy.nightly.stepz: unknown key")


def test_a_line_per_step_then_the_gates_against_their_thresholds(tmp_path):
    academy = tmp_path / "academy"
    record_runs(academy, 4)
    progress, result = io.StringIO(), io.StringIO()
    record = run_session(academy, nightly_config(), jobs=PASSING,
                         listener=display(Console(file=progress, width=200)))
    lines = progress.getvalue().splitlines()
    assert lines[0] == f"nightly session {record['session']}: champion v0"
    assert lines[1] == "replay: 18 recent decision points to learn from, 6 held out, 0 history " \
                       "(4 recent runs)"
    assert [line.split(" ")[0] for line in lines[2:]] == [
        "snapshot", "snapshot:", "train", "train:", "validate", "validate:", "deploy",
        "registered", "deploy:"]
    assert lines[-1] == "deploy: ok (v1 promoted)"
    print_outcome(record, Console(file=result, width=120))
    text = result.getvalue()
    assert "diversity_score" in text and "0.7000" in text and "> 0.4" in text
    assert text.strip().endswith("deployed: v1 is the champion (was v0)")


def test_each_outcome_is_one_decision_line():
    record = {"champion": "v2", "candidate": "v3", "failed_gate": "history_score",
              "cause": "tolaria.academy.adapter:train_job timed out after 1800 s"}
    assert decision({**record, "status": "rejected"}) == (
        "rejected: v3 failed gate history_score; v2 stays champion")
    assert decision({**record, "status": "failed", "candidate": None}) == (
        "failed: tolaria.academy.adapter:train_job timed out after 1800 s; v2 stays champion")
    assert decision({**record, "status": "failed"}).endswith("(v3 registered, never promoted)")


def test_the_demo_refuses_a_negative_number_of_runs(tmp_path, capsys):
    assert main(["academy", "demo", "--dir", str(tmp_path / "d"), "--runs", "-1"]) == 2
    assert "--runs -1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
