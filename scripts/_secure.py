"""Authentication and TLS for the chaos and benchmark scripts (``--secure``): a throwaway certificate for
127.0.0.1 (made with the openssl command line) and a token file, with the ``ingress serve`` flags that
turn them on and what a client needs to pass them."""

from __future__ import annotations

import secrets
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime._tls import client_context


@dataclass(frozen=True)
class Secure:
    auth_args: tuple[str, ...]  # --auth-tokens FILE
    tls_args: tuple[str, ...]  # --certfile PEM --keyfile PEM
    token: str  # a valid credential (tenant "chaos")
    tls: ssl.SSLContext  # a client context trusting the certificate
    cafile: str  # the certificate itself, for clients that build their own context (ALPN)

    @property
    def serve_args(self) -> tuple[str, ...]:
        return self.auth_args + self.tls_args


@contextmanager
def secured() -> Iterator[Secure]:
    """The files, in a temporary directory that lives as long as the block."""
    if shutil.which("openssl") is None:
        raise SystemExit("--secure needs the openssl command to make a certificate")
    with tempfile.TemporaryDirectory(prefix="ingress-secure-") as directory:
        cert, key, tokens = (str(Path(directory) / name) for name in ("cert.pem", "key.pem", "tokens"))
        token = secrets.token_urlsafe(24)
        Path(tokens).write_text(f"{token} chaos\n")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", key, "-out", cert],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        yield Secure(
            ("--auth-tokens", tokens),
            ("--certfile", cert, "--keyfile", key),
            token,
            client_context(cert),
            cert,
        )
