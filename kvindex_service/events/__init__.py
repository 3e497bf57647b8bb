"""vLLM KV-event ingestion: ZMQ subscriber, sequence tracking and replay, in front of the core.

``Subscriber`` reads ``[topic, seq, payload]`` messages from vLLM's ZMQ publishers (connecting
to each pod, or binding one endpoint they all connect to), keeps each pod's batches in
sequence order, fills gaps from vLLM's replay buffer, and hands whole batches to
``Indexer.submit``, which decodes and applies them off the GIL.
"""

from kvindex_service.events.sequence import SeqVerdict, classify
from kvindex_service.events.subscriber import Subscriber
from kvindex_service.events.topic import (
    END_SEQ,
    PodEndpoint,
    decode_seq,
    encode_seq,
    parse_topic,
    validate_endpoint,
)

__all__ = [
    "END_SEQ",
    "PodEndpoint",
    "SeqVerdict",
    "Subscriber",
    "classify",
    "decode_seq",
    "encode_seq",
    "parse_topic",
    "validate_endpoint",
]
