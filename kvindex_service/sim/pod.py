"""A simulated vLLM pod: a prefix-caching block pool and a real vLLM-format event publisher.

The pool reproduces the parts of vLLM's v1 KV cache manager that decide what a router can
gain: full blocks are hashed and shared between requests, blocks of a running request are
pinned, a finished request's blocks go to an LRU free queue (tail of the sequence first, so
the tail is evicted first) where they stay cached until allocation reuses them, and every
change is published as a ``BlockStored`` / ``BlockRemoved`` event on a real ZMQ socket in
vLLM's wire format. kvindex can then ingest a simulated fleet exactly as it ingests a real one.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, islice, repeat, takewhile
from operator import not_
from typing import Any

import msgpack  # type: ignore[import-untyped]
import zmq

from kvindex_service import TokenProcessor

__all__ = [
    "Allocation",
    "BlockPool",
    "EventPublisher",
    "SimPod",
    "block_removed",
    "block_stored",
]

log = logging.getLogger(__name__)

_END_OF_REPLAY = b"\xff" * 8
_consume: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend
"""Exhausts an iterator in C (for ``map`` over bound methods)."""


def block_stored(keys: Sequence[int], parent: int | None, token_ids: Sequence[int], block_size: int) -> dict[str, Any]:
    """A ``BlockStored`` event as vLLM >= 0.24 map-encodes it (the 0.33 field set)."""
    return {
        "type": "BlockStored",
        "block_hashes": list(keys),
        "parent_block_hash": parent,
        "token_ids": list(token_ids),
        "block_size": block_size,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }


def block_removed(key: int) -> dict[str, Any]:
    """vLLM emits one ``BlockRemoved`` per evicted block."""
    return {"type": "BlockRemoved", "block_hashes": [key], "medium": "GPU", "group_idx": 0}


@dataclass
class Allocation:
    """The physical blocks a running request holds, in sequence order."""

    block_ids: list[int]
    keys: list[int]
    """Block keys of the prompt's full blocks."""
    hit_blocks: int
    """Leading prompt blocks found in the cache (what prefill skips)."""
    cached_upto: int
    """Leading blocks of the sequence that are already registered in the cache."""


class BlockPool:
    """A fixed number of KV blocks with vLLM's prefix-caching behaviour.

    Not thread-safe: one pool belongs to one simulation loop.
    """

    def __init__(self, capacity: int, block_size: int = 16) -> None:
        if capacity <= 0:
            raise ValueError(f"pool capacity must be positive, got {capacity}")
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.capacity = capacity
        self.block_size = block_size
        self._key: list[int | None] = [None] * capacity
        self._ref = [0] * capacity
        # Every block with ref count 0, least recently freed first. Dict order is the queue.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(capacity))
        self._cached: dict[int, int] = {}
        self.evictions = 0

    # -- inspection ------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    def holds(self, key: int) -> bool:
        return key in self._cached

    def cached_prefix(self, keys: Iterable[int]) -> int:
        """Leading keys held in the pool (the pod's true prefix cache for that prompt)."""
        return len(list(takewhile(self._cached.__contains__, keys)))

    def free_order(self) -> list[int | None]:
        """Keys of the free queue, next eviction first (None for never-cached blocks)."""
        return [self._key[b] for b in self._free]

    # -- request lifecycle -----------------------------------------------------------------
    def allocate(
        self, keys: Sequence[int], num_blocks: int, *, max_hit: int | None = None
    ) -> tuple[Allocation, list[int]] | None:
        """Pin the cached prefix of ``keys`` and take fresh blocks up to ``num_blocks``.

        Returns the allocation and the keys evicted to make room, or None (nothing changed)
        when the free queue cannot supply the fresh blocks.
        """
        limit = len(keys) if max_hit is None else min(max_hit, len(keys))
        hit = self.cached_prefix(islice(keys, limit))
        hit_ids = list(map(self._cached.__getitem__, keys[:hit]))
        need = max(num_blocks, hit) - hit
        ref, free = self._ref, self._free
        idle = [b for b in hit_ids if ref[b] == 0]
        if len(free) - len(idle) < need:
            return None
        # Per-block work runs in C (map over bound methods): pools hold 10^5 blocks and a
        # long prompt touches thousands of them per request.
        _consume(map(free.__delitem__, idle))
        _consume(map(ref.__setitem__, hit_ids, [ref[b] + 1 for b in hit_ids]))
        new_ids = list(islice(free, need))
        _consume(map(free.__delitem__, new_ids))
        evicted = [k for k in map(self._key.__getitem__, new_ids) if k is not None]
        _consume(map(self._cached.__delitem__, evicted))
        self.evictions += len(evicted)
        _consume(map(self._key.__setitem__, new_ids, repeat(None)))
        _consume(map(ref.__setitem__, new_ids, repeat(1)))
        alloc = Allocation(hit_ids + new_ids, list(keys), hit, hit)
        return alloc, evicted

    def cache(self, alloc: Allocation, keys: Sequence[int]) -> list[tuple[int, int]]:
        """Register the full blocks ``keys`` (the sequence so far) in the cache.

        Returns ``(position, key)`` for each newly cached block. A key already cached by
        another physical block (possible only after a mid-chain eviction) is left uncached,
        so the pool never holds one key twice and the events stay exact.
        """
        start = alloc.cached_upto
        end = min(len(keys), len(alloc.block_ids))
        if end <= start:
            return []
        new_keys = keys[start:end]
        ids = alloc.block_ids[start:end]
        cached = self._cached
        alloc.cached_upto = end
        if cached.keys().isdisjoint(new_keys):  # the usual case, in bulk
            cached.update(zip(new_keys, ids))
            _consume(map(self._key.__setitem__, ids, new_keys))
            return list(zip(range(start, end), new_keys))
        fresh = list(map(not_, map(cached.__contains__, new_keys)))
        new_keys = list(compress(new_keys, fresh))
        ids = list(compress(ids, fresh))
        cached.update(zip(new_keys, ids))
        _consume(map(self._key.__setitem__, ids, new_keys))
        return list(zip(compress(range(start, end), fresh), new_keys))

    def held(self, keys: Iterable[int]) -> list[bool]:
        """Per key, whether the pool holds it."""
        return list(map(self._cached.__contains__, keys))

    def free(self, alloc: Allocation) -> None:
        """Unpin; the sequence's tail goes to the queue first so it is evicted first."""
        ids = alloc.block_ids[::-1]
        ref = self._ref
        left = [ref[b] - 1 for b in ids]
        _consume(map(ref.__setitem__, ids, left))
        _consume(map(self._free.__setitem__, compress(ids, map(not_, left)), repeat(None)))
        alloc.block_ids = []


class EventPublisher:
    """vLLM's ZMQ event publisher: 3 frames ``[topic, seq (8 bytes BE), msgpack payload]``.

    The data socket is an XPUB: identical to a PUB on the wire, but it sees subscriptions,
    which lets the simulator wait for kvindex to be connected instead of losing the first
    batches to ZMQ's slow-joiner effect. The optional replay ROUTER answers
    ``[b"", start_seq]`` with the buffered batches in vLLM >= 0.26's reply format
    (``replay_topic=False``: the 3-frame format of vLLM <= 0.25).

    ``connect=True`` connects the socket to ``endpoint`` instead of binding it (vLLM connects
    when its endpoint has no ``*``); ``encoder`` turns each event dict into the wire shape of
    another vLLM version (default: the map encoding of vLLM >= 0.24).
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        pod_id: str,
        model: str,
        *,
        endpoint: str = "tcp://127.0.0.1:*",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        epoch: float = 1_700_000_000.0,
        connect: bool = False,
        replay_topic: bool = True,
        encoder: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.pod_id = pod_id
        self.model = model
        self.topic = f"kv@{pod_id}@{model}".encode()
        self.epoch = epoch
        self.next_seq = 0
        self._sock = ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._encoder = encoder
        self._replay_topic = replay_topic
        if connect:
            self._sock.connect(endpoint)
            self.endpoint: str = endpoint
        else:
            self._sock.bind(endpoint)
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._subscribed = False
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self.replay_endpoint: str | None = None
        self._replay_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._replay_sock: zmq.Socket[Any] | None = None
        if replay_endpoint is not None:
            self._replay_sock = ctx.socket(zmq.ROUTER)
            self._replay_sock.setsockopt(zmq.LINGER, 0)
            self._replay_sock.bind(replay_endpoint)
            self.replay_endpoint = self._replay_sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_thread = threading.Thread(target=self._serve_replay, name=f"sim-replay-{pod_id}", daemon=True)
            self._replay_thread.start()

    @property
    def last_seq(self) -> int | None:
        return self.next_seq - 1 if self.next_seq else None

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Block until a subscriber has subscribed (any topic prefix). False on timeout."""
        if self._subscribed:
            return True
        if self._sock.poll(int(timeout * 1000), zmq.POLLIN):
            msg = self._sock.recv()
            self._subscribed = bool(msg) and msg[0] == 1
            while self._sock.poll(0, zmq.POLLIN):
                self._sock.recv()
        return self._subscribed

    def publish(self, sim_time: float, events: list[dict[str, Any]]) -> int:
        """Send one batch stamped ``epoch + sim_time``; returns its sequence number."""
        seq = self.next_seq
        self.next_seq += 1
        wire = events if self._encoder is None else [self._encoder(e) for e in events]
        payload = msgpack.packb([self.epoch + sim_time, wire, 0])
        seq_b = struct.pack(">Q", seq)
        if self._replay_sock is not None:
            with self._lock:
                self._buffer.append((seq, payload))
        self._sock.send_multipart([self.topic, seq_b, payload], copy=False)
        return seq

    def _serve_replay(self) -> None:
        sock = self._replay_sock
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(50)):
                continue
            frames = sock.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("pod %s: malformed replay request (%d frames)", self.pod_id, len(frames))
                continue
            ident, start = frames[0], struct.unpack(">Q", frames[2])[0]
            with self._lock:
                batches = [(s, p) for s, p in self._buffer if s >= start]
            head = [ident, b"", self.topic] if self._replay_topic else [ident, b""]
            for s, p in batches:
                sock.send_multipart([*head, struct.pack(">Q", s), p])
            end_topic = [b""] if self._replay_topic else []
            sock.send_multipart([ident, b"", *end_topic, _END_OF_REPLAY, b""])

    def close(self) -> None:
        self._stop.set()
        if self._replay_thread is not None:
            self._replay_thread.join()
        if self._replay_sock is not None:
            self._replay_sock.close()
        self._sock.close()


@dataclass
class SimPod:
    """One simulated vLLM engine: its block pool, and optionally its event publisher."""

    pod_id: str
    pool: BlockPool
    processor: TokenProcessor
    publisher: EventPublisher | None = None
    batches: int = field(default=0)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def blocks_needed(self, prompt_len: int, output_len: int) -> int:
        bs = self.pool.block_size
        return -(-(prompt_len + output_len) // bs)

    def admit(
        self, token_ids: Sequence[int], output_len: int, sim_time: float, *, keys: Sequence[int] | None = None
    ) -> Allocation | None:
        """Schedule a request's prefill: reuse its cached prefix, allocate the rest, cache its
        full prompt blocks and publish one batch (evictions then stores), as a vLLM step does.
        ``keys``: the prompt's block keys if already known (else hashed here).
        """
        if keys is None:
            keys = self.processor.block_keys(token_ids)
        # vLLM always recomputes the prompt's last token, so a hit never covers it.
        max_hit = (len(token_ids) - 1) // self.pool.block_size
        got = self.pool.allocate(keys, self.blocks_needed(len(token_ids), output_len), max_hit=max_hit)
        if got is None:
            return None
        alloc, evicted = got
        stored = self.pool.cache(alloc, keys)
        self._publish(sim_time, evicted, stored, keys, token_ids)
        return alloc

    def finish(
        self, alloc: Allocation, full_tokens: Sequence[int], sim_time: float, *, keys: Sequence[int] | None = None
    ) -> None:
        """The request completed with ``full_tokens`` (prompt + output): cache the output's
        full blocks, then free everything into the LRU queue. ``keys``: their block keys if
        already known."""
        if keys is None:
            keys = self.processor.block_keys(full_tokens)
        stored = self.pool.cache(alloc, keys)
        self._publish(sim_time, [], stored, keys, full_tokens)
        self.pool.free(alloc)

    def _publish(
        self,
        sim_time: float,
        evicted: list[int],
        stored: list[tuple[int, int]],
        keys: Sequence[int],
        tokens: Sequence[int],
    ) -> None:
        if self.publisher is None or not (evicted or stored):
            return
        bs = self.pool.block_size
        events: list[dict[str, Any]] = [block_removed(k) for k in evicted]
        # One BlockStored per run of consecutive positions, chained to the block before it.
        runs: list[list[tuple[int, int]]] = []
        if stored and stored[-1][0] - stored[0][0] == len(stored) - 1:
            runs.append(stored)  # the usual case: one run
        else:
            for item in stored:
                if runs and item[0] == runs[-1][-1][0] + 1:
                    runs[-1].append(item)
                else:
                    runs.append([item])
        for run in runs:
            first, last = run[0][0], run[-1][0]
            parent = keys[first - 1] if first > 0 else None
            events.append(block_stored([k for _, k in run], parent, tokens[first * bs : (last + 1) * bs], bs))
        self.publisher.publish(sim_time, events)
        self.batches += 1
