"""TLS on the TCP listener and mutual TLS on TCP and HTTP (docs/security.md "TLS and mutual TLS"): real
certificates (made with openssl), real sockets, the project's clients and httpx."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from runtime import EXIT_OK, IngressError, TokenFile, Unauthenticated, Worker, WorkerConfig, open_worker
from runtime._tls import client_context
from runtime.testing import worker_process
from transports.http import HttpTransport
from transports.tcp import TcpClient, TcpTransport

TEST_TIMEOUT = 15


def _whoami_worker() -> Worker:
    worker = Worker("tls-test")

    @worker.endpoint("whoami")
    async def whoami(request, ctx):
        return {"subject": ctx.principal.subject, "tenant": ctx.principal.tenant}

    return worker


async def test_tcp_over_tls_serves_a_client_that_trusts_it_and_refuses_cleartext(self_signed):
    """TLS on --tcp: a client trusting the CA is served; a cleartext client and a client that does not
    trust the certificate fail the connect (retryable for the first, a clear TLS error for the other)."""
    cert, key = self_signed
    transport = TcpTransport(port=0, certfile=cert, keyfile=key, handshake_timeout=5)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_worker(_whoami_worker(), [transport]) as handle:
            address = handle.addresses["tcp"]
            async with TcpClient.connect(*address, tls=client_context(cert)) as client:
                answer = await client.call("whoami")
            with pytest.raises(IngressError) as cleartext:
                async with TcpClient.connect(*address, handshake_timeout=5):
                    pass
            with pytest.raises(IngressError) as untrusted:
                async with TcpClient.connect(*address, tls=ssl.create_default_context()):
                    pass
            async with TcpClient.connect(*address, tls=client_context(cert)) as client:
                still = await client.call("whoami")
    assert answer == still == {"subject": "anonymous", "tenant": "anonymous"}
    assert cleartext.value.code.name == "UNAVAILABLE"
    assert "TLS" in untrusted.value.message and "certificate" in untrusted.value.message
    assert untrusted.value.retryable is False


async def test_mutual_tls_on_tcp_names_the_caller_by_its_certificate_unless_a_token_does(
    mutual_tls, tmp_path
):
    """--client-ca on TCP: a certificate signed by the CA is the principal (CN names the tenant); a
    token, where one is sent, wins; no certificate or one from elsewhere is refused at the handshake."""
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-9f3e1c beta\n")
    config = WorkerConfig(authenticator=TokenFile(str(tokens)))
    tls = {
        "certfile": mutual_tls["server"],
        "keyfile": mutual_tls["server_key"],
        "client_ca": mutual_tls["ca"],
    }
    certified = client_context(mutual_tls["ca"], mutual_tls["client"], mutual_tls["client_key"])
    with trio.fail_after(TEST_TIMEOUT):
        async with open_worker(_whoami_worker(), [TcpTransport(port=0, **tls)], config) as handle:
            address = handle.addresses["tcp"]
            async with TcpClient.connect(*address, tls=certified) as client:
                by_certificate = await client.call("whoami")
                by_token = await client.call("whoami", metadata={"authorization": "Bearer tok-9f3e1c"})
                with pytest.raises(
                    Unauthenticated
                ):  # a wrong token is refused, not excused by the certificate
                    await client.call("whoami", metadata={"authorization": "Bearer wrong"})
            refused = []
            for context in (
                client_context(mutual_tls["ca"]),
                client_context(mutual_tls["ca"], mutual_tls["rogue"], mutual_tls["rogue_key"]),
            ):
                with pytest.raises(IngressError) as caught:
                    async with TcpClient.connect(*address, tls=context) as client:
                        await client.call("whoami")  # TLS 1.3: the server's verdict comes with the first read
                refused.append(caught.value.code.name)
    assert by_certificate == {"subject": "CN=router-1,O=acme", "tenant": "router-1"}
    assert by_token == {"subject": "beta#1", "tenant": "beta"}
    assert refused == ["UNAVAILABLE", "UNAVAILABLE"]


# httpx leaves its request body's generator unclosed when the handshake fails under it (its own, not ours).
@pytest.mark.filterwarnings("ignore:Async generator 'httpx._content.ByteStream.__aiter__':ResourceWarning")
async def test_mutual_tls_on_http_names_the_caller_by_its_certificate(mutual_tls):
    """--client-ca on HTTPS: httpx with the client certificate reaches the handler as CN=router-1;
    without one the TLS handshake is refused."""
    transport = HttpTransport(
        port=0, certfile=mutual_tls["server"], keyfile=mutual_tls["server_key"], client_ca=mutual_tls["ca"]
    )
    certified = client_context(mutual_tls["ca"], mutual_tls["client"], mutual_tls["client_key"])
    with trio.fail_after(TEST_TIMEOUT):
        async with open_worker(_whoami_worker(), [transport]) as handle:
            url = "https://{}:{}".format(*handle.addresses["http"])
            async with httpx.AsyncClient(base_url=url, verify=certified, http2=True) as client:
                answer = (await client.post("/v1/whoami", json={})).json()
            async with httpx.AsyncClient(base_url=url, verify=client_context(mutual_tls["ca"])) as client:
                with pytest.raises(httpx.HTTPError):
                    await client.post("/v1/whoami", json={})
    assert answer == {"subject": "CN=router-1,O=acme", "tenant": "router-1"}


async def test_serve_and_call_flags_speak_mutual_tls_over_tcp(mutual_tls):
    """`ingress serve --tcp ... --certfile --keyfile --client-ca` and `ingress call --tcp ... --cafile
    --certfile --keyfile`: the call is served; without the client certificate it fails, exit 1."""
    serve = (
        "--tcp",
        "127.0.0.1:0",
        "--certfile",
        mutual_tls["server"],
        "--keyfile",
        mutual_tls["server_key"],
    )
    async with worker_process(*serve, "--client-ca", mutual_tls["ca"]) as worker:
        target = ("--tcp", "{}:{}".format(*worker.addresses["tcp"]), "--cafile", mutual_tls["ca"])
        mine = ("--certfile", mutual_tls["client"], "--keyfile", mutual_tls["client_key"])
        served = await _cli("call", "echo", '{"x": 1}', *target, *mine)
        refused = await _cli("call", "echo", '{"x": 1}', *target)
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
    assert served.returncode == 0, served.stderr
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "runtime", *args]
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    )


def test_tls_settings_that_cannot_apply_are_refused(tmp_path: Path):
    """client_ca without a certificate, or half a key pair, is a clear ValueError, not a silent cleartext."""
    with pytest.raises(ValueError, match="both certfile and keyfile"):
        TcpTransport(certfile=str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="needs certfile and keyfile"):
        TcpTransport(client_ca=str(tmp_path / "ca.pem"))
