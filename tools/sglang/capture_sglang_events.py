"""Capture SGLang's own KV events: tests/fixtures/sglang/sglang-<version>.json.

SGLang's event path is its radix cache (``sglang/srt/mem_cache/radix_cache.py``) recording
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` as pages are inserted, split and
evicted, and its ``ZmqEventPublisher`` (``sglang/srt/disaggregation/kv_events.py``) sending
each scheduler step's events as one msgpack ``KVEventBatch`` in ``[topic, seq, payload]``
frames. This script runs exactly that code from an unpacked ``sglang`` wheel: it imports the
real ``RadixCache``, event classes and publisher, and stands in only for what they import but
never use on this path (torch, GPU kernels, the memory pools): a permissive stand-in module
answers those imports, and torch's ``tensor`` becomes a Python list (the simulated cache stores
token ids as its values).

Two pods each run their own cache and publisher, bound on loopback; a ZMQ SUB receives the
frames, and after every message the fixture records how many leading full pages of each prompt
each pod's tree holds (read from the tree itself, not from the events). A replay request for
seq 2 of the first pod is sent to its real replay ROUTER and the reply frames are kept.

    pip download --no-deps -d /tmp/sgl sglang==0.5.23
    mkdir /tmp/sgl/0.5.23 && cd /tmp/sgl/0.5.23 && unzip -q ../sglang-0.5.23-*.whl 'sglang/*'
    python tools/sglang/capture_sglang_events.py /tmp/sgl/0.5.23 0.5.23
    python tools/sglang/capture_sglang_events.py /tmp/sgl/0.5.23 0.5.23 1   # SGLang's default page size

Needs ``msgspec``, ``pyzmq`` and ``pydantic`` (SGLang's own publisher dependencies), ``msgpack``, and, from
0.5.23 on, ``pybind11`` and OpenSSL headers: SGLang hashes pages in a C++ extension
(``mem_cache/cpp_utils/hash_binding.cpp``) that it builds at run time with torch; this script
builds the same file with pybind11 instead.
"""

from __future__ import annotations

import base64
import importlib.abc
import importlib.machinery
import json
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
from array import array
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PAGE = 16
MODEL = "meta-llama/Llama-3.2-3B-Instruct"
PODS = ("10.0.0.1:30000", "10.0.0.2:30000")
SALT = "tenant-a"
LORA_NAME = "sql-adapter"
LORA_ID = "0123456789abcdef0123456789abcdef"  # SGLang's lora_id: a uuid hex string
# Modules imported for real; every other sglang module, torch and the GPU stacks are stand-ins.
REAL = (
    "sglang.srt.disaggregation.kv_events",
    "sglang.srt.mem_cache.radix_cache",
    "sglang.srt.mem_cache.base_prefix_cache",
    "sglang.srt.mem_cache.cache_init_params",
    "sglang.srt.mem_cache.evict_policy",
    "sglang.srt.mem_cache.hicache_storage",
    "sglang.srt.mem_cache.events",
    "sglang.srt.mem_cache.utils",
    "sglang.srt.mem_cache.cpp_utils",
)
FAKE_TOP = ("torch", "triton", "numpy", "sgl_kernel", "psutil", "requests", "flashinfer")


class _Anything(type):
    """A class that is every attribute, call result and subscript of itself."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls

    def __getitem__(cls, key: Any) -> Any:
        return cls

    def __or__(cls, other: Any) -> Any:
        return cls

    def __ror__(cls, other: Any) -> Any:
        return cls


class _Values(list[int]):
    """What the simulated cache stores per node: token ids, as torch's ``tensor`` would."""

    def clone(self) -> _Values:
        return _Values(self)

    def __getitem__(self, i: Any) -> Any:
        got = super().__getitem__(i)
        return _Values(got) if isinstance(i, slice) else got


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self.__name__ == "torch":
            if name == "tensor":
                return lambda data, dtype=None, **kw: _Values(data)
            if name == "cat":
                return lambda parts, **kw: _Values(x for p in parts for x in p)
            if name == "device":
                return lambda *a, **kw: "cpu"
        return _Anything(name, (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        top = name.split(".")[0]
        if top == "sglang" and not any(name == r or name.startswith(r + ".") for r in REAL):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        if top in FAKE_TOP:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        m = _StandIn(spec.name)
        # a stand-in sglang package still leads to its real submodules
        m.__path__ = [str(self.root.joinpath(*spec.name.split(".")))] if spec.name.startswith("sglang") else []
        return m

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _native_hash(root: Path, work: Path) -> Any:
    """SGLang's page-hash extension, built from its own source with pybind11."""
    import pybind11

    src = root / "sglang/srt/mem_cache/cpp_utils/hash_binding.cpp"
    out = work / ("hicache_hash_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", "-mavx2", "-DTORCH_EXTENSION_NAME=hicache_hash_cpp"]
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    cmd = ["g++", *flags, *includes, str(src), "-o", str(out), "-lcrypto"]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(work))
    import hicache_hash_cpp  # type: ignore[import-not-found]

    return hicache_hash_cpp


class _Pool:
    """The KV pool the simulated cache frees into (it holds token ids, not GPU pages)."""

    device = "cpu"

    def free(self, value: Any) -> None:
        pass

    def free_segment(self, value: Any, start_pos: int = 0) -> None:
        pass


class Engine:
    """One SGLang pod: its radix cache and its publisher, in the version's own API."""

    def __init__(self, rc: Any, ke: Any, version: tuple[int, ...], pod: str, port: int, replay_port: int) -> None:
        self.rc, self.ke, self.version = rc, ke, version
        if version < (0, 5):
            self.cache = rc.RadixCache(None, _Pool(), page_size=PAGE, disable=False, enable_kv_cache_events=True)
        elif hasattr(rc.RadixCache, "create_simulated"):
            from sglang.srt.mem_cache.events import KvEventLoraNames

            # the scheduler registers each LoRA request's namespace with its adapter's name
            self.lora_names = KvEventLoraNames()
            self.lora_names.register(types.SimpleNamespace(lora_id=LORA_ID, extra_key=LORA_ID), LORA_NAME)
            self.cache = rc.RadixCache.create_simulated(
                mock_allocator=_Pool(), page_size=PAGE, enable_kv_cache_events=True, kv_event_lora_names=self.lora_names
            )
        else:
            from sglang.srt.mem_cache.cache_init_params import CacheInitParams

            params = CacheInitParams(
                disable=False,
                req_to_token_pool=None,
                token_to_kv_pool_allocator=_Pool(),
                page_size=PAGE,
                enable_kv_cache_events=True,
            )
            self.cache = rc.RadixCache(params)
        self.pub = ke.ZmqEventPublisher(
            attn_dp_rank=0,
            endpoint=f"tcp://*:{port}",
            replay_endpoint=f"tcp://*:{replay_port}",
            topic=f"kv@{pod}@{MODEL}",
        )

    def key(self, tokens: list[int], salt: str | None = None, lora: str | None = None) -> Any:
        if self.version < (0, 5):
            return list(tokens)
        if salt is not None or lora is not None:
            # a LoRA request's extra_key ends with its adapter's lora_id (here: is it)
            return self.rc.RadixKey(array("q", tokens), cache_salt=salt, extra_key=lora)
        return self.rc.RadixKey(array("q", tokens) if self.version >= (0, 5, 20) else list(tokens))

    def insert(self, tokens: list[int], salt: str | None = None, lora: str | None = None) -> None:
        """A finished request: its page-aligned prefix goes into the tree (``cache_finished_req``)."""
        tokens = tokens[: len(tokens) // PAGE * PAGE]
        if self.version < (0, 5):
            self.cache.insert(self.key(tokens))
        else:
            from sglang.srt.mem_cache.base_prefix_cache import InsertParams

            self.cache.insert(InsertParams(key=self.key(tokens, salt, lora)))

    def evict(self, n_tokens: int) -> None:
        if self.version < (0, 5):
            self.cache.evict(n_tokens)
        else:
            from sglang.srt.mem_cache.base_prefix_cache import EvictParams

            self.cache.evict(EvictParams(num_tokens=n_tokens))

    def take(self) -> list[Any]:
        kv = getattr(self.cache, "kv_events", None)
        return list(kv.take()) if kv is not None else list(self.cache.take_events())

    def step(self) -> None:
        """One scheduler step: whatever the cache recorded goes out as one batch."""
        self.pub.publish(self.ke.KVEventBatch(ts=time.time(), events=self.take()))

    def held_pages(self, tokens: list[int], salt: str | None = None, lora: str | None = None) -> int:
        """Leading full pages of ``tokens`` (in the namespace of ``salt`` and the LoRA id) in the
        tree, node by node."""
        node, pos = self.cache.root_node, 0
        while pos < len(tokens):
            nxt = None
            for child in node.children.values():
                ck = child.key
                if getattr(ck, "cache_salt", None) != salt or getattr(ck, "extra_key", None) != lora:
                    continue
                toks = list(ck.token_ids[: len(ck)]) if hasattr(ck, "token_ids") else list(ck)
                if toks and toks[0] == tokens[pos]:
                    nxt = (child, toks)
                    break
            if nxt is None:
                break
            child, toks = nxt
            common = 0
            while common < len(toks) and pos + common < len(tokens) and toks[common] == tokens[pos + common]:
                common += 1
            pos += common
            if common < len(toks):
                break
            node = child
        return pos // PAGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _prompts() -> dict[str, list[int]]:
    """Real Llama 3.2 token ids: the vLLM captures' two prompts (they share two 16-token pages)
    and a third made of P2's first page and P1's tail."""
    vllm = json.loads((REPO / "tests/fixtures/vllm/vllm-0.33.0.json").read_text())["prompts"]
    p1, p2 = vllm["P1"], vllm["P2"]
    return {"P1": p1, "P2": p2, "P3": p2[:16] + p1[48:]}


def _decode(payload: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def capture(root: Path, version_text: str) -> dict[str, Any]:
    sys.path.insert(0, str(root))
    sys.meta_path.insert(0, _Finder(root))
    version = tuple(int(x) for x in version_text.split(".")[:3] if x.isdigit())
    work = Path(tempfile.mkdtemp())
    if (root / "sglang/srt/mem_cache/cpp_utils/hash_binding.cpp").exists():
        native = _native_hash(root, work)
        import sglang.srt.mem_cache.cpp_utils.native_hash as nh

        nh._load_native_hash_module = lambda: native
    import sglang.srt.disaggregation.kv_events as ke
    import sglang.srt.mem_cache.radix_cache as rc
    import zmq

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    engines: dict[str, Engine] = {}
    replay_ports: dict[str, int] = {}
    for pod in PODS:
        port, replay_port = _free_port(), _free_port()
        engines[pod] = Engine(rc, ke, version, pod, port, replay_port)
        replay_ports[pod] = replay_port
        sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.5)  # the SUB joins before the first batch
    prompts = _prompts()
    salted = version >= (0, 5, 20)  # RadixKey.cache_salt: the tree and the events are namespaced by it
    salts = {"P1+salt": SALT} if salted else {}
    loras = {"P2+lora": LORA_NAME} if salted else {}
    if salted:
        prompts["P1+salt"] = prompts["P1"]
        prompts["P2+lora"] = prompts["P2"]
    first, second = PODS
    a, b = engines[first], engines[second]
    messages: list[dict[str, Any]] = []

    def step(engine: Engine, pod: str, what: str) -> None:
        engine.step()
        frames = sub.recv_multipart()
        topic, seq, payload = frames
        messages.append(
            {
                "pod": pod,
                "what": what,
                "frames_b64": [base64.b64encode(f).decode() for f in frames],
                "topic": topic.decode(),
                "seq": int.from_bytes(seq, "big"),
                "decoded": _decode(payload),
                "expect_after": {
                    p: {k: e.held_pages(t, salts.get(k), LORA_ID if k in loras else None) for k, t in prompts.items()}
                    for p, e in engines.items()
                },
            }
        )

    a.insert(prompts["P1"])
    step(a, first, "P1 cached")
    a.insert(prompts["P2"])
    step(a, first, "P2 cached: the shared pages split P1's node")
    b.insert(prompts["P2"])
    step(b, second, "P2 cached on the second pod")
    a.evict(2 * PAGE)
    step(a, first, "two pages evicted (a leaf)")
    a.insert(prompts["P3"])
    step(a, first, "P3 cached")
    b.insert(prompts["P3"])
    step(b, second, "P3 cached on the second pod")
    a.evict(10_000)
    step(a, first, "everything evicted")
    a.insert(prompts["P1"])
    step(a, first, "P1 cached again")
    if salted:
        b.insert(prompts["P1"], SALT)
        step(b, second, "P1 cached under a cache_salt on the second pod")
        a.insert(prompts["P2"], lora=LORA_ID)
        step(a, first, "P2 cached for a LoRA adapter")
    b.cache.reset()
    step(b, second, "cache reset")

    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{replay_ports[first]}")
    request = [b"", (2).to_bytes(8, "big")]
    dealer.send_multipart(request)
    replies = []
    while True:
        frames = dealer.recv_multipart()
        replies.append([base64.b64encode(f).decode() for f in frames])
        if frames[-2] == b"\xff" * 8:
            break
    for e in engines.values():
        e.pub.shutdown()

    return {
        "what": "Frames received by a ZMQ SUB from SGLang's own ZmqEventPublisher, events recorded by its own RadixCache",
        "sglang_version": version_text,
        "page_size": PAGE,
        "model": MODEL,
        "tokenizer": "Llama 3.2 tokenizer.json",
        "prompts": prompts,
        "cache_salts": salts,
        "lora_names": loras,
        "messages": messages,
        "replay_from_seq_2_of_first_pod": {
            "pod": first,
            "request_frames_b64": [base64.b64encode(f).decode() for f in request],
            "reply_frames_b64": replies,
        },
        "expect_note": (
            "expect_after[pod][prompt] = leading full pages of that prompt the pod's radix tree holds after"
            " the message (a prompt named in cache_salts or lora_names is looked up under that salt or adapter)"
        ),
    }


def main() -> None:
    """``ROOT VERSION [PAGE_SIZE]``: a page size other than 16 is written as ``-page<N>``."""
    global PAGE
    root, version = Path(sys.argv[1]), sys.argv[2]
    PAGE = int(sys.argv[3]) if len(sys.argv) > 3 else PAGE
    data = capture(root, version)
    suffix = "" if PAGE == 16 else f"-page{PAGE}"
    out = REPO / "tests/fixtures/sglang" / f"sglang-{version}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
