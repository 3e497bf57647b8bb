"""Helpers for the event-ingestion tests: real PUB/ROUTER sockets on loopback, the real core.

ZMQ's slow joiner: a SUB only gets messages published after its subscription reached the PUB.
``Publisher.probe`` sends a one-frame message (counted as malformed and skipped by the
subscriber, touching no pod) until the subscriber has received one, so every later message on
that connection is delivered; no fixed sleeps.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import zmq

from kvindex_service import Indexer
from kvindex_service.events import Subscriber

Ctx = zmq.Context[zmq.Socket[bytes]]

WAIT = 20.0
"""Generous deadline for conditions that normally hold within milliseconds."""
PROBE = [b"kv@probe"]


def wait_until(pred: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def make_indexer(capture: dict[str, Any] | None = None, **kw: Any) -> Indexer:
    if capture is not None:
        kw.setdefault("hash_seed", capture["pythonhashseed"])
        kw.setdefault("algorithm", capture["hash_algo"])
        kw.setdefault("block_size", capture["block_size"])
    kw.setdefault("shards", 2)
    return Indexer(**kw)


def matched(ix: Indexer, model: str, tokens: list[int], pod: str) -> int:
    scores = ix.score(model, tokens, pods=[pod]).scores
    return next(s.matched_blocks for s in scores if s.pod == pod)


def check_expect(
    ix: Indexer, capture: dict[str, Any], expect: dict[str, dict[str, int]], rename: dict[str, str] | None = None
) -> None:
    for pod, per_prompt in expect.items():
        name = (rename or {}).get(pod, pod)
        for prompt, blocks in per_prompt.items():
            got = matched(ix, capture["model"], capture["prompts"][prompt], name)
            assert got == blocks, f"{name} {prompt}: {got} blocks, expected {blocks}"


class Publisher:
    """A PUB socket standing in for one vLLM pod (or several, in bind mode)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        bind: bool = True,
        connect_to: str | None = None,
        sndhwm: int = 100_000,
    ) -> None:
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        if connect_to is not None:
            self.socket.connect(connect_to)
            self.endpoint = connect_to
        else:
            self.socket.bind("tcp://127.0.0.1:*")
            self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def probe(self, sub: Subscriber) -> None:
        """Make sure the subscription has propagated (see module doc). Watches the probes'
        own counter (one-frame messages are malformed frames), not messages in general: a
        probe sent after a burst is only seen once everything published before it was."""
        start = sub.stats()["malformed_frames"]
        deadline = time.monotonic() + WAIT
        while sub.stats()["malformed_frames"] == start:
            if time.monotonic() > deadline:
                raise AssertionError(f"subscription to {self.endpoint} never propagated")
            self.socket.send_multipart(PROBE)
            wait_for = time.monotonic() + 0.05
            while sub.stats()["malformed_frames"] == start and time.monotonic() < wait_for:
                time.sleep(0.001)

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def send_wait(self, sub: Subscriber, frames: list[bytes]) -> None:
        """Publish one message and wait until the subscriber received and applied it."""
        before = sub.stats()["messages_received"]
        self.socket.send_multipart(frames)
        wait_until(lambda: sub.stats()["messages_received"] > before, what="message arrival")
        assert sub.sync(WAIT)

    def close(self) -> None:
        self.socket.close(linger=0)


class Router:
    """A real ROUTER standing in for vLLM's replay endpoint, serving canned reply frames.

    ``replies(start_seq)`` gives the frames to send (each a list without the identity).
    ``ignore_first`` requests are read and left unanswered (a slow or lost reply); with
    ``hold`` set, replies wait until ``release()``.
    """

    def __init__(
        self, replies: Callable[[int], list[list[bytes]]], *, ignore_first: int = 0, hold: bool = False
    ) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replies = replies
        self.ignore_first = ignore_first
        self.requests: list[list[bytes]] = []
        self.received = threading.Event()
        self._release = threading.Event()
        if not hold:
            self._release.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._release.set()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            ident, *request = self.socket.recv_multipart()
            self.requests.append(request)
            self.received.set()
            if len(self.requests) <= self.ignore_first:
                continue
            while not self._release.wait(0.02):
                if self._stop.is_set():
                    return
            start = int.from_bytes(request[1], "big") if len(request) == 2 else 0
            for frames in self.replies(start):
                self.socket.send_multipart([ident, *frames])

    def close(self) -> None:
        self._stop.set()
        self._release.set()
        self._thread.join(10)
        self.socket.close(linger=0)
        self.ctx.term()


def fixture_replies(capture: dict[str, Any]) -> list[list[bytes]]:
    """The capture's real replay reply frames, decoded."""
    return [
        [base64.b64decode(f) for f in frames]
        for frames in capture["replay_from_seq_2_of_first_pod"]["reply_frames_b64"]
    ]


def fixture_request(capture: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(f) for f in capture["replay_from_seq_2_of_first_pod"]["request_frames_b64"]]


def stored_batch(hashes: list[int], parent: int | None, tokens: list[int], ts: float = 1.0) -> bytes:
    """A vLLM >= 0.24 map-encoded batch with one BlockStored (None-valued fields omitted)."""
    event: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "token_ids": tokens,
        "block_size": 16,
        "medium": "GPU",
    }
    if parent is not None:
        event["parent_block_hash"] = parent
    return msgpack.packb([ts, [event], 0])


def removed_batch(hashes: list[int], ts: float = 1.0) -> bytes:
    return msgpack.packb([ts, [{"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}], 0])


class Rig:
    """What an event test builds (indexers, publishers, subscribers, replay routers), torn down
    in a safe order when the test ends: subscribers stop before the sockets and indexers they
    use are closed."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._indexers: list[Indexer] = []
        self._publishers: list[Publisher] = []
        self._subscribers: list[Subscriber] = []
        self._routers: list[Router] = []

    def indexer(self, capture: dict[str, Any] | None = None, **kw: Any) -> Indexer:
        ix = make_indexer(capture, **kw)
        self._indexers.append(ix)
        return ix

    def publisher(self, **kw: Any) -> Publisher:
        pub = Publisher(self.ctx, **kw)
        self._publishers.append(pub)
        return pub

    def subscriber(self, ix: Any, *, probe: Iterable[Publisher] = (), start: bool = True, **kw: Any) -> Subscriber:
        """A subscriber (started unless ``start=False``) that has heard every ``probe``.

        Peer verification is off unless a test asks for it: the captured fixtures name pods
        like ``10.0.0.1:8000`` and are published from 127.0.0.1."""
        kw.setdefault("verify_peer", False)
        sub = Subscriber(ix, **kw)
        self._subscribers.append(sub)
        if start:
            sub.start()
        for pub in probe:
            pub.probe(sub)
        return sub

    def bound_publisher(self, sub: Subscriber, **kw: Any) -> Publisher:
        """A publisher connected to ``sub``'s bound endpoint, with its subscription probed."""
        assert sub.bound_endpoint is not None
        pub = self.publisher(connect_to=sub.bound_endpoint, **kw)
        pub.probe(sub)
        return pub

    def router(self, replies: Callable[[int], list[list[bytes]]], **kw: Any) -> Router:
        router = Router(replies, **kw)
        self._routers.append(router)
        return router

    def close(self) -> None:
        for sub in self._subscribers:
            sub.stop()
        for router in self._routers:
            router.close()
        for pub in self._publishers:
            pub.close()
        for ix in self._indexers:
            ix.close()
