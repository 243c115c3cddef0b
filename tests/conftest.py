"""Shared set-up: every test runs under Trio (trio_mode); logs are produced at every level but rendered
nowhere, so ``structlog.testing.capture_logs()`` sees them and the test output stays clean; a throwaway
TLS certificate for the tests that serve or call HTTPS."""

from __future__ import annotations

import pytest
import structlog

structlog.configure(
    processors=[structlog.processors.add_log_level],
    logger_factory=structlog.ReturnLoggerFactory(),
    cache_logger_on_first_use=False,
)


@pytest.fixture
def self_signed(tmp_path):
    """A throwaway certificate for 127.0.0.1, made with the openssl command line."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)
