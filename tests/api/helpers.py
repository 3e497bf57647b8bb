"""A real kvindex app under uvicorn on an ephemeral port, and real ZMQ publishers.

The server runs in a thread with its own event loop; the listening socket is bound here
(port 0) before uvicorn starts, so the port is known without parsing logs. The ZMQ SUB binds
``tcp://127.0.0.1:*`` and the runtime reports the endpoint it got.

Publishers are XPUB sockets (wire-compatible with vLLM's PUB) so a test can wait until the
subscriber's subscription has arrived before sending: a plain PUB would silently drop the
first messages (ZMQ's slow-joiner).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn
import zmq

from kvindex_service.api import create_app
from kvindex_service.config import Settings
from kvindex_service.runtime import Runtime

MODEL = "meta-llama/Llama-3.2-3B-Instruct"


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Settings for a loopback test server; environment variables are not read."""
    base: dict[str, Any] = {
        "http": {"host": "127.0.0.1", "port": 0},
        # verify_peer off: the captured fixtures name pods like 10.0.0.1:8000, sent from 127.0.0.1
        "zmq": {"bind": "tcp://127.0.0.1:*", "replay_timeout": 0.2, "replay_retries": 0, "verify_peer": False},
        "index": {"hash_seed": "42", "shards": 2},
        "tokenizers": {"max_workers": 2},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return Settings.model_validate(base)


class LiveServer:
    """uvicorn serving ``create_app(settings)`` in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.runtime: Runtime = self.app.state.runtime
        # IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted connections (see kvindex cli).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="test-uvicorn", daemon=True
        )

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    @property
    def zmq_endpoint(self) -> str:
        sub = self.runtime.subscriber
        assert sub is not None and sub.bound_endpoint is not None
        return sub.bound_endpoint

    def wait_ready(self, client: httpx.Client, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.02)


class Publisher:
    """One vLLM-like publisher: an XPUB connected to the indexer's SUB endpoint."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, timeout: float = 10.0) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(endpoint)
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            self.sock.close(linger=0)
            raise TimeoutError("the subscriber never subscribed")
        self.sock.recv()  # the subscription message

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; the deadline only guards against hangs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
