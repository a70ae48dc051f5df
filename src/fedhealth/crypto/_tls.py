"""TLS client contexts that trust only the federation's CA (pinning), never the system's CAs."""

from __future__ import annotations

import ssl
from pathlib import Path


def pinned_tls_context(
    ca_pem: str | bytes, *, client_cert: tuple[Path, Path] | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_pem`` only; TLS 1.2 at least; optionally
    presenting a client certificate (cert, key) for mutual TLS."""
    context = ssl.create_default_context(cadata=ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        context.load_cert_chain(certfile=str(client_cert[0]), keyfile=str(client_cert[1]))
    return context
