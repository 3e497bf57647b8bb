"""Token processor: vLLM's own vectors, the pure-Python reference, and bad input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex_service import Indexer, InvalidInputError, KvIndexError, TokenProcessor
from tests.conftest import VLLM_VERSIONS, load_hash_vectors, load_vllm_capture
from tests.native.reference import RefTokenProcessor, last8

REFERENCE_ALGOS = ("sha256_cbor", "sha256_cbor_64bit")
U32_MAX = 2**32 - 1

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tokens_st = st.lists(st.integers(0, U32_MAX), max_size=200)
seed_st = st.one_of(st.none(), st.text(max_size=12))
name_st = st.one_of(st.none(), st.text(min_size=0, max_size=12))


# -- vLLM's own vectors -------------------------------------------------------------------------

HASH_CASES = load_hash_vectors()


def _case_id(case: dict[str, Any]) -> str:
    seed, n = case["pythonhashseed"], len(case["tokens"])
    return f"{case['vllm_version']}-{case['algo']}-seed{seed}-{n}"


def _expected_u64(block: dict[str, Any]) -> int:
    return int(block["event_u64"] if "event_u64" in block else block["u64"])


@pytest.mark.parametrize("case", HASH_CASES, ids=_case_id)
def test_hash_vectors(case: dict[str, Any]) -> None:
    algo = case["algo"]
    if algo not in REFERENCE_ALGOS:
        # vLLM's xxhash rule is not something kvindex claims to reproduce.
        assert algo not in _algorithms()
        with pytest.raises(InvalidInputError):
            TokenProcessor(16, case["pythonhashseed"], algo)
        with pytest.raises(InvalidInputError):
            Indexer(block_size=16, hash_seed=case["pythonhashseed"], algorithm=algo)
        return
    tp = TokenProcessor(16, case["pythonhashseed"], algo)
    ref = RefTokenProcessor(16, case["pythonhashseed"], algo)
    expected = [_expected_u64(b) for b in case["blocks"]]
    assert tp.block_keys(case["tokens"]) == expected
    assert ref.block_keys(case["tokens"]) == expected
    if algo == "sha256_cbor":
        assert tp.none_hash() == bytes.fromhex(case["none_hash"])
        assert ref.none_hash() == bytes.fromhex(case["none_hash"])
        digests = ref.block_digests(case["tokens"])
        assert [bytes(d).hex() for d in digests if isinstance(d, bytes)] == [b["digest_hex"] for b in case["blocks"]]
        # The event value is the last 8 digest bytes, big-endian.
        assert [last8(bytes.fromhex(b["digest_hex"])) for b in case["blocks"]] == expected
        if "block0_cbor_hex" in case:
            assert ref.block0_cbor(case["tokens"]).hex() == case["block0_cbor_hex"]
    else:
        # 64-bit rule: NONE_HASH is an int; the core hands back its 8 big-endian bytes.
        assert tp.none_hash() == int(case["none_hash"]).to_bytes(8, "big")
        assert ref.none_hash() == tp.none_hash()


def _algorithms() -> tuple[str, ...]:
    from kvindex_service import ALGORITHMS

    return ALGORITHMS


def test_algorithms_listed() -> None:
    assert set(_algorithms()) == {"sha256_cbor", "sha256_cbor_64bit", "xxh3"}


@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_capture_block_hashes(version: str) -> None:
    cap = load_vllm_capture(version)
    tp = TokenProcessor(cap["block_size"], cap["pythonhashseed"], cap["hash_algo"])
    ix = Indexer(
        block_size=cap["block_size"],
        hash_seed=cap["pythonhashseed"],
        algorithm=cap["hash_algo"],
        shards=1,
    )
    assert cap["vllm_block_hashes"]
    for name, prompt in cap["prompts"].items():
        expected = cap["vllm_block_hashes"][name]
        assert len(expected) == len(prompt) // cap["block_size"]
        assert tp.block_keys(prompt) == expected
        assert ix.block_keys(prompt) == expected
        assert ix.token_processor().block_keys(prompt) == expected
    ix.close()


def test_properties_echo_constructor() -> None:
    tp = TokenProcessor(32, "s", "sha256_cbor_64bit")
    assert (tp.block_size, tp.hash_seed, tp.algorithm) == (32, "s", "sha256_cbor_64bit")
    default = TokenProcessor()
    assert (default.block_size, default.hash_seed, default.algorithm) == (16, None, "sha256_cbor")
    # Unset seed means vLLM >= 0.29's fixed "vllm-none-hash", not a random root.
    assert default.none_hash() == RefTokenProcessor().none_hash()
    assert len(default.none_hash()) == 32
    assert len(TokenProcessor(algorithm="sha256_cbor_64bit").none_hash()) == 8


def test_accepts_any_int_sequence() -> None:
    tp = TokenProcessor(4, "7")
    lst = list(range(10))
    assert tp.block_keys(tuple(lst)) == tp.block_keys(lst) == tp.block_keys(range(10))
    assert tp.block_keys([]) == []
    assert tp.block_keys([1, 2, 3]) == []


# -- native == reference ------------------------------------------------------------------------


@SETTINGS
@given(
    tokens=tokens_st,
    block_size=st.integers(1, 64),
    seed=seed_st,
    algo=st.sampled_from(REFERENCE_ALGOS),
    lora=name_st,
    salt=name_st,
)
def test_native_equals_reference(
    tokens: list[int],
    block_size: int,
    seed: str | None,
    algo: str,
    lora: str | None,
    salt: str | None,
) -> None:
    tp = TokenProcessor(block_size, seed, algo)
    ref = RefTokenProcessor(block_size, seed, algo)
    got = tp.block_keys(tokens, lora_name=lora, cache_salt=salt)
    assert got == ref.block_keys(tokens, lora_name=lora, cache_salt=salt)
    assert len(got) == len(tokens) // block_size
    assert tp.none_hash() == ref.none_hash()


@SETTINGS
@given(
    tokens=st.lists(st.integers(0, U32_MAX), min_size=1, max_size=120),
    block_size=st.integers(1, 32),
    seed=seed_st,
    algo=st.sampled_from(("sha256_cbor", "sha256_cbor_64bit", "xxh3")),
    extra=st.lists(st.integers(0, U32_MAX), max_size=40),
)
def test_chaining_and_determinism(
    tokens: list[int], block_size: int, seed: str | None, algo: str, extra: list[int]
) -> None:
    tp = TokenProcessor(block_size, seed, algo)
    keys = tp.block_keys(tokens)
    # Deterministic across instances, and a prefix of the prompt gives a prefix of its keys.
    assert TokenProcessor(block_size, seed, algo).block_keys(tokens) == keys
    assert tp.block_keys(tokens + extra)[: len(keys)] == keys
    # Chained: changing the first token changes every full block's key.
    changed = [(tokens[0] + 1) % (U32_MAX + 1), *tokens[1:]]
    other = tp.block_keys(changed)
    assert all(a != b for a, b in zip(keys, other, strict=True))


@SETTINGS
@given(
    tokens=st.lists(st.integers(0, U32_MAX), min_size=16, max_size=96),
    algo=st.sampled_from(("sha256_cbor", "sha256_cbor_64bit", "xxh3")),
    lora=st.text(min_size=1, max_size=8),
    lora2=st.text(min_size=1, max_size=8),
    salt=st.text(min_size=1, max_size=8),
    salt2=st.text(min_size=1, max_size=8),
    seed=st.text(max_size=8),
    seed2=st.text(max_size=8),
)
def test_key_space_separation(
    tokens: list[int],
    algo: str,
    lora: str,
    lora2: str,
    salt: str,
    salt2: str,
    seed: str,
    seed2: str,
) -> None:
    tp = TokenProcessor(16, seed, algo)
    plain = set(tp.block_keys(tokens))
    with_lora = set(tp.block_keys(tokens, lora_name=lora))
    with_salt = set(tp.block_keys(tokens, cache_salt=salt))
    both = set(tp.block_keys(tokens, lora_name=lora, cache_salt=salt))
    assert plain.isdisjoint(with_lora)
    assert plain.isdisjoint(with_salt)
    if lora != salt:
        # (Same string as LoRA name or as salt gives the same block-0 extras, as in vLLM.)
        assert with_lora.isdisjoint(with_salt)
    assert both.isdisjoint(plain | with_lora | with_salt)
    if lora2 != lora:
        assert with_lora.isdisjoint(tp.block_keys(tokens, lora_name=lora2))
    if salt2 != salt:
        assert with_salt.isdisjoint(tp.block_keys(tokens, cache_salt=salt2))
    if seed2 != seed:
        assert plain.isdisjoint(TokenProcessor(16, seed2, algo).block_keys(tokens))
    others = {a for a in ("sha256_cbor", "sha256_cbor_64bit", "xxh3") if a != algo}
    if algo == "xxh3":
        for a in others:
            assert plain.isdisjoint(TokenProcessor(16, seed, a).block_keys(tokens))


def test_cache_salt_only_on_block_zero() -> None:
    # The salt enters block 0's extras only, but the chain carries it to every later block.
    tokens = list(range(64))
    tp = TokenProcessor(16, "42")
    ref = RefTokenProcessor(16, "42")
    assert ref.extra_keys(0, None, "s") == ["s"]
    assert ref.extra_keys(1, None, "s") is None
    assert ref.extra_keys(1, "l", "s") == ["l"]
    assert tp.block_keys(tokens, cache_salt="s") == ref.block_keys(tokens, cache_salt="s")
    assert set(tp.block_keys(tokens, cache_salt="s")).isdisjoint(tp.block_keys(tokens))


def test_empty_extras_mean_none() -> None:
    tokens = list(range(32))
    tp = TokenProcessor(16, "42")
    plain = tp.block_keys(tokens)
    assert tp.block_keys(tokens, lora_name="", cache_salt="") == plain
    assert tp.block_keys(tokens, lora_name=None, cache_salt=None) == plain


def test_model_separates_key_spaces() -> None:
    ix = Indexer(block_size=16, hash_seed="42", shards=1)
    tokens = list(range(48))
    keys = ix.block_keys(tokens)
    ix.add_blocks("pod", "model-a", keys)
    assert ix.score("model-a", tokens).best() is not None
    assert ix.score("model-b", tokens).scores == []
    assert ix.lookup("model-b", keys) == [[], [], []]
    ix.close()


# -- bad input ------------------------------------------------------------------------------------

BAD_TOKEN_LISTS: list[Any] = [
    [-1],
    [2**32],
    [2**64],
    [-(2**70)],
    [1.0],
    [1.5],
    ["1"],
    [None],
    [True],
    [False],
    [b"x"],
    [[1]],
    [1] * 20 + [-1],
    [1] * 15 + [2**32],
    "1234",
    b"\x01\x02",
    None,
    5,
]


@pytest.mark.parametrize("bad", BAD_TOKEN_LISTS, ids=repr)
def test_bad_token_ids(bad: Any) -> None:
    tp = TokenProcessor(16, "42")
    ix = Indexer(hash_seed="42", shards=1)
    ix.add_blocks("p", "m", tp.block_keys(list(range(32))))
    calls = [
        lambda: tp.block_keys(bad),
        lambda: tp.block_keys(bad, lora_name="l", cache_salt="s"),
        lambda: ix.block_keys(bad),
        lambda: ix.score("m", bad),
        lambda: ix.score("m", bad, pods=["p"]),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, KvIndexError)
        assert str(info.value)
    # Nothing lost: the index still answers.
    best = ix.score("m", list(range(32))).best()
    assert best is not None and best.matched_blocks == 2
    ix.close()


@pytest.mark.parametrize("block_size", [0, -1, -(2**40), 2**40])
def test_bad_block_size(block_size: int) -> None:
    with pytest.raises(InvalidInputError):
        TokenProcessor(block_size)
    with pytest.raises(ValueError):
        Indexer(block_size=block_size)


@pytest.mark.parametrize("algo", ["", "sha256", "SHA256_CBOR", "xxhash", "xxhash_cbor", "builtin"])
def test_unknown_algorithm(algo: str) -> None:
    with pytest.raises(InvalidInputError):
        TokenProcessor(16, None, algo)
    with pytest.raises(ValueError):
        Indexer(algorithm=algo)


@pytest.mark.parametrize("bad", [True, False])
def test_bool_token_rejected(bad: bool) -> None:
    # True == 1 in Python, but a bool in a token list is a caller bug, not token 1.
    with pytest.raises(InvalidInputError):
        TokenProcessor(1).block_keys([bad])


def test_wrong_argument_types_are_type_errors() -> None:
    with pytest.raises(TypeError):
        TokenProcessor(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TokenProcessor(16, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TokenProcessor(16).block_keys([1], lora_name=3)  # type: ignore[arg-type]


@SETTINGS
@given(
    bad=st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=U32_MAX + 1),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
    ),
    prefix=st.lists(st.integers(0, U32_MAX), max_size=40),
)
def test_bad_token_anywhere(bad: Any, prefix: list[int]) -> None:
    tp = TokenProcessor(8, "1")
    with pytest.raises(InvalidInputError):
        tp.block_keys([*prefix, bad])
