"""Fake vLLM pods: the OpenAI API, the simulator's prefix-caching block pool and real KV
events over ZMQ, for local fleets (``make fleet``) and tests. Manual: docs/fleet.md."""

from kvindex_service.fakepod.engine import Completion, FakePod, FakePodConfig, binds
from kvindex_service.fakepod.wire import FORMATS, WireFormat, resolve_format

__all__ = ["FORMATS", "Completion", "FakePod", "FakePodConfig", "WireFormat", "binds", "resolve_format"]
