"""The event tests' fixtures (real sockets, the real core), shared with the compatibility tests."""

from __future__ import annotations

from tests.events.conftest import rig, zctx

__all__ = ["rig", "zctx"]
