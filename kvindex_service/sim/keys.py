"""Block keys of a request list, hashed once and shared by every router's run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .workloads import Request

if TYPE_CHECKING:
    from kvindex_service import TokenProcessor

__all__ = ["BlockKeys"]


class BlockKeys:
    """Each request's block keys, hashed once per request list and shared by every router's
    run: by the pods (admission, completion), by the routers that read true pools and by the
    reuse bound. Keys are chained, so a prompt's keys are the leading ones of prompt + output.
    One instance serves one request list (requests are told apart by ``rid``)."""

    def __init__(self, processor: TokenProcessor) -> None:
        self.processor = processor
        self.block_size = processor.block_size
        self._full: dict[int, list[int]] = {}

    def full(self, req: Request) -> list[int]:
        """Keys of the full blocks of prompt + output."""
        got = self._full.get(req.rid)
        if got is None:
            got = self.processor.block_keys([*req.token_ids, *req.output_ids])
            self._full[req.rid] = got
        return got

    def prompt(self, req: Request) -> list[int]:
        """Keys of the prompt's full blocks."""
        return self.full(req)[: req.prompt_len // self.block_size]
