"""TLS for the picker's gRPC server and credentials for its scorer calls.

* ``tls_cert`` + ``tls_key``: the ext_proc server listens with TLS only (a plaintext client
  cannot connect); with ``tls_client_ca`` too, a client must present a certificate that CA
  signed (mTLS, ``require_client_auth``).
* The scorer token: ``scorer_token_file`` (first line, stripped), else the environment
  variable ``KVINDEX_SCORER_TOKEN``; sent as ``Authorization: Bearer <token>``.

Every failure here is a :class:`ConfigError` whose message names the setting and the value,
so the CLI can print it as one line.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

import grpc

from kvindex_service.extproc.config import ExtprocConfig

__all__ = ["SCORER_TOKEN_ENV", "ConfigError", "read_pem", "scorer_ssl_context", "scorer_token", "server_credentials"]

SCORER_TOKEN_ENV = "KVINDEX_SCORER_TOKEN"


class ConfigError(ValueError):
    """A setting that cannot be used as given (the message names it and its value)."""


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting} {path!r}: cannot read it ({exc.strerror or exc})") from None


def read_pem(setting: str, path: str) -> bytes:
    """The file's bytes, checked to contain a PEM block."""
    data = _read(setting, path)
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting} {path!r}: not a PEM file")
    return data


def server_credentials(config: ExtprocConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC server, or None for plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert = read_pem("--tls-cert", config.tls_cert)
    key = read_pem("--tls-key", config.tls_key)
    # grpc only complains about a bad pair when binding, vaguely: check it here first.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"--tls-cert {config.tls_cert!r} / --tls-key {config.tls_key!r}: unusable ({exc})") from None
    ca = None
    if config.tls_client_ca is not None:
        ca = read_pem("--tls-client-ca", config.tls_client_ca)
        try:
            ctx.load_verify_locations(cafile=config.tls_client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"--tls-client-ca {config.tls_client_ca!r}: unusable ({exc})") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def scorer_ssl_context(config: ExtprocConfig) -> ssl.SSLContext | None:
    """The context that verifies an https scorer with ``scorer_ca_file`` (None: httpx's
    default trust store)."""
    if config.scorer_ca_file is None:
        return None
    read_pem("--scorer-ca-file", config.scorer_ca_file)
    try:
        return ssl.create_default_context(cafile=config.scorer_ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"--scorer-ca-file {config.scorer_ca_file!r}: unusable ({exc})") from None


def scorer_token(config: ExtprocConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token for the scorer: the token file, else ``$KVINDEX_SCORER_TOKEN``."""
    if config.scorer_token_file is not None:
        text = _read("--scorer-token-file", config.scorer_token_file).decode("utf-8", "replace")
        token = text.strip()
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigError(f"--scorer-token-file {config.scorer_token_file!r}: expected one token on one line")
        return token
    env = os.environ if environ is None else environ
    token = env.get(SCORER_TOKEN_ENV, "").strip()
    if token and any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"${SCORER_TOKEN_ENV}: expected one token without spaces")
    return token or None
