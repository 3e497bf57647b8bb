"""The vLLM versions' KV-event shapes a fake pod can speak (``--vllm-format``).

The simulator's pool builds every event as vLLM >= 0.24 map-encodes it
(:func:`kvindex_service.sim.pod.block_stored`); a version that array-encodes its events gets
them re-shaped here, field by field in that version's order (``[tag, field1, ...]``), and
the replay socket answers in the version's reply format (the topic frame rides along from
0.26 on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMATS", "WireFormat", "resolve_format"]


@dataclass(frozen=True)
class WireFormat:
    name: str
    description: str
    fields: dict[str, tuple[str, ...]] | None
    """Array encoding: event type -> field order after the tag. None: map encoding."""
    replay_topic: bool
    """Replay replies carry the topic frame (vLLM >= 0.26)."""

    def encoder(self) -> Callable[[dict[str, Any]], Any] | None:
        """Event dict -> wire shape (None: the dict goes out as it is)."""
        fields = self.fields
        if fields is None:
            return None

        def encode(event: dict[str, Any]) -> list[Any]:
            kind = event["type"]
            return [kind, *(event.get(name) for name in fields.get(kind, ()))]

        return encode


_STORED_023 = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)

FORMATS: dict[str, WireFormat] = {
    "0.33": WireFormat("0.33", "map-encoded events, replay replies with the topic (vLLM >= 0.26)", None, True),
    "0.24": WireFormat("0.24", "map-encoded events, 3-frame replay replies (vLLM 0.24-0.25)", None, False),
    "0.23": WireFormat(
        "0.23",
        "array-encoded events with group_idx and the KV-cache spec (vLLM 0.20-0.23)",
        {"BlockStored": _STORED_023, "BlockRemoved": ("block_hashes", "medium", "group_idx")},
        False,
    ),
    "0.11": WireFormat(
        "0.11",
        "array-encoded events up to medium (vLLM 0.10.2-0.13)",
        {"BlockStored": _STORED_023[:6], "BlockRemoved": ("block_hashes", "medium")},
        False,
    ),
}
ALIASES = {"map": "0.33", "array": "0.23"}


def resolve_format(name: str) -> WireFormat:
    """A version (``0.33``, ``0.24``, ``0.23``, ``0.11``) or ``map`` / ``array``."""
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        choices = ", ".join([*FORMATS, *ALIASES])
        raise ValueError(f"unknown vLLM format {name!r} (choose from {choices})")
    return FORMATS[key]
