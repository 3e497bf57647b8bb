"""A fake vLLM engine: tokenizes like vLLM, keeps the simulator's prefix-caching block pool,
publishes its KV events over ZMQ, and makes up the generated text.

One lock serializes the pool and the ZMQ data socket (neither is thread-safe); the replay
ROUTER runs on its own thread inside the simulator's publisher.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvindex_service._native import TokenProcessor
from kvindex_service.config import TokenizerSettings
from kvindex_service.fakepod.wire import WireFormat, resolve_format
from kvindex_service.sim.pod import BlockPool, EventPublisher, SimPod
from kvindex_service.tokenization import TokenizerPool

__all__ = ["Completion", "FakePod", "FakePodConfig", "PromptTooLongError", "binds"]

log = logging.getLogger(__name__)

#: Words of the made-up answers (each one Llama 3 token with its leading space).
_WORDS = (
    "the", "cache", "block", "prefix", "is", "warm", "and", "the", "request", "lands",
    "where", "its", "tokens", "were", "already", "computed", "so", "prefill", "is", "short",
)  # fmt: skip


def binds(endpoint: str) -> bool:
    """vLLM's rule: a publisher binds when its endpoint has ``*``, ``::``, ``ipc://`` or
    ``inproc://``, and connects otherwise."""
    return any(mark in endpoint for mark in ("*", "::", "ipc://", "inproc://"))


class PromptTooLongError(ValueError):
    """The prompt exceeds ``max_prompt_tokens`` or needs more blocks than the pool has."""


@dataclass
class FakePodConfig:
    pod_id: str
    model: str
    zmq_endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    block_size: int = 16
    capacity: int = 4096
    vllm_format: str = "0.33"
    hash_seed: str | None = None
    tokenizers: Mapping[str, str] = field(default_factory=dict)
    chat_templates: Mapping[str, str] = field(default_factory=dict)
    max_prompt_tokens: int = 32_768
    buffer_steps: int = 10_000

    def validate(self) -> None:
        if not self.pod_id or "@" in self.pod_id:
            raise ValueError(f"pod id {self.pod_id!r} must be non-empty and without '@' (it goes in the topic)")
        if not self.model:
            raise ValueError("model must be non-empty")
        for name in ("block_size", "capacity", "max_prompt_tokens", "buffer_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        resolve_format(self.vllm_format)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens whose blocks the pool already held (what vLLM reports)."""


class FakePod:
    """The engine behind the fake pod's HTTP API. ``start`` binds or connects the sockets
    and loads the tokenizer (raises on failure); ``close`` releases everything."""

    def __init__(self, config: FakePodConfig) -> None:
        config.validate()
        self.config = config
        self.format: WireFormat = resolve_format(config.vllm_format)
        sources = TokenizerSettings(sources=dict(config.tokenizers)).effective_sources()
        self.tokenizers = TokenizerPool(sources, chat_templates=dict(config.chat_templates))
        self.processor = TokenProcessor(block_size=config.block_size, hash_seed=config.hash_seed)
        self._ctx: zmq.Context[Any] | None = None
        self._pod: SimPod | None = None
        self._lock = threading.Lock()
        self.requests = 0
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        self.tokenizers.tokenizer_info(c.model)  # load now: a missing tokenizer fails the start
        self._ctx = zmq.Context()
        try:
            publisher = EventPublisher(
                self._ctx,
                c.pod_id,
                c.model,
                endpoint=c.zmq_endpoint,
                replay_endpoint=c.replay_endpoint,
                buffer_steps=c.buffer_steps,
                epoch=0.0,
                connect=not binds(c.zmq_endpoint),
                replay_topic=self.format.replay_topic,
                encoder=self.format.encoder(),
            )
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)  # closes the socket the failed endpoint left open
            self._ctx = None
            raise OSError(f"cannot open ZMQ endpoint {c.zmq_endpoint} / replay {c.replay_endpoint}: {exc}") from None
        self._pod = SimPod(c.pod_id, BlockPool(c.capacity, c.block_size), self.processor, publisher)

    def close(self) -> None:
        with self._lock:
            if self._pod is not None and self._pod.publisher is not None:
                self._pod.publisher.close()
            self._pod = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
        self.tokenizers.close()

    @property
    def pod(self) -> SimPod:
        if self._pod is None:
            raise RuntimeError("the fake pod is not started")
        return self._pod

    @property
    def publisher(self) -> EventPublisher:
        pub = self.pod.publisher
        assert pub is not None
        return pub

    # -- requests --------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizers.tokenize(self.config.model, prompt).token_ids
        return list(prompt)

    def tokenize_chat(self, messages: list[dict[str, Any]], **render: Any) -> list[int]:
        return self.tokenizers.tokenize_chat(self.config.model, messages, **render).token_ids

    def generate(self, token_ids: list[int], max_tokens: int) -> Completion:
        """Run one request through the pool: allocate (hits, evictions), cache the prompt's
        full blocks, publish one batch; then 'generate', cache the output blocks, free."""
        c = self.config
        if not token_ids:
            raise PromptTooLongError("the prompt is empty")
        if len(token_ids) > c.max_prompt_tokens:
            raise PromptTooLongError(
                f"This model's maximum context length is {c.max_prompt_tokens} tokens. However, "
                f"your request has {len(token_ids)} input tokens."
            )
        # Greedy-like: the same prompt always gets the same made-up answer.
        start = zlib.crc32(repr(token_ids[-64:]).encode())
        text = "".join(" " + _WORDS[(start + i) % len(_WORDS)] for i in range(max_tokens))
        output = self.tokenizers.tokenize(c.model, text, add_special_tokens=False).token_ids[:max_tokens]
        with self._lock:
            pod = self.pod
            need = pod.blocks_needed(len(token_ids), len(output))
            if need > pod.pool.capacity:
                raise PromptTooLongError(
                    f"the request needs {need} KV blocks of {c.block_size} tokens, the pool has {pod.pool.capacity}"
                )
            now = time.time()
            alloc = pod.admit(token_ids, len(output), now)
            # Requests run one at a time, so every block is free or cached: admission fits.
            assert alloc is not None
            cached = alloc.hit_blocks * c.block_size
            pod.finish(alloc, token_ids + output, now)
            self.requests += 1
        return Completion(text, len(token_ids), len(output), cached)

    def reset_prefix_cache(self) -> None:
        """Drop every cached block (vLLM's ``POST /reset_prefix_cache``): AllBlocksCleared."""
        with self._lock:
            pod = self.pod
            pod.pool = BlockPool(self.config.capacity, self.config.block_size)
            self.publisher.publish(time.time(), [{"type": "AllBlocksCleared"}])

    def status(self) -> dict[str, Any]:
        with self._lock:
            pod = self.pod
            pub = self.publisher
            subscribed = pub.wait_subscribed(0)
            return {
                "status": "ok",
                "pod_id": pod.pod_id,
                "model": self.config.model,
                "vllm_format": self.format.name,
                "subscribed": subscribed,
                "zmq_endpoint": pub.endpoint,
                "zmq_mode": "connect" if not binds(self.config.zmq_endpoint) else "bind",
                "replay_endpoint": pub.replay_endpoint,
                "next_seq": pub.next_seq,
                "block_size": pod.block_size,
                "capacity": pod.pool.capacity,
                "cached_blocks": pod.pool.cached_blocks,
                "free_blocks": pod.pool.free_blocks,
                "evictions": pod.pool.evictions,
                "requests": self.requests,
            }
