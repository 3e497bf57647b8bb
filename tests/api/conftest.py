"""Fixtures for the HTTP API tests: one live server per module (see ``helpers``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
import zmq

from tests.api.helpers import LiveServer, Publisher, make_settings


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    server = LiveServer(make_settings())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30.0) as c:
        live_server.wait_ready(c)
        yield c


@pytest.fixture
def publishers(live_server: LiveServer) -> Iterator[Callable[[], Publisher]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    made: list[Publisher] = []

    def make() -> Publisher:
        pub = Publisher(ctx, live_server.zmq_endpoint)
        made.append(pub)
        return pub

    try:
        yield make
    finally:
        for pub in made:
            pub.close()
        ctx.term()
