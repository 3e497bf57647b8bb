"""vLLM's hybrid-attention capture through the live server: ZMQ in, ``/score`` and ``/pods`` out."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.api.helpers import Publisher, wait_for
from tests.compat.test_hybrid import load


def _seq(client: httpx.Client, pod: str) -> int | None:
    r = client.get(f"/pods/{pod}")
    return r.json().get("last_seq") if r.status_code == 200 else None


def test_hybrid_capture_scores_and_pod_groups(client: httpx.Client, publishers: Callable[[], Publisher]) -> None:
    capture = load()
    model = capture["model"]
    names = {pod: f"hybrid-{pod}" for pod in capture["messages"][0]["expect_after"]}
    pubs: dict[str, Publisher] = {}
    for msg in capture["messages"]:
        pod = names[msg["pod"]]
        _, seq_frame, payload = msg["frames"]
        pub = pubs.get(pod) or pubs.setdefault(pod, publishers())
        pub.send([f"kv@{pod}@{model}".encode(), seq_frame, payload])
        seq = int.from_bytes(seq_frame, "big")
        wait_for(lambda: _seq(client, pod) == seq, what=f"{pod} seq {seq} applied")
        for prompt, ids in capture["prompts"].items():
            body = client.post("/score", json={"model": model, "token_ids": ids, "pods": list(names.values())})
            got = {s["pod"]: s["matched_blocks"] for s in body.json()["scores"]}
            for pod_name, per_prompt in msg["expect_after"].items():
                assert got[names[pod_name]] == per_prompt[prompt], (prompt, pod_name, msg["seq"])
    state = client.get(f"/pods/{names['10.0.0.2:8000']}").json()
    assert state["kv_cache_groups"] == [
        {"group_idx": 0, "kind": "full_attention", "sliding_window": None, "block_size": 16},
        {"group_idx": 1, "kind": "sliding_window", "sliding_window": 32, "block_size": 16},
    ]
    assert state["blocks_by_tier"] == {"GPU": 4, "CPU": 0, "GPU#1": 6}
