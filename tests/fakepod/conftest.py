from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakepod.support import Service


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    svc = Service()
    try:
        yield svc
    finally:
        svc.close()
