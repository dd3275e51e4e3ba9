"""The collector behind docs/reliability.md: the table it writes is the one it checks."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from drills import Report


def session(*, whole_suite: bool = True) -> Report:
    source = pytest.Config.ArgsSource.TESTPATHS if whole_suite else pytest.Config.ArgsSource.ARGS
    report = Report(SimpleNamespace(args_source=source))
    report.record("kill -9 | anywhere", trials=10, survived=9, exact=9, notes="1 refused")
    report.record("damaged checkpoint", trials=9, survived=9, bad_inputs="flip, cut")
    return report


def test_a_written_table_agrees_with_the_session_that_wrote_it():
    report = session()
    text = report.render()
    assert "| kill -9 \\| anywhere | 10 | 9 | 9 | — | 1 refused |" in text
    assert "| damaged checkpoint | 9 | 9 | — | flip, cut |  |" in text
    assert report.check(text) == []


def test_a_changed_trial_count_or_a_new_drill_is_drift():
    written = session().render()
    report = session()
    report.rows[1] = dataclasses.replace(report.rows[1], trials=12)
    report.record("planted pickle", trials=5, survived=5)
    assert report.check(written) == [
        "'damaged checkpoint': 12 trials, the document says 9",
        "'planted pickle': 5 trials, the document says nothing",
    ]


@pytest.mark.parametrize("whole_suite", [True, False])
def test_a_row_no_drill_produced_is_drift_only_when_every_drill_ran(whole_suite):
    written = session().render()
    report = session(whole_suite=whole_suite)
    report.rows.pop()
    expected = ["'damaged checkpoint': in the document, not produced by any drill"]
    assert report.check(written) == (expected if whole_suite else [])


def test_a_drill_records_its_row_once():
    with pytest.raises(ValueError, match="recorded twice"):
        session().record("damaged checkpoint", trials=1, survived=1)
