"""Block index: the native `Indexer` against the dict model, capacity bounds, concurrency."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvindex_service import Indexer, InvalidInputError
from tests.native.reference import RefIndex, assert_same_scores

PODS = ("10.0.0.1:8000", "10.0.0.2:8000", "pod-c", "pod-d")
MODELS = ("m0", "org/m1@v2")
TIERS = ("GPU", "CPU", "SSD")
WEIGHTS = {"GPU": 1.0, "CPU": 0.5, "SSD": 0.25}
# A small key pool so that operations collide, with the u64 extremes in it.
KEY_POOL = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 2**63, 2**64 - 1)

keys_st = st.lists(st.sampled_from(KEY_POOL), max_size=8)


def nonzero(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if v}


class IndexMachine(RuleBasedStateMachine):
    """Random direct operations on one native index and on the dict model; every read agrees."""

    def __init__(self) -> None:
        super().__init__()
        self.ix = Indexer(block_size=4, shards=2, max_keys=1 << 20, tier_weights=WEIGHTS)
        self.ref = RefIndex(block_size=4, tier_weights=WEIGHTS)
        self.known: set[str] = set()

    def teardown(self) -> None:
        self.ix.close()

    @rule(
        pod=st.sampled_from(PODS),
        model=st.sampled_from(MODELS),
        keys=keys_st,
        tier=st.sampled_from(TIERS),
    )
    def add(self, pod: str, model: str, keys: list[int], tier: str) -> None:
        self.ix.add_blocks(pod, model, keys, tier)
        self.ref.add_blocks(pod, model, keys, tier)
        self.known.add(pod)

    @rule(
        pod=st.sampled_from(PODS),
        model=st.sampled_from(MODELS),
        keys=keys_st,
        tier=st.sampled_from(TIERS),
    )
    def remove(self, pod: str, model: str, keys: list[int], tier: str) -> None:
        self.ix.remove_blocks(pod, model, keys, tier)
        self.ref.remove_blocks(pod, model, keys, tier)

    @rule(pod=st.sampled_from(PODS))
    def clear(self, pod: str) -> None:
        self.ix.clear_pod(pod)
        assert self.ix.flush(10.0)
        self.ref.clear_pod(pod)

    @rule(pod=st.sampled_from(PODS))
    def forget(self, pod: str) -> None:
        self.ix.remove_pod(pod)
        assert self.ix.flush(10.0)
        self.ref.clear_pod(pod)
        self.known.discard(pod)
        assert self.ix.pod_state(pod) is None

    @rule(
        model=st.sampled_from(MODELS),
        keys=st.lists(st.sampled_from(KEY_POOL), max_size=10),
        pods=st.one_of(st.none(), st.lists(st.sampled_from((*PODS, "never-seen")), max_size=3)),
    )
    def score(self, model: str, keys: list[int], pods: list[str] | None) -> None:
        got = self.ix.score_keys(model, keys, pods=pods)
        assert_same_scores(got, self.ref.score_keys(model, keys, pods))
        assert got.keys_computed <= len(keys)

    @rule(
        model=st.sampled_from(MODELS),
        keys=st.lists(st.sampled_from(KEY_POOL), max_size=10),
        pods=st.one_of(st.none(), st.lists(st.sampled_from(PODS), max_size=3)),
    )
    def lookup(self, model: str, keys: list[int], pods: list[str] | None) -> None:
        got = self.ix.lookup(model, keys, pods=pods)
        assert len(got) == len(keys)
        for entries in got:
            assert len(entries) == len(set(entries)), "duplicate (pod, tier) entries"
        assert [set(e) for e in got] == self.ref.lookup(model, keys, pods)

    @invariant()
    def pods_agree(self) -> None:
        states = {s.pod: s for s in self.ix.pod_states()}
        assert set(states) == self.known
        for pod in PODS:
            state = self.ix.pod_state(pod)
            if pod not in self.known:
                assert state is None
                continue
            assert state is not None and state.pod == pod
            assert nonzero(state.blocks_by_tier) == self.ref.blocks_by_tier(pod)
            assert self.ref.models_of(pod) <= set(state.models)

    @invariant()
    def stats_agree(self) -> None:
        st_ = self.ix.stats()
        assert st_.keys == len(self.ref.entries)
        assert st_.entries == sum(len(h) for h in self.ref.entries.values())
        assert st_.key_evictions == 0 and st_.entry_evictions == 0
        assert st_.pods == len(self.known)

    @precondition(lambda self: bool(self.ref.entries))
    @rule(data=st.data())
    def score_a_held_chain(self, data: st.DataObject) -> None:
        # Random key lists rarely start with a held key; build one that does.
        model, key = data.draw(st.sampled_from(sorted(self.ref.entries)))
        rest = data.draw(st.lists(st.sampled_from(KEY_POOL), max_size=6))
        keys = [key, *rest]
        assert_same_scores(self.ix.score_keys(model, keys), self.ref.score_keys(model, keys))


IndexMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexAgainstModel = IndexMachine.TestCase


# -- direct semantics -------------------------------------------------------------------------


def test_removal_is_per_tier() -> None:
    ix = Indexer(shards=1)
    ix.add_blocks("p", "m", [1, 2], "GPU")
    ix.add_blocks("p", "m", [1, 2], "CPU")
    ix.remove_blocks("p", "m", [1], "GPU")
    assert set(ix.lookup("m", [1])[0]) == {("p", "CPU")}
    s = ix.score_keys("m", [1, 2]).scores[0]
    assert s.matched_blocks == 2
    assert s.score == pytest.approx(0.8 + 1.0)  # default CPU weight, then GPU
    assert nonzero(s.tier_blocks) == {"CPU": 2}
    ix.close()


def test_tier_names_are_case_insensitive() -> None:
    ix = Indexer(shards=1)
    ix.add_blocks("p", "m", [1], "gpu")
    assert ix.lookup("m", [1]) == [[("p", "GPU")]]
    ix.remove_blocks("p", "m", [1], "Gpu")
    assert ix.lookup("m", [1]) == [[]]
    ix.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda ix: ix.add_blocks("p", "m", [-1]),
        lambda ix: ix.add_blocks("p", "m", [2**64]),
        lambda ix: ix.add_blocks("p", "m", [1.0]),
        lambda ix: ix.add_blocks("p", "m", ["1"]),
        lambda ix: ix.add_blocks("p", "m", [1], ""),
        lambda ix: ix.add_blocks("", "m", [1]),
        lambda ix: ix.add_blocks("x" * 5000, "m", [1]),
        lambda ix: ix.remove_blocks("p", "m", [-5]),
        lambda ix: ix.score_keys("m", [2**64]),
        lambda ix: ix.lookup("m", [-1]),
    ],
)
def test_bad_direct_input(call: object) -> None:
    ix = Indexer(shards=1)
    ix.add_blocks("p", "m", [7])
    with pytest.raises(ValueError):
        call(ix)  # type: ignore[operator]
    # The bad call changed nothing.
    assert ix.lookup("m", [7]) == [[("p", "GPU")]]
    assert ix.stats().entries == 1
    ix.close()


def test_tier_registry_is_bounded() -> None:
    """Tier names are interned; a flood of new names is refused, not stored without bound."""
    ix = Indexer(shards=1)
    refused = 0
    for i in range(200):
        try:
            ix.add_blocks("p", "m", [1], f"TIER{i}")
        except InvalidInputError:
            refused += 1
    assert refused > 150
    state = ix.pod_state("p")
    assert state is not None and len(state.blocks_by_tier) <= 16
    ix.close()


# -- capacity ---------------------------------------------------------------------------------

# Multiple of every plausible internal key-shard count, so the split is exact.
BIG_CAP = 4096


def test_max_keys_bound_and_lru() -> None:
    ix = Indexer(shards=1, max_keys=BIG_CAP)
    hot = list(range(1, 33))
    ix.add_blocks("p", "m", hot)
    inserted = len(hot)
    cold = 1_000_000
    for _ in range(100):
        batch = list(range(cold, cold + 200))
        cold += 200
        ix.add_blocks("p", "m", batch)
        inserted += len(batch)
        ix.add_blocks("p", "m", hot)  # refresh: the hot keys are the most recently used
        st_ = ix.stats()
        assert st_.keys <= BIG_CAP
        assert st_.max_keys == BIG_CAP
    st_ = ix.stats()
    assert st_.key_evictions == inserted - st_.keys
    assert st_.keys > BIG_CAP // 2
    assert st_.entries == st_.keys
    # Least recently used go first: the hot set and the newest key survive, the oldest do not.
    assert all(ix.lookup("m", hot))
    assert ix.lookup("m", [cold - 1]) == [[("p", "GPU")]]
    oldest = list(range(1_000_000, 1_000_200))
    assert not any(ix.lookup("m", oldest))
    # Per-pod accounting follows evictions.
    state = ix.pod_state("p")
    assert state is not None and nonzero(state.blocks_by_tier) == {"GPU": st_.entries}
    ix.close()


@pytest.mark.parametrize("max_keys", [1, 10, 100, 1000])
def test_small_max_keys_bound(max_keys: int) -> None:
    ix = Indexer(shards=1, max_keys=max_keys)
    ix.add_blocks("p", "m", list(range(5 * max_keys + 200)))
    assert ix.stats().keys <= max_keys
    ix.close()


def test_max_pods_per_key_lru() -> None:
    ix = Indexer(shards=1, max_pods_per_key=3)
    for pod in ("a", "b", "c"):
        ix.add_blocks(pod, "m", [42])
    ix.add_blocks("a", "m", [42])  # refresh a: b is now least recently used
    ix.add_blocks("d", "m", [42])
    assert {p for p, _ in ix.lookup("m", [42])[0]} == {"a", "c", "d"}
    ix.add_blocks("e", "m", [42], "CPU")
    assert {p for p, _ in ix.lookup("m", [42])[0]} == {"a", "d", "e"}
    st_ = ix.stats()
    assert st_.entry_evictions == 2
    assert st_.entries == 3 and st_.max_pods_per_key == 3
    state_b = ix.pod_state("b")
    assert state_b is not None and nonzero(state_b.blocks_by_tier) == {}
    ix.close()


def test_max_pods_per_key_bound_random() -> None:
    rng = random.Random(7)
    ix = Indexer(shards=1, max_pods_per_key=4)
    for _ in range(2000):
        ix.add_blocks(f"pod{rng.randrange(20)}", "m", [rng.randrange(50)], rng.choice(TIERS))
    for entries in ix.lookup("m", list(range(50))):
        assert len(entries) <= 4
    st_ = ix.stats()
    assert st_.entries <= 4 * st_.keys
    assert st_.entry_evictions > 0
    ix.close()


def test_bytes_used_grows_with_entries() -> None:
    ix = Indexer(shards=1)
    before = ix.stats().bytes_used
    ix.add_blocks("p", "m", list(range(10_000)))
    after = ix.stats().bytes_used
    assert after > before + 10_000 * 8  # at least the 8-byte keys themselves
    ix.add_blocks("q", "m", list(range(10_000)))
    more = ix.stats().bytes_used
    assert more > after
    ix.remove_pod("p")
    ix.remove_pod("q")
    assert ix.flush(10.0)
    assert ix.stats().entries == 0
    assert ix.stats().bytes_used < more
    ix.close()


def test_models_never_share_entries() -> None:
    ix = Indexer(shards=2)
    ix.add_blocks("p", "a", [1, 2, 3])
    ix.add_blocks("q", "b", [1, 2, 3])
    assert ix.lookup("a", [1, 2, 3]) == [[("p", "GPU")]] * 3
    assert ix.lookup("b", [1, 2, 3]) == [[("q", "GPU")]] * 3
    ix.remove_blocks("p", "b", [1, 2, 3])
    ix.remove_blocks("q", "a", [1, 2, 3])
    assert [s.pod for s in ix.score_keys("a", [1, 2, 3]).scores] == ["p"]
    assert [s.pod for s in ix.score_keys("b", [1, 2, 3]).scores] == ["q"]
    assert ix.stats().models == 2
    ix.close()


# -- concurrency --------------------------------------------------------------------------------


def _writer(ix: Indexer, ref: RefIndex, pod: str, seed: int, errors: list[BaseException]) -> None:
    """Random adds/removes for one pod, mirrored into that pod's private model."""
    try:
        rng = random.Random(seed)
        for _ in range(2000):
            model = rng.choice(MODELS)
            keys: Sequence[int] = [rng.randrange(64) for _ in range(rng.randrange(1, 12))]
            tier = rng.choice(TIERS)
            if rng.random() < 0.65:
                ix.add_blocks(pod, model, keys, tier)
                ref.add_blocks(pod, model, keys, tier)
            else:
                ix.remove_blocks(pod, model, keys, tier)
                ref.remove_blocks(pod, model, keys, tier)
            if rng.random() < 0.02:
                # Queued behind this pod's earlier work; direct writes are not queued, so wait.
                ix.clear_pod(pod)
                assert ix.flush(10.0)
                ref.clear_pod(pod)
    except BaseException as exc:  # pragma: no cover - reported by the main thread
        errors.append(exc)


def _reader(ix: Indexer, stop: threading.Event, errors: list[BaseException]) -> None:
    try:
        rng = random.Random(99)
        while not stop.is_set():
            keys = [rng.randrange(64) for _ in range(8)]
            res = ix.score_keys(rng.choice(MODELS), keys, pods=list(PODS))
            assert len(res.scores) == len(PODS)
            for s in res.scores:
                assert 0 <= s.matched_blocks <= len(keys)
            ix.lookup(rng.choice(MODELS), keys)
            ix.stats()
    except BaseException as exc:  # pragma: no cover - reported by the main thread
        errors.append(exc)


def test_concurrent_writers_and_readers_match_model() -> None:
    ix = Indexer(block_size=4, shards=2, max_keys=1 << 20, tier_weights=WEIGHTS)
    refs = {pod: RefIndex(block_size=4, tier_weights=WEIGHTS) for pod in PODS}
    errors: list[BaseException] = []
    stop = threading.Event()
    readers = [threading.Thread(target=_reader, args=(ix, stop, errors)) for _ in range(2)]
    writers = [threading.Thread(target=_writer, args=(ix, refs[pod], pod, i, errors)) for i, pod in enumerate(PODS)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert ix.flush(10.0)
    assert not errors, errors
    # Writers touched disjoint pods, so the union of their models is the whole truth.
    merged = RefIndex(block_size=4, tier_weights=WEIGHTS)
    for ref in refs.values():
        for (model, key), holders in ref.entries.items():
            merged.entries.setdefault((model, key), set()).update(holders)
    for model in MODELS:
        keys = list(range(64))
        assert [set(e) for e in ix.lookup(model, keys)] == merged.lookup(model, keys)
        for start in range(0, 64, 8):
            window = keys[start : start + 8]
            assert_same_scores(
                ix.score_keys(model, window, pods=list(PODS)),
                merged.score_keys(model, window, list(PODS)),
            )
    for pod in PODS:
        state = ix.pod_state(pod)
        assert state is not None
        assert nonzero(state.blocks_by_tier) == merged.blocks_by_tier(pod)
    ix.close()


class Clock:
    """CLOCK with second chance, as the index evicts: keys in slots, one reference bit each;
    a re-added key sets its bit; the hand clears set bits and evicts the first key found
    clear, whose slot the new key takes (just behind the hand)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.hand = cap, 0
        self.slots: list[list[int]] = []  # [key, referenced]

    def add(self, k: int) -> bool:
        """True when a key was evicted."""
        for slot in self.slots:
            if slot[0] == k:
                slot[1] = 1
                return False
        if len(self.slots) < self.cap:
            self.slots.append([k, 0])
            return False
        while True:
            self.hand %= self.cap
            slot = self.slots[self.hand]
            self.hand += 1
            if slot[1]:
                slot[1] = 0
                continue
            slot[:] = [k, 0]
            return True


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=5), max_size=60))
def test_small_index_evicts_by_clock(ops: list[list[int]]) -> None:
    """A small index is one CLOCK: it evicts the key the reference model evicts."""
    cap = 16
    ix = Indexer(shards=1, max_keys=cap)
    model = Clock(cap)
    evictions = 0
    for keys in ops:
        ix.add_blocks("p", "m", keys)
        evictions += sum(model.add(k) for k in keys)
        st_ = ix.stats()
        assert st_.keys == len(model.slots) <= cap
        assert st_.key_evictions == evictions
    everything = list(range(41))
    held = [k for k, e in zip(everything, ix.lookup("m", everything), strict=True) if e]
    assert held == sorted(k for k, _ in model.slots)
    ix.close()
