"""Socket hygiene with real sockets: reconnect backoff against a peer that accepts and closes,
and every socket closed (and the context terminable) when libzmq runs out of sockets."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq

from kvindex_service.events.admission import SubscribeError
from kvindex_service.events.links import Links, Reconnect
from kvindex_service.events.replay import ReplaySettings
from kvindex_service.events.topic import PodEndpoint
from tests.events.helpers import Rig, wait_until


class AcceptAndClose:
    """A TCP listener that accepts every connection and closes it at once, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepts += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


def test_reconnects_back_off_against_a_peer_that_accepts_and_closes(rig: Rig) -> None:
    peer = AcceptAndClose()
    try:
        sub = rig.subscriber(rig.indexer())
        sub.add_pod(f"tcp://127.0.0.1:{peer.port}", pod_id="10.0.0.1:8000")
        wait_until(lambda: peer.accepts >= 1, what="the first connection")
        start = peer.accepts
        time.sleep(2.0)
        accepts = peer.accepts - start
        # Without backoff the subscriber re-dialled at once on every drop (~1,000 in 2 s);
        # with 100 ms doubling to 5 s it is a handful.
        assert accepts <= 30, accepts
        assert sub.stats()["reconnects"] >= 1
    finally:
        peer.close()


def test_reconnect_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        Reconnect(ivl=1.0, ivl_max=0.5)
    with pytest.raises(ValueError):
        Reconnect(ivl=0.0, ivl_max=1.0)


def test_socket_exhaustion_closes_every_socket_and_shuts_down() -> None:
    """libzmq's per-context socket cap reached mid-subscription: a clean ``SubscribeError``,
    no half-registered socket, and closing the context still returns."""
    links = Links(
        lock=threading.Lock(),
        rcvhwm=1000,
        replay=ReplaySettings(timeout=1.0, retries=0, backoff=0.1, rcvhwm=1000, max_message_bytes=1 << 20),
        prefix=b"kv@",
        timeout=5.0,
        max_pods=1,  # a small socket cap: 4 * 1 + 64
    )
    links.open(None)
    assert links.ctx is not None
    made = 0
    with pytest.raises(SubscribeError):
        for port in range(20000, 20200):
            links.connect(PodEndpoint(f"tcp://127.0.0.1:{port}"))
            made += 1
    assert 10 < made < 100
    # every registered socket belongs to a complete link; nothing is left half-made
    polled = {s for s in links.owners if isinstance(s, zmq.Socket)}
    assert len(polled) == 2 * made == 2 * len(links.conns)
    done = threading.Event()
    closer = threading.Thread(target=lambda: (links.close(), done.set()), daemon=True)
    closer.start()
    assert done.wait(10), "closing the sockets and the context hung"
