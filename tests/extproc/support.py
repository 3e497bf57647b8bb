"""Helpers shared by the picker tests (constants, bodies, loop driver)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")

VERSION = "0.33.0"
POD1 = "10.0.0.1:8000"
POD2 = "10.0.0.2:8000"
PODS = [POD1, POD2]
N_BATCHES = 2  # the first two captured batches: P1 -> POD1, P2 -> POD2


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Each test drives its own event loop (no pytest-asyncio in the venv)."""
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def completion_body(model: str, prompt: str, **extra: Any) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, **extra}).encode()


def chat_body(model: str, messages: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": messages, **extra}).encode()


def block_stored_payload(keys: list[int], token_ids: list[int], block_size: int = 16) -> bytes:
    """A vLLM >= 0.24 event batch (map-shaped events) storing ``keys`` as one chain."""
    event = {
        "type": "BlockStored",
        "block_hashes": keys,
        "parent_block_hash": None,
        "token_ids": token_ids[: len(keys) * block_size],
        "block_size": block_size,
        "medium": "GPU",
    }
    return msgpack.packb([time.time(), [event], None])


async def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` on the loop (releases are processed by the server task)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())
