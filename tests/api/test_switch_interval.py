"""``http.gil_switch_interval``: set while the app serves, restored when it stops."""

from __future__ import annotations

import sys

import pytest

from kvindex_service.config import Settings
from tests.api.helpers import LiveServer, make_settings


def test_serving_sets_and_restores_the_switch_interval() -> None:
    before = sys.getswitchinterval()
    settings = make_settings()
    settings.http.gil_switch_interval = 0.002
    server = LiveServer(settings)
    server.start()
    try:
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        server.stop()
    assert sys.getswitchinterval() == pytest.approx(before)


@pytest.mark.parametrize("bad", [0, -1, 1.0])
def test_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="gil_switch_interval"):
        Settings.model_validate({"http": {"gil_switch_interval": bad}})
