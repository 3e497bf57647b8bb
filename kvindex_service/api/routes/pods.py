"""``/pods``: the pods the index knows, their event-stream state, and connect-mode
subscriptions added or removed at run time.

A pod is known when the index holds state for it (it published at least one batch, in bind
or connect mode) or when the subscriber has a subscription for it. Pod ids are usually
``ip:port``; the ``{pod:path}`` converter also accepts a ZMQ endpoint (``tcp://...``), so a
connect-mode subscription can be addressed by either.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kvindex_service._native import PodState
from kvindex_service.api.body import json_body, parse_body
from kvindex_service.api.deps import RuntimeDep
from kvindex_service.errors import BadEndpointError, PodConflictError, PodNotFoundError, ServiceError
from kvindex_service.events.admission import MAX_POD_ID_BYTES, SubscribeError, parse_networks
from kvindex_service.events.outbound import check_outbound
from kvindex_service.runtime import Runtime

__all__ = ["AddPodRequest", "known_pods", "router"]

router = APIRouter(prefix="/pods", tags=["pods"])

_NATIVE_FIELDS = (
    "pod", "models", "blocks_by_tier", "last_seq", "last_event_ts", "dp_rank", "batches_applied",
    "events_applied", "decode_errors", "unknown_event_types", "unknown_parents", "hash_matches",
    "hash_mismatches", "hashes_match", "bridge_entries", "kv_cache_groups",
)  # fmt: skip


class AddPodRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(min_length=1, max_length=1024, description="vLLM's PUB endpoint, e.g. tcp://10.0.0.1:5557")
    pod_id: str | None = Field(
        default=None, min_length=1, max_length=MAX_POD_ID_BYTES, description="overrides the pod id found in the topic"
    )
    replay_endpoint: str | None = Field(default=None, max_length=1024, description="vLLM's replay ROUTER endpoint")


def _native(state: PodState) -> dict[str, Any]:
    out = {name: getattr(state, name) for name in _NATIVE_FIELDS}
    out["blocks_by_tier"] = dict(out["blocks_by_tier"])
    out["models"] = list(out["models"])
    out["kv_cache_groups"] = [
        {"group_idx": g, "kind": kind, "sliding_window": window, "block_size": bs}
        for g, kind, window, bs in out["kv_cache_groups"]
    ]
    return out


def known_pods(runtime: Runtime) -> dict[str, dict[str, Any]]:
    """pod id -> merged state (index state overlaid with the subscriber's view)."""
    pods: dict[str, dict[str, Any]] = {}
    if runtime.indexer is not None and runtime.started:
        for state in runtime.indexer.pod_states():
            pods[state.pod] = _native(state)
    sub = runtime.subscriber
    if sub is not None:
        for entry in sub.pod_states():
            key = entry.get("pod") or entry.get("pod_id") or entry.get("endpoint")
            if key:
                pods[str(key)] = {**pods.get(str(key), {}), **entry}
    return pods


def _find(pods: dict[str, dict[str, Any]], pod: str) -> tuple[str, dict[str, Any]] | None:
    if pod in pods:
        return pod, pods[pod]
    for key, state in pods.items():
        if state.get("endpoint") == pod:
            return key, state
    return None


@router.get("", summary="Every known pod with its merged state")
def list_pods(runtime: RuntimeDep) -> dict[str, Any]:
    pods = known_pods(runtime)
    return {"count": len(pods), "pods": [pods[k] for k in sorted(pods)]}


@router.post(
    "",
    status_code=201,
    summary="Subscribe to a pod (connect mode)",
    openapi_extra=json_body(AddPodRequest),
    responses={
        400: {"description": "bad endpoint, or its host does not resolve"},
        403: {"description": "endpoint outside zmq.connect_allow"},
        409: {"description": "already subscribed"},
        422: {"description": "malformed body"},
        429: {"description": "zmq.max_pods reached"},
        503: {"description": "the subscriber cannot take another subscription now"},
    },
)
async def add_pod(request: Request, runtime: RuntimeDep) -> JSONResponse:
    req = await parse_body(request, AddPodRequest)
    sub = runtime.subscriber
    if sub is None:
        raise PodNotFoundError(req.pod_id or req.endpoint)
    allow = parse_networks(runtime.settings.zmq.connect_allow)
    # Validated, resolved (off the event loop) and checked against zmq.connect_allow.
    endpoint = await check_outbound(req.endpoint, allow)
    replay = req.replay_endpoint
    if replay is not None:
        replay = await check_outbound(replay, allow, "replay_endpoint")
    for existing in sub.endpoints():
        if existing.endpoint in (req.endpoint, endpoint) or (req.pod_id and existing.pod_id == req.pod_id):
            raise PodConflictError(f"already subscribed: endpoint {existing.endpoint!r}, pod id {existing.pod_id!r}")
    try:
        # Off the event loop: the subscriber's loop thread does the connect and answers.
        added = await asyncio.to_thread(sub.add_pod, endpoint, pod_id=req.pod_id, replay_endpoint=replay)
    except ServiceError:
        raise  # 429 past zmq.max_pods, 503 when sockets run out
    except (TimeoutError, RuntimeError, OSError) as exc:
        raise SubscribeError(f"cannot subscribe now: {exc}") from None
    except ValueError as exc:
        text = str(exc)
        if "already" in text or "duplicate" in text:
            raise PodConflictError(text) from None
        raise BadEndpointError(text) from None
    body = {"endpoint": added.endpoint, "pod_id": added.pod_id, "replay_endpoint": added.replay_endpoint}
    return JSONResponse(body, status_code=201)


@router.get("/{pod:path}", summary="One pod's merged state", responses={404: {"description": "unknown pod"}})
def get_pod(pod: str, runtime: RuntimeDep) -> dict[str, Any]:
    found = _find(known_pods(runtime), pod)
    if found is None:
        raise PodNotFoundError(pod)
    return found[1]


@router.delete(
    "/{pod:path}",
    status_code=204,
    summary="Forget a pod: drop its subscription (if any) and its blocks",
    responses={404: {"description": "unknown pod"}},
)
def delete_pod(pod: str, runtime: RuntimeDep) -> Response:
    sub = runtime.subscriber
    if sub is not None and sub.remove_pod(pod):
        return Response(status_code=204)
    found = _find(known_pods(runtime), pod)
    if found is None or runtime.indexer is None:
        raise PodNotFoundError(pod)
    runtime.indexer.remove_pod(found[0])
    return Response(status_code=204)
