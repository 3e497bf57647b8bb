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


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


def get_scoring(request: Request) -> ScoringService:
    return get_runtime(request).require_scoring()


def get_indexer(request: Request) -> Indexer:
    return get_runtime(request).require_indexer()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ScoringDep = Annotated[ScoringService, Depends(get_scoring)]
IndexDep = Annotated[Indexer, Depends(get_indexer)]
