"""Envoy's subset hint, read and checked before any entry can become a routing target.

The hint (``metadata_context.filter_metadata["envoy.lb.subset_hint"]
["x-gateway-destination-endpoint-subset"]``) comes from whatever set the request's metadata,
so it is not trusted: an entry is kept only when it is

* a literal ``IPv4:port`` or ``[IPv6]:port`` with a port in 1..65535 (Envoy's ORIGINAL_DST
  cluster connects to the literal address, so a host name is never resolved), naming a unicast
  address (``0.0.0.0``, ``::``, multicast and broadcast reach no pod), and
* when ``--endpoint``\\ s are configured, one of them (compared as addresses, so
  ``[fd00:0::1]:80`` matches ``[fd00::1]:80``; the configured spelling is what is routed to).

Every dropped entry is counted by reason (``kvindex_extproc_subset_hint_dropped_total``), and a
hint whose every entry was dropped leaves nothing eligible: 503, as an empty hint does.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from envoy.config.core.v3 import base_pb2

__all__ = [
    "DROP_REASONS",
    "SUBSET_HINT_KEY",
    "SUBSET_HINT_NAMESPACE",
    "SubsetHintFilter",
    "canonical_endpoint",
]

SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"

#: Why a hint entry was dropped (the ``reason`` label of the dropped-entries metric).
DROP_REASONS = ("malformed", "not_unicast", "not_configured", "over_limit")

_PORT = re.compile(r"[0-9]{1,5}")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_MAX_ENTRY = 64  # "[" + 45-character IPv6 + "]:" + 5 digits fits well inside


class HintError(ValueError):
    """An endpoint string that cannot be routed to; ``reason`` is one of DROP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@functools.lru_cache(maxsize=16_384)
def canonical_endpoint(value: str) -> str:
    """``value`` as ``a.b.c.d:port`` or ``[v6]:port`` in canonical form; raise HintError.

    Only IP literals with an explicit port in 1..65535 are accepted; IPv6 must be bracketed
    (``fd00::1:8000`` is ambiguous) and carry no zone (``%eth0``). Results are cached (a
    gateway sends the same pool's entries on every request; refusals are not cached).
    """
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or "%" in host:
            raise HintError("malformed", f"{value!r}: expected [ipv6]:port")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise HintError("malformed", f"{value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise HintError("malformed", f"{value!r}: expected ip:port")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise HintError(
                "malformed", f"{value!r}: {host!r} is not an IPv4 address (IPv6 goes in brackets)"
            ) from None
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise HintError("malformed", f"{value!r}: port {port!r} is not in 1-65535")
    if ip.is_unspecified or ip.is_multicast or ip == _BROADCAST:
        raise HintError("not_unicast", f"{value!r}: {ip} is not a unicast address")
    return f"{ip}:{int(port)}" if ip.version == 4 else f"[{ip}]:{int(port)}"


class SubsetHintFilter:
    """Reads the hint from a stream's metadata and keeps only routable entries.

    ``configured``: the ``--endpoint`` list (already validated); empty means any routable
    address is accepted. ``limit``: entries past it are dropped (``over_limit``).
    """

    def __init__(self, configured: Iterable[str], limit: int, dropped: Counter[str] | None = None) -> None:
        self._allowed = {canonical_endpoint(ep): ep for ep in configured}
        self._limit = limit
        #: Dropped entries per reason (the server passes its StreamStats counter).
        self.dropped: Counter[str] = Counter() if dropped is None else dropped

    def read(self, metadata: base_pb2.Metadata) -> list[str] | None:
        """The eligible entries of the stream's hint, or None when there is no hint."""
        ns = metadata.filter_metadata.get(SUBSET_HINT_NAMESPACE)
        if ns is None or SUBSET_HINT_KEY not in ns.fields:
            return None
        value = ns.fields[SUBSET_HINT_KEY]
        kind = value.WhichOneof("kind")
        raw: list[str | None]
        if kind == "list_value":
            raw = [v.string_value if v.WhichOneof("kind") == "string_value" else None for v in value.list_value.values]
        elif kind == "string_value":
            # Tolerate a comma-separated string (some control planes flatten lists).
            raw = [s for s in value.string_value.split(",") if s.strip()]
        else:
            self.dropped["malformed"] += 1
            return []
        return self.filter(raw)

    def filter(self, entries: Sequence[str | None]) -> list[str]:
        """Keep the routable entries (deduplicated, in order); count the rest."""
        if len(entries) > self._limit:
            self.dropped["over_limit"] += len(entries) - self._limit
            entries = entries[: self._limit]
        out: dict[str, None] = {}  # ordered, O(1) de-duplication (up to max_subset entries)
        for entry in entries:
            if entry is None or len(entry) > _MAX_ENTRY:
                self.dropped["malformed"] += 1
                continue
            try:
                ep = canonical_endpoint(entry)
            except HintError as exc:
                self.dropped[exc.reason] += 1
                continue
            if self._allowed:
                configured = self._allowed.get(ep)
                if configured is None:
                    self.dropped["not_configured"] += 1
                    continue
                ep = configured
            out[ep] = None
        return list(out)
