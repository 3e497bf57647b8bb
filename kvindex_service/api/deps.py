"""Dependency aliases: routes declare what they need by type, FastAPI injects it.

The runtime lives on ``app.state.runtime`` (set by the lifespan); nothing is global.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kvindex_service._native import Indexer
from kvindex_service.config import Settings
from kvindex_service.runtime import Runtime
from kvindex_service.scoring import ScoringService

__all__ = ["IndexDep", "RuntimeDep", "ScoringDep", "SettingsDep"]


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in its thread pool, and a
# thread hop per dependency would cost more than the whole score of a prompt.
async def get_runtime(request: Request) -> Runtime:
    return _runtime(request)


async def get_settings(request: Request) -> Settings:
    return _runtime(request).settings


async def get_scoring(request: Request) -> ScoringService:
    return _runtime(request).require_scoring()


async def get_indexer(request: Request) -> Indexer:
    return _runtime(request).require_indexer()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ScoringDep = Annotated[ScoringService, Depends(get_scoring)]
IndexDep = Annotated[Indexer, Depends(get_indexer)]
