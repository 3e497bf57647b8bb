"""Schemathesis against the real app on a real server: every operation, a bounded and
deterministic number of generated requests (schema-valid and schema-invalid), checking that
no request makes a 5xx and that every answer's status, content type and body are the ones
the OpenAPI document declares.

``POST /pods`` is left out: it makes the service connect to the endpoint in the body, and
generated endpoints would be hosts outside this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.helpers import LiveServer, make_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 25


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    srv = LiveServer(make_settings(zmq={"bind": "none"}))
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            srv.wait_ready(c)
        yield srv
    finally:
        srv.stop()


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """Every operation with schema-valid inputs; those with a body with invalid ones too
    (an operation without inputs has no invalid request to make)."""
    from kvindex_service.api import create_app

    spec = create_app(make_settings()).openapi()
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if (method.upper(), path) == ("POST", "/pods"):
                continue
            out.append((method.upper(), path, GenerationMode.POSITIVE))
            if "requestBody" in op:
                out.append((method.upper(), path, GenerationMode.NEGATIVE))
    return out


@pytest.mark.parametrize(("method", "path", "mode"), _operations(), ids=lambda v: str(v))
def test_operation_conforms(server: LiveServer, method: str, path: str, mode: GenerationMode) -> None:
    spec: dict[str, Any] = server.app.openapi()
    schema = schemathesis.openapi.from_dict(spec)
    operation = schema[path][method]
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(base_url=server.url, checks=checks)
        seen.append(response.status_code)

    run()
    assert seen, "no request was made"
