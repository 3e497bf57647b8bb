"""Settings precedence: CLI flags > environment > YAML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kvindex_service.cli import build_parser, serve_overrides
from kvindex_service.config import LLAMA32_MODELS, load_settings
from kvindex_service.tokenization import find_llama3_tokenizer_dir


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("KVINDEX_"):
            monkeypatch.delenv(key)


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvindex.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings()
    assert (s.http.host, s.http.port, s.http.max_body_bytes) == ("0.0.0.0", 8080, 4 * 1024 * 1024)
    assert s.zmq.bind == "tcp://0.0.0.0:5557" and s.zmq.pods == [] and s.zmq.topic_prefix == "kv@"
    assert (s.index.block_size, s.index.hash_seed, s.index.hash_algo) == (16, None, "sha256_cbor")
    assert s.index.tier_weights == {"GPU": 1.0, "CPU": 0.8}
    assert s.tokenizers.mode == "exact" and s.tokenizers.sources == {}
    assert (s.log.level, s.log.json_) == ("INFO", False)


def test_precedence_cli_over_env_over_yaml_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _yaml(
        tmp_path,
        """
http: {port: 9001, host: 10.1.1.1}
index: {block_size: 32, hash_seed: 42, max_keys: 1000}
zmq:
  bind: tcp://0.0.0.0:6000
  pods:
    - {endpoint: "tcp://10.0.0.1:5557", pod_id: "10.0.0.1:8000"}
tokenizers:
  sources: {a/model: /yaml/a, b/model: /yaml/b}
log: {json: true}
""",
    )
    monkeypatch.setenv("KVINDEX_HTTP__PORT", "9002")
    monkeypatch.setenv("KVINDEX_INDEX__BLOCK_SIZE", "64")
    monkeypatch.setenv("KVINDEX_TOKENIZERS__SOURCES", '{"b/model": "/env/b"}')
    monkeypatch.setenv("KVINDEX_LOG__LEVEL", "debug")
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--port", "9003", "--hash-seed", "7"])
    s = load_settings(args.config, serve_overrides(args))
    assert s.http.port == 9003  # CLI beats env and YAML
    assert s.index.hash_seed == "7"  # CLI beats YAML (and YAML's int became a string)
    assert s.index.block_size == 64  # env beats YAML
    assert s.log.level == "DEBUG"  # env beats the default
    assert s.http.host == "10.1.1.1"  # YAML beats the default
    assert s.index.max_keys == 1000
    assert s.log.json_ is True
    assert s.zmq.bind == "tcp://0.0.0.0:6000"
    assert s.zmq.pods[0].pod_id == "10.0.0.1:8000"
    # Nested mappings merge key by key: env replaced b/model, YAML's a/model stays.
    assert s.tokenizers.sources == {"a/model": "/yaml/a", "b/model": "/env/b"}
    # Without flags the env layer wins.
    s2 = load_settings(cfg)
    assert s2.http.port == 9002 and s2.index.hash_seed == "42"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVINDEX_CONFIG", str(_yaml(tmp_path, "http: {port: 7777}\n")))
    assert load_settings().http.port == 7777


def test_cli_flags_shape(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--host", "127.0.0.1", "--zmq-bind", "none", "--block-size", "32", "--hash-algo", "xxh3",
            "--pod", "10.0.0.1:8000=tcp://10.0.0.1:5557,tcp://10.0.0.1:5558",
            "--pod", "10.0.0.2:8000=tcp://10.0.0.2:5557",
            "--tokenizer", "my/model=/models/tok", "--chat-template", "my/model=/t.jinja",
            "--log-level", "warning",
        ]
    )  # fmt: skip
    s = load_settings(None, serve_overrides(args))
    assert s.zmq.bind is None
    assert [(p.pod_id, p.endpoint, p.replay_endpoint) for p in s.zmq.pods] == [
        ("10.0.0.1:8000", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558"),
        ("10.0.0.2:8000", "tcp://10.0.0.2:5557", None),
    ]
    assert (s.index.block_size, s.index.hash_algo) == (32, "xxh3")
    assert s.tokenizers.sources == {"my/model": "/models/tok"}
    assert s.tokenizers.chat_templates == {"my/model": "/t.jinja"}
    assert s.log.level == "WARNING"
    assert serve_overrides(build_parser().parse_args(["serve"])) == {}


@pytest.mark.parametrize(
    "argv", [["serve", "--pod", "no-equals"], ["serve", "--tokenizer", "=x"], ["serve", "--port", "x"]]
)
def test_cli_rejects_malformed_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_invalid_values_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="block_size"):
        load_settings(None, {"index": {"block_size": 0}})
    with pytest.raises(ValidationError, match="port"):
        load_settings(None, {"http": {"port": 70000}})
    with pytest.raises(ValidationError, match="mode"):
        load_settings(None, {"tokenizers": {"mode": "sloppy"}})
    with pytest.raises(ValidationError, match="unknown log level"):
        load_settings(None, {"log": {"level": "chatty"}})
    with pytest.raises(ValidationError, match="typo"):
        load_settings(_yaml(tmp_path, "http: {typo: 1}\n"))
    with pytest.raises(ValueError, match="mapping"):
        load_settings(_yaml(tmp_path, "- a\n- b\n"))
    monkeypatch.setenv("KVINDEX_HTTP__PORT", "eighty")
    with pytest.raises(ValidationError):
        load_settings()


def test_llama32_models_default_to_the_bundled_tokenizer() -> None:
    path = find_llama3_tokenizer_dir()
    assert path is not None
    s = load_settings(None, {"tokenizers": {"sources": {LLAMA32_MODELS[0]: "/mine"}}})
    sources = s.tokenizers.effective_sources()
    assert sources[LLAMA32_MODELS[0]] == "/mine"  # what the user configured wins
    assert sources[LLAMA32_MODELS[1]] == path
    off = load_settings(None, {"tokenizers": {"llama32_defaults": False}})
    assert off.tokenizers.effective_sources() == {}
