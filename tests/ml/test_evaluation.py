"""Event-level precision, recall and delay of decisions against labelled faults."""

from __future__ import annotations

import pytest

from edgeloop.ml.evaluation import fault_detection, runs


def flags(text: str) -> list[bool]:
    return [c == "x" for c in text]


def test_runs() -> None:
    assert runs(flags("..xx.x..xxx")) == [(2, 3), (5, 5), (8, 10)]
    assert runs(flags("")) == []


def test_detected_missed_and_false_alarms() -> None:
    labels = flags("...xxxx.....xxxx......")
    decide = flags("x....xx...........x...")
    result = fault_detection(labels, decide)
    assert (result.episodes, result.detected, result.alarms, result.false_alarms) == (2, 1, 3, 2)
    assert result.delays == (2,)
    assert result.recall == 0.5
    assert result.precision == pytest.approx(1 / 3)
    assert result.mean_delay == 2.0


def test_grace_counts_an_alarm_just_after_the_fault() -> None:
    labels = flags("..xx.....")
    decide = flags(".....x...")
    assert fault_detection(labels, decide).detected == 0
    late = fault_detection(labels, decide, grace=2)
    assert (late.detected, late.false_alarms, late.delays) == (1, 0, (3,))


def test_nothing_to_find_and_nothing_found() -> None:
    result = fault_detection(flags("...."), flags("...."))
    assert (result.recall, result.precision, result.mean_delay) == (1.0, 1.0, None)


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="3 labels but 2"):
        fault_detection(flags("..."), flags(".."))
