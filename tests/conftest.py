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


@pytest.fixture
def mutual_tls(tmp_path):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (CN=router-1, O=acme)
    signed by it, and a client certificate signed by nobody the worker trusts: paths by name."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    paths = {
        name: str(tmp_path / f"{name}.pem")
        for name in ("ca", "ca_key", "server", "server_key", "client", "client_key", "rogue", "rogue_key")
    }

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): a CA needs its key usage, a leaf the key ids.
    ca = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    for name, subject in (("ca", "/CN=test-ca"), ("rogue", "/CN=rogue")):  # self-signed, one trusted
        openssl(
            "req",
            "-x509",
            *key,
            *ca,
            "-days",
            "1",
            "-subj",
            subject,
            "-keyout",
            paths[f"{name}_key"],
            "-out",
            paths[name],
        )
    for name, subject, extension in (
        ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1"),
        ("client", "/CN=router-1/O=acme", "extendedKeyUsage=clientAuth"),
    ):
        request, extensions = str(tmp_path / f"{name}.csr"), tmp_path / f"{name}.ext"
        extensions.write_text(
            f"{extension}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        )
        openssl("req", *key, "-subj", subject, "-keyout", paths[f"{name}_key"], "-out", request)
        openssl(
            "x509",
            "-req",
            "-in",
            request,
            "-CA",
            paths["ca"],
            "-CAkey",
            paths["ca_key"],
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            str(extensions),
            "-out",
            paths[name],
        )
    return paths
