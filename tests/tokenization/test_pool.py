"""TokenizerPool: loading offline, the vLLM fixture prompts, modes, async and threads."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from kvindex_service.tokenization import (
    TokenizationError,
    Tokenized,
    TokenizerLoadError,
    TokenizerPool,
    UnknownModelError,
    find_llama3_tokenizer_dir,
    hf_hub_cache_dir,
)
from tests.conftest import VLLM_VERSIONS, load_vllm_capture
from tests.tokenization.conftest import MODEL
from tests.tokenization.texts import ENGLISH, MIXED

# -- the vLLM fixture prompts --------------------------------------------------------------


@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_fixture_prompts_round_trip(pool: TokenizerPool, version: str) -> None:
    """P1/P2 are real Llama 3.2 token ids from vLLM: decode without BOS, re-encode with it."""
    capture = load_vllm_capture(version)
    tok = pool._tokenizer(MODEL).tokenizer
    for name, ids in capture["prompts"].items():
        assert ids[0] == 128000, name
        text = tok.decode(ids[1:], skip_special_tokens=False)
        got = pool.tokenize(MODEL, text)
        assert got.token_ids == ids, name
        assert got.exact
        # The same prompt through the prefix store (P2 shares P1's opening).
        assert pool.tokenize(MODEL, text).token_ids == ids


def test_completion_prompt_gets_bos(pool: TokenizerPool, reference) -> None:
    got = pool.tokenize(MODEL, "Hello world")
    assert got == Tokenized([128000, 9906, 1917], False, 0, True)
    assert pool.tokenize(MODEL, "Hello world", add_special_tokens=False).token_ids == [9906, 1917]
    assert pool.tokenize(MODEL, "").token_ids == [128000]
    assert pool.tokenize(MODEL, "", add_special_tokens=False).token_ids == []
    assert pool.tokenize(MODEL, MIXED).token_ids == reference(MIXED)


# -- loading -------------------------------------------------------------------------------


def test_sources_directory_and_file(llama3_dir: Path, reference) -> None:
    sources = {"dir": str(llama3_dir), "file": str(llama3_dir / "tokenizer.json")}
    with TokenizerPool(sources) as pool:
        assert pool.models() == ["dir", "file"]
        assert not pool.ready()
        pool.preload()
        assert pool.ready()
        for model in sources:
            assert pool.tokenize(model, MIXED).token_ids == reference(MIXED)
        # Both names point at the same file: one tokenizer, one prefix-store namespace.
        assert pool.stats()["tokenizers_loaded"] == 1
        assert pool.tokenize("file", MIXED).from_prefix_store


def _fake_hub(root: Path, llama3_dir: Path, repo: str, revisions: dict[str, float]) -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for rev, mtime in revisions.items():
        snap = repo_dir / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "tokenizer.json").symlink_to(llama3_dir / "tokenizer.json")
        (snap / "tokenizer_config.json").symlink_to(llama3_dir / "tokenizer_config.json")
        os.utime(snap, (mtime, mtime))
    return repo_dir


def test_hf_cache_resolution(tmp_path: Path, llama3_dir: Path, reference) -> None:
    hub = tmp_path / "hub"
    repo = "acme/Tiny-Llama-3.2"
    repo_dir = _fake_hub(hub, llama3_dir, repo, {"aaa111": 1000.0, "bbb222": 2000.0})
    with TokenizerPool(hf_cache=str(hub)) as pool:
        assert pool.has_model(repo)
        assert not pool.has_model("acme/other")
        assert pool.models() == []
        assert pool.ready()  # nothing configured
        assert pool.tokenize(repo, MIXED).token_ids == reference(MIXED)
        assert pool.models() == [repo]
        info = pool.tokenizer_info(repo)
        assert info["origin"] == "directory" and "bbb222" in info["tokenizer_json"]  # newest
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("aaa111\n")
    with TokenizerPool({"alias": repo}, hf_cache=str(hub)) as pool:
        pool.preload()
        assert "aaa111" in pool.tokenizer_info("alias")["tokenizer_json"]  # refs/main wins


def test_hf_cache_location_from_environment(tmp_path: Path, llama3_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hf_hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_hub_cache_dir() == tmp_path / "hf" / "hub"
    _fake_hub(tmp_path / "hf" / "hub", llama3_dir, "org/model", {"r1": 1.0})
    with TokenizerPool() as pool:
        assert pool.has_model("org/model")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_hub_cache_dir() == tmp_path / "elsewhere"
    with TokenizerPool() as pool:
        assert not pool.has_model("org/model")


def test_unknown_model(pool: TokenizerPool) -> None:
    assert not pool.has_model("nobody/nothing")
    with pytest.raises(UnknownModelError) as info:
        pool.tokenize("nobody/nothing", "hi")
    assert isinstance(info.value, LookupError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError):
        pool.render_chat("nobody/nothing", [])
    with pytest.raises(UnknownModelError):
        asyncio.run(pool.atokenize("nobody/nothing", "hi"))
    with pytest.raises(UnknownModelError):
        pool.tokenize("../../etc", "hi")


def test_broken_sources_fail_preload(tmp_path: Path, llama3_dir: Path, reference) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.json").write_text("{not json")
    sources = {
        "ok": str(llama3_dir),
        "empty": str(tmp_path / "empty"),
        "garbage": str(tmp_path / "garbage.json"),
        "missing": "no-such-org/no-such-model",
    }
    with TokenizerPool(sources, hf_cache=str(tmp_path / "hub")) as pool:
        with pytest.raises(TokenizerLoadError) as info:
            pool.preload()
        message = str(info.value)
        assert "no tokenizer.json" in message and "garbage.json" in message
        assert "no-such-model" in message
        assert not pool.ready()
        assert pool.tokenize("ok", "fine").token_ids == reference("fine")
        with pytest.raises(TokenizationError):
            pool.tokenize("empty", "x")


def test_find_llama3_tokenizer_dir() -> None:
    found = find_llama3_tokenizer_dir()
    assert found is not None and (Path(found) / "tokenizer.json").is_file()


def test_invalid_arguments(llama3_dir: Path) -> None:
    with pytest.raises(ValueError):
        TokenizerPool(mode="approximate")
    with pytest.raises(ValueError):
        TokenizerPool(max_workers=0)
    with TokenizerPool({"m": str(llama3_dir)}) as pool, pytest.raises(TokenizationError):
        pool.tokenize("m", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        pool.tokenize("m", "closed")


# -- fast mode -----------------------------------------------------------------------------


def test_fast_mode_partial_first_then_exact(llama3_dir: Path, reference) -> None:
    with TokenizerPool({MODEL: str(llama3_dir)}, mode="fast") as pool:
        text = ENGLISH[:5000]
        expected = reference(text)
        first = pool.tokenize(MODEL, text)
        assert not first.exact and first.token_ids == [128000] and first.cached_tokens == 0
        assert pool.wait_background(30)
        second = pool.tokenize(MODEL, text)
        assert second.exact and second.token_ids == expected and second.from_prefix_store

        # An extension by a long tail: the cached part now, the rest in the background.
        longer = text + " " + ENGLISH[5000:5600]
        partial = pool.tokenize(MODEL, longer)
        assert not partial.exact and partial.from_prefix_store
        assert partial.cached_tokens > 0.95 * len(expected)
        exact_longer = reference(longer)
        assert exact_longer[: len(partial.token_ids)] == partial.token_ids  # always a prefix
        assert pool.wait_background(30)
        assert pool.tokenize(MODEL, longer) == Tokenized(exact_longer, True, len(exact_longer) - 1, True)

        # A short tail is tokenized on the spot: exact at once.
        short = longer + " and a few more words."
        now = pool.tokenize(MODEL, short)
        assert now.exact and now.token_ids == reference(short)

        stats = pool.stats()
        assert stats["partial_answers"] == 2 and stats["background_fills"] == 2
        assert stats["background_errors"] == 0


def test_fast_mode_chat_partial_has_no_bos_added(llama3_dir: Path, reference) -> None:
    messages = [{"role": "user", "content": ENGLISH[:3000]}]
    with TokenizerPool({MODEL: str(llama3_dir)}, mode="fast") as pool:
        first = pool.tokenize_chat(MODEL, messages)
        assert not first.exact and first.token_ids == []
        pool.wait_background(30)
        rendered = pool.render_chat(MODEL, messages)
        assert pool.tokenize_chat(MODEL, messages).token_ids == reference(rendered, False)


def test_fast_mode_background_work_is_deduplicated(llama3_dir: Path) -> None:
    with TokenizerPool({MODEL: str(llama3_dir)}, mode="fast") as pool:
        text = ENGLISH * 4
        answers = [pool.tokenize(MODEL, text) for _ in range(5)]
        assert pool.wait_background(30)
        assert all(not a.exact for a in answers)
        stats = pool.stats()
        assert stats["background_fills"] <= 2 and stats["cached_entries"] == 1


# -- async and threads ---------------------------------------------------------------------


def test_async_tokenization_does_not_block_the_loop(pool: TokenizerPool, reference) -> None:
    """Counts, not clocks: a ticker on the loop keeps ticking while `atokenize` works, and
    cannot tick at all while the same work runs on the loop thread."""
    big = (ENGLISH + MIXED) * 40  # ~300k characters: tens of milliseconds of tokenization

    async def ticks_during(work) -> int:
        stamps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                await asyncio.sleep(0.001)
                stamps.append(time.perf_counter())

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        result = await work()
        end = time.perf_counter()
        done.set()
        await task
        assert result.token_ids == reference(big)
        return sum(1 for t in stamps if start < t < end)

    async def offloaded():
        return await pool.atokenize(MODEL, big)

    async def blocking():
        return pool.tokenize(MODEL, big)

    pool.clear_prefix_store()
    assert asyncio.run(ticks_during(offloaded)) >= 3
    # Control: the same work on the loop thread leaves the ticker no chance to run.
    pool.clear_prefix_store()
    assert asyncio.run(ticks_during(blocking)) == 0


def test_async_chat_and_concurrency(pool: TokenizerPool, reference) -> None:
    messages = [{"role": "user", "content": ENGLISH[:2000]}]
    rendered = pool.render_chat(MODEL, messages)

    async def main() -> list[Tokenized]:
        jobs = [pool.atokenize_chat(MODEL, messages) for _ in range(4)]
        jobs += [pool.atokenize(MODEL, MIXED[: 100 * i]) for i in range(1, 12)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for got in results[:4]:
        assert got.token_ids == reference(rendered, False)
    for i, got in enumerate(results[4:], start=1):
        assert got.token_ids == reference(MIXED[: 100 * i])


def test_threads_share_one_pool(llama3_dir: Path, reference) -> None:
    texts = [ENGLISH[: 500 + 397 * i] for i in range(12)] + [MIXED[: 40 * i] for i in range(30)]
    expected = {t: reference(t) for t in texts}
    errors: list[str] = []
    with TokenizerPool({MODEL: str(llama3_dir)}, chunk_chars=64) as pool:

        def worker(seed: int) -> None:
            for j in range(len(texts)):
                text = texts[(j * 7 + seed) % len(texts)]
                if pool.tokenize(MODEL, text).token_ids != expected[text]:
                    errors.append(text[:30])

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert pool.stats()["models_loaded"] == 1


def test_async_exact_hit_is_answered_without_a_thread_hop(pool: TokenizerPool, reference) -> None:
    pool.tokenize(MODEL, MIXED)
    before = pool.stats()

    async def main() -> Tokenized:
        # Every worker is busy: an answer that needed the thread pool would wait for them.
        release = threading.Event()
        loop = asyncio.get_running_loop()
        blockers = [loop.run_in_executor(pool._executor, release.wait) for _ in range(8)]
        try:
            return await asyncio.wait_for(pool.atokenize(MODEL, MIXED), timeout=1.0)
        finally:
            release.set()
            await asyncio.gather(*blockers)

    got = asyncio.run(main())
    assert got.token_ids == reference(MIXED) and got.from_prefix_store
    after = pool.stats()
    assert after["prefix_store_exact_hits"] == before["prefix_store_exact_hits"] + 1
    assert after["tokenize_calls"] == before["tokenize_calls"] + 1
