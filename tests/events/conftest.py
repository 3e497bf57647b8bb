"""Fixtures for the event-ingestion tests (helpers live in ``tests.events.helpers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from tests.events.helpers import Rig


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A context for the test's publishers; every socket is closed before it terminates."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def rig(zctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Rig]:
    """Builds the test's indexers, publishers, subscribers and routers; tears them all down."""
    built = Rig(zctx)
    try:
        yield built
    finally:
        built.close()
