"""TLS client contexts that trust only the federation's CA (pinning), never the system's CAs."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from fedhealth.core import ConfigError


def pinned_tls_context(
    ca_pem: str | bytes, *, client_cert: tuple[bytes, bytes] | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_pem`` only, TLS 1.2 at least, optionally
    presenting a client certificate ``(cert_pem, key_pem)`` for mutual TLS."""
    context = ssl.create_default_context(cadata=ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        # ssl loads certificate chains from files only: a private temporary folder, removed at once
        with tempfile.TemporaryDirectory(prefix="fedhealth-tls-") as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(client_cert[0])
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(client_cert[1])
            context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


def client_tls_for_url(
    url: str,
    ca_pem: str | bytes | None,
    *,
    client_cert: tuple[bytes, bytes] | None = None,
    insecure: bool = False,
) -> ssl.SSLContext | bool:
    """How a client of ``url`` verifies the server (an ``httpx`` ``verify`` value): decided here only.

    ``https`` (the scheme compared case-insensitively: ``HTTPS://`` is https too) gets a context pinned to
    ``ca_pem``. With no CA to pin it gets a context that trusts **no** certificate, never the system's trust
    store: any public authority could mis-issue a certificate for the orchestrator's name and would then
    receive the credentials. (The agent, ``site enroll`` and the operator client refuse such a URL earlier,
    with a sentence; a test transport given to the agent ignores this value.) ``http`` is refused unless
    ``insecure`` is set explicitly (loopback tests), since tokens and API keys would cross the network in
    clear; any other scheme is refused.
    """
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme == "https":
        if not ca_pem:
            return _trusting_nothing()
        return pinned_tls_context(ca_pem, client_cert=client_cert)
    if scheme == "http":
        if insecure:
            return True
        raise ConfigError(
            f"refusing to send credentials over plain HTTP to {url}: use an https:// URL "
            "(or pass --insecure for a local test set-up)"
        )
    raise ConfigError(f"not an http(s) URL: {url[:200]!r}")


def _trusting_nothing() -> ssl.SSLContext:
    """A client context that verifies certificates and hostnames against an empty trust store: every
    handshake fails before a byte of the request is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname; no CA loaded
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
