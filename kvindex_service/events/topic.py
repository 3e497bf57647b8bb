"""Wire-level facts of vLLM's KV-event stream: topics, sequence frames, endpoints.

vLLM's ``ZmqEventPublisher`` sends ``[topic, seq, payload]``; the topic convention is
``kv@<pod-id>@<model>`` and model names may themselves contain ``@`` (``org@rev``), so only the
first two separators are structural. Everything here is pure and cheap: it runs once per
message on the subscriber's hot path (parse results are cached by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "END_SEQ",
    "PodEndpoint",
    "TopicCache",
    "check_pod_endpoint",
    "decode_seq",
    "encode_seq",
    "parse_topic",
    "validate_endpoint",
]

END_SEQ = b"\xff" * 8
"""The seq frame vLLM's replay ROUTER sends last (-1 as a signed 64-bit int)."""

_SEQ_BYTES = 8
_SCHEMES = ("tcp", "ipc")
_MAX_POD_ID_BYTES = 253 + 6
"""A DNS name plus ``:port`` (``admission.MAX_POD_ID_BYTES``)."""


@dataclass(frozen=True)
class PodEndpoint:
    """One vLLM publisher the subscriber connects to (connect mode).

    ``pod_id`` replaces the pod id found in the topic: operators who cannot set vLLM's topic to
    the routable ``ip:port`` (or who run data-parallel ranks that share a topic) name the pod
    here instead. ``replay_endpoint`` is vLLM's replay ROUTER, used to fill sequence gaps.
    """

    endpoint: str
    pod_id: str | None = None
    replay_endpoint: str | None = None


def parse_topic(topic: bytes, prefix: str = "kv@") -> tuple[str, str]:
    """Split ``kv@<pod>@<model>`` into ``(pod, model)``.

    Only the first separator after the prefix splits: the model keeps every later ``@``.
    Raises ``ValueError`` for a non-UTF-8 topic, a missing prefix, or an empty pod or model.
    """
    try:
        text = topic.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"topic is not UTF-8: {topic[:64]!r}") from exc
    if not text.startswith(prefix):
        raise ValueError(f"topic {text[:64]!r} does not start with {prefix!r}")
    pod, sep, model = text[len(prefix) :].partition("@")
    if not sep or not pod or not model:
        raise ValueError(f"topic {text[:64]!r} is not {prefix}<pod>@<model>")
    return pod, model


def decode_seq(frame: bytes) -> int:
    """The publisher's batch number: 8 bytes, big-endian, unsigned. ``ValueError`` otherwise."""
    if len(frame) != _SEQ_BYTES:
        raise ValueError(f"seq frame has {len(frame)} bytes, expected {_SEQ_BYTES}")
    return int.from_bytes(frame, "big")


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(_SEQ_BYTES, "big")


def validate_endpoint(endpoint: str, *, bind: bool = False) -> str:
    """Check a ZMQ endpoint before handing it to libzmq, so a typo is a clear ``ValueError``.

    Accepted: ``tcp://host:port`` (``port`` may be ``*`` and ``host`` may be ``*`` when binding)
    and ``ipc://path``. ``inproc://`` is refused: it only reaches sockets of the same context,
    which no vLLM pod shares with us.
    """
    if not isinstance(endpoint, str):
        raise ValueError(f"endpoint must be a string, got {type(endpoint).__name__}")
    scheme, sep, address = endpoint.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(f"endpoint {endpoint!r}: expected tcp://host:port or ipc://path")
    if not address or any(ch.isspace() for ch in address):
        raise ValueError(f"endpoint {endpoint!r}: empty or blank address")
    if scheme == "ipc":
        return endpoint
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise ValueError(f"endpoint {endpoint!r}: expected tcp://host:port")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"endpoint {endpoint!r}: unbalanced IPv6 brackets")
    if host == "*" and not bind:
        raise ValueError(f"endpoint {endpoint!r}: cannot connect to a wildcard host")
    if port == "*":
        if not bind:
            raise ValueError(f"endpoint {endpoint!r}: cannot connect to a wildcard port")
        return endpoint
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r}: port must be 1-65535")
    return endpoint


class TopicCache:
    """``parse_topic`` memoised for the hot path: a pod sends the same few topics all day.
    Bounded (cleared when full), and failures are remembered too."""

    _INVALID = ("", "")
    """Marker for a topic that failed to parse (a real topic never has an empty pod)."""

    def __init__(self, prefix: str, max_size: int = 4096) -> None:
        self.prefix = prefix
        self.max_size = max_size
        self._parsed: dict[bytes, tuple[str, str]] = {}

    def get(self, topic: bytes) -> tuple[str, str] | None:
        """``(pod, model)``, or None for a malformed topic."""
        parsed = self._parsed.get(topic)
        if parsed is None:
            try:
                parsed = parse_topic(topic, self.prefix)
            except ValueError:
                parsed = self._INVALID
            if len(self._parsed) >= self.max_size:
                self._parsed.clear()
            self._parsed[topic] = parsed
        return None if parsed is self._INVALID else parsed


def check_pod_endpoint(spec: PodEndpoint) -> PodEndpoint:
    """``spec`` itself if it is a well-formed ``PodEndpoint``; ``ValueError`` otherwise."""
    if not isinstance(spec, PodEndpoint):
        raise ValueError(f"expected a PodEndpoint, got {type(spec).__name__}")
    validate_endpoint(spec.endpoint)
    if spec.replay_endpoint is not None:
        validate_endpoint(spec.replay_endpoint)
    if spec.pod_id is not None and (not isinstance(spec.pod_id, str) or not spec.pod_id):
        raise ValueError("pod_id must be a non-empty string or None")
    if spec.pod_id is not None and len(spec.pod_id.encode("utf-8")) > _MAX_POD_ID_BYTES:
        raise ValueError(f"pod_id longer than {_MAX_POD_ID_BYTES} bytes")
    return spec
