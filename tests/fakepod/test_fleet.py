"""The ``make fleet`` launcher: four real processes on ephemeral ports, a completion to pod A,
then /score and the Envoy picker both choose A."""

from __future__ import annotations

import asyncio
import json

import httpx

from kvindex_service.extproc.client import EnvoyClient
from kvindex_service.fakepod.fleet import DEMO_PROMPT, Fleet, FleetPorts
from tests.fakepod.support import MODEL, clean_env, wait_for


def test_fleet_routes_a_prompt_to_the_pod_that_holds_it() -> None:
    # A scorer deadline far above any answer time: the pick must come from the scores.
    fleet = Fleet(FleetPorts(0, 0, 0, (0, 0)), env=clean_env(), echo=None, scorer_timeout_ms=60_000)
    with fleet:
        (a_id, a_url), (b_id, _) = fleet.pod_urls.items()
        assert a_id != b_id and a_id.startswith("127.0.0.1:")
        text = fleet.instructions()
        assert f"{a_url}/v1/completions" in text and f"{fleet.service_url}/score" in text
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{a_url}/v1/completions", json={"model": MODEL, "prompt": DEMO_PROMPT, "max_tokens": 16})
            assert r.status_code == 200
            prompt_tokens = r.json()["usage"]["prompt_tokens"]

            def scored() -> dict[str, object] | None:
                out = c.post(f"{fleet.service_url}/score", json={"model": MODEL, "prompt": DEMO_PROMPT}).json()
                return out if out["scores"] else None

            score = wait_for(scored, "a non-empty score")
            assert score["best_pod"] == a_id
            top = score["scores"][0]
            assert top["matched_blocks"] == score["total_blocks"] == prompt_tokens // 16 > 0
            # The curl line the fleet prints for /score is a valid /score body.
            line = next(x for x in text.splitlines() if "/score" in x)
            body = json.loads(line.split("-d '", 1)[1].rstrip("'"))
            assert c.post(f"{fleet.service_url}/score", json=body).json()["best_pod"] == a_id

        async def pick(path: str, body: dict[str, object]) -> str | None:
            async with EnvoyClient(fleet.picker_address) as envoy:
                result = await envoy.route(path, json.dumps(body).encode())
                return result.endpoint

        assert asyncio.run(pick("/v1/completions", {"model": MODEL, "prompt": DEMO_PROMPT})) == a_id
        # ... because of the KV scores, not by chance: the picker logged why it chose A.
        picker = fleet.children[-1]
        picks = wait_for(lambda: [r for r in list(picker.records) if r.get("msg") == "pick"], "the pick log line")
        assert (picks[-1]["endpoint"], picks[-1]["reason"], picks[-1]["scorer"]) == (a_id, "kv", "ok")
        children = list(fleet.children)
    assert [c.name for c in children] == ["serve", "pod-a", "pod-b", "extproc"]
    assert all(c.proc.returncode == 0 for c in children), [(c.name, c.proc.returncode) for c in children]
