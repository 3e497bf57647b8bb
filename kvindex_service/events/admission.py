"""Who may speak for which pod, and how many pods there may be: checks at the network edge.

vLLM's publisher has no ZMQ authentication, so whoever reaches the SUB socket could publish
under another pod's topic (wiping its blocks, or claiming prefixes it does not hold), and every
new topic used to create a pod that never went away. ``Admission`` decides, per message, before
anything is parsed further or stored:

- lengths: a pod id longer than ``MAX_POD_ID_BYTES`` (a DNS name plus ``:port``) or a model name
  longer than ``MAX_MODEL_BYTES`` is refused;
- peers (``verify_peer``): a topic naming pod ``IP:port`` is accepted only from a ZMQ peer
  whose address is that IP (libzmq's ``Peer-Address`` frame property); other pod ids are
  accepted from the peers in ``allowed_publishers`` (CIDRs; empty = any peer). Messages over
  ``ipc://`` have no peer address: there the socket file's permissions are the control;
- the pod budget (``max_pods``): one total over bind-mode pods, configured endpoints and
  ``POST /pods`` subscriptions.

Refusals are counted per reason (``rejected``) and summarised in at most one log line a minute;
they are never logged per message. ``safe_text`` is how anything that came from the network is
put in a log line: truncated, control characters escaped.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Sequence

from kvindex_service.errors import ServiceError

__all__ = [
    "MAX_MODEL_BYTES",
    "MAX_POD_ID_BYTES",
    "REJECT_REASONS",
    "Admission",
    "EndpointForbiddenError",
    "IngestBudget",
    "Network",
    "PodLimitError",
    "SubscribeError",
    "host_ip",
    "parse_networks",
    "safe_text",
]

MAX_POD_ID_BYTES = 253 + 6
"""A DNS name (253) plus ``:65535``."""
MAX_MODEL_BYTES = 256

REJECT_REASONS = (
    "pod_limit",
    "pod_id_too_long",
    "model_too_long",
    "peer_mismatch",
    "peer_not_allowed",
    "other_pod",
)
"""``pod_limit``: a new pod past ``max_pods``; ``peer_mismatch``: the topic names ``IP:port``
but the frame came from another IP; ``peer_not_allowed``: a pod id that is not ``IP:port`` from
a peer outside ``allowed_publishers``; ``other_pod``: a connect-mode link without a configured
pod id whose topic names another pod than the first one it named."""

_SUMMARY_EVERY = 60.0
_PEER_CACHE_MAX = 4096
_LOG_CHARS = 80

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("kvindex_service.events.subscriber")


class PodLimitError(ServiceError, RuntimeError):
    status = 429
    type = "pod_limit"


class SubscribeError(ServiceError, OSError):
    """The subscription could not be set up for lack of resources (sockets, file descriptors)."""

    status = 503
    type = "subscribe_failed"


class EndpointForbiddenError(ServiceError, PermissionError):
    status = 403
    type = "endpoint_forbidden"


def safe_text(value: object, limit: int = _LOG_CHARS) -> str:
    """``value`` fit for a log line: control characters escaped, at most ``limit`` characters
    (plus a note of how many were cut)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return f"{out}...(+{cut} chars)" if cut > 0 else out


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks; ``ValueError`` naming the bad entry."""
    out: list[Network] = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"not a CIDR: {cidr!r} ({exc})") from None
    return tuple(out)


def host_ip(pod: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a pod id of the form ``IP:port`` (``[v6]:port`` too), else None."""
    host, colon, port = pod.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(peer.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


class Admission:
    """Edge checks of one subscriber (used from its loop thread only)."""

    def __init__(self, *, max_pods: int, verify_peer: bool, allowed_publishers: Iterable[str] = ()) -> None:
        if not isinstance(max_pods, int) or max_pods < 1:
            raise ValueError("max_pods must be >= 1")
        self.max_pods = max_pods
        self.verify_peer = bool(verify_peer)
        self.allowed = parse_networks(allowed_publishers)
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._since_summary: dict[str, int] = {}
        self._next_summary = 0.0
        self._peer_ok: dict[tuple[str, str], str | None] = {}

    @property
    def needs_peer(self) -> bool:
        """Whether messages must be read with their peer address."""
        return self.verify_peer or bool(self.allowed)

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        self._since_summary[reason] = self._since_summary.get(reason, 0) + 1
        now = time.monotonic()
        if now >= self._next_summary:
            self._next_summary = now + _SUMMARY_EVERY
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self._since_summary.items()))
            self._since_summary.clear()
            log.warning("refused KV event messages (%s); see kvindex_events_rejected_total", counts)

    def check_topic_size(self, topic: bytes, prefix_len: int) -> str | None:
        """A reason to refuse a topic too long to hold a valid pod id and model (checked before
        the topic is parsed or cached), else None."""
        if len(topic) <= prefix_len + MAX_POD_ID_BYTES + 1 + MAX_MODEL_BYTES:
            return None
        sep = topic.find(b"@", prefix_len)
        return "pod_id_too_long" if sep < 0 or sep - prefix_len > MAX_POD_ID_BYTES else "model_too_long"

    def check_names(self, pod: str, model: str) -> str | None:
        if len(pod) > MAX_POD_ID_BYTES or len(pod.encode("utf-8")) > MAX_POD_ID_BYTES:
            return "pod_id_too_long"
        if len(model) > MAX_MODEL_BYTES or len(model.encode("utf-8")) > MAX_MODEL_BYTES:
            return "model_too_long"
        return None

    def check_peer(self, pod: str, peer: str | None) -> str | None:
        """A reason to refuse ``pod`` speaking from ``peer`` (None: no address, e.g. ipc)."""
        if peer is None or not self.needs_peer:
            return None
        key = (pod, peer)
        if key in self._peer_ok:
            return self._peer_ok[key]
        verdict = self._peer_verdict(pod, peer)
        if len(self._peer_ok) >= _PEER_CACHE_MAX:
            self._peer_ok.clear()
        self._peer_ok[key] = verdict
        return verdict

    def _peer_verdict(self, pod: str, peer: str) -> str | None:
        ip = _peer_ip(peer)
        claimed = host_ip(pod) if self.verify_peer else None
        if claimed is not None:
            if isinstance(claimed, ipaddress.IPv6Address) and claimed.ipv4_mapped is not None:
                claimed = claimed.ipv4_mapped
            return None if ip == claimed else "peer_mismatch"
        if not self.allowed:
            return None
        return None if ip is not None and in_networks(ip, self.allowed) else "peer_not_allowed"


class IngestBudget:
    """A per-pod bound on batches handed to the index: a token bucket of ``rate`` batches/s
    holding at most one second's worth (``rate`` 0 = unbounded).

    A pod past its bound is pushed back, not dropped: ``wait`` says how long the loop must
    stop reading before that pod's next batch may go in, and the loop sleeps that long, so
    ZMQ's high-water marks hold the rest (the publisher's own, then ours), exactly as when a
    shard queue is full. Every wait is counted (``throttled``). One
    pod flooding can then use at most ``rate`` batches/s of the cores that also serve
    ``/score``. Used from the loop thread only; the table is capped like the pod budget.
    """

    def __init__(self, rate: float, max_pods: int = 1 << 16) -> None:
        if not (rate >= 0 and rate < float("inf")):
            raise ValueError("pod_batch_rate must be a finite number >= 0 (0 = unbounded)")
        self.rate = float(rate)
        self.throttled = 0
        self._max_pods = max_pods
        self._buckets: dict[str, list[float]] = {}  # pod -> [tokens, last refill]

    def wait(self, pod: str, now: float) -> float:
        """Take one batch of ``pod``'s allowance; the seconds to wait before it may go in."""
        if not self.rate:
            return 0.0
        bucket = self._buckets.get(pod)
        if bucket is None:
            if len(self._buckets) >= self._max_pods:
                self._buckets.clear()
            bucket = self._buckets[pod] = [self.rate, now]
        tokens = min(self.rate, bucket[0] + (now - bucket[1]) * self.rate) - 1.0
        bucket[0], bucket[1] = tokens, now
        if tokens >= 0:
            return 0.0
        delay = -tokens / self.rate
        self.throttled += 1
        return delay

    def forget(self, pod: str) -> None:
        self._buckets.pop(pod, None)
