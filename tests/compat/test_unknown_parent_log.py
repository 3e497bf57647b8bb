"""An unknown parent is logged once per pod per period with the count, not only counted."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from kvindex_service.events.eventlog import ParentLog


@dataclass
class St:
    pod: str
    unknown_parents: int


def test_unknown_parents_are_logged_per_pod_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.parents")
    pl = ParentLog(log, every=60.0)
    states = [St("a", 0), St("b", 3)]
    t0 = pl.next_at
    with caplog.at_level(logging.WARNING, logger="test.parents"):
        pl.poll(t0 - 1, lambda: states)  # not due yet
        assert not caplog.records
        pl.poll(t0, lambda: states)
        assert [r.getMessage() for r in caplog.records] == [
            "pod b: 3 stored event(s) with an unknown parent in the last 60s (missed events?): not indexed"
        ]
        caplog.clear()
        states = [St("a", 2), St("b", 10)]
        pl.poll(t0 + 30, lambda: states)  # within the period: nothing, however much came
        assert not caplog.records
        pl.poll(t0 + 60, lambda: states)
        assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == ["pod a", "pod b"]
        assert "pod b: 7 stored" in caplog.text and "pod a: 2 stored" in caplog.text
        caplog.clear()
        pl.poll(t0 + 120, lambda: states)  # no new unknown parent: silent
        assert not caplog.records
        # a pod removed and back starts from zero again
        pl.poll(t0 + 180, lambda: [St("b", 1)])
        assert "pod b: 1 stored" in caplog.text
