"""Authentication (runtime/_auth.py, docs/security.md): the token file, the credential's extraction
from metadata, and, with a real worker process, rotation on SIGUSR1 and tokens that never reach a log
line or a metric."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from runtime import (
    EXIT_OK,
    Credentials,
    Principal,
    TokenFile,
    Unauthenticated,
    WorkerConfig,
    open_worker,
)
from runtime._auth import credentials_from, parse_tokens
from runtime.mocker import create_mocker
from runtime.testing import nats_server, worker_process
from transports.http import HttpTransport

FIRST, SECOND = "first-2f7c9e1a", "second-8b04d3aa"


def test_a_token_line_gives_its_tenant_scopes_and_weight():
    """TOKEN TENANT [SCOPE,...] [weight=N]; comments and blank lines are skipped."""
    principals = parse_tokens(
        ["# fleet", "", f"{FIRST} acme generate,admin weight=3 # ops", f"{SECOND} beta"], "f"
    )
    by_tenant = {p.tenant: p for p in principals.values()}
    assert by_tenant["acme"] == Principal("acme#3", "acme", frozenset({"generate", "admin"}), 3.0)
    assert by_tenant["beta"] == Principal("beta#4", "beta", frozenset(), 1.0)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (FIRST, "expected TOKEN TENANT"),
        (f"{FIRST} acme weight=0", "weight must be"),
        (f"{FIRST} acme weight=nan", "weight must be"),
        (f"{FIRST} a\n{FIRST} b", "listed twice"),
    ],
)
def test_a_bad_token_file_names_the_line_and_never_the_token(line, says):
    """The error says where and what, so an operator can fix it, and never echoes a secret."""
    with pytest.raises(ValueError, match=says) as caught:
        parse_tokens(line.split("\n"), "tokens.txt")
    assert "tokens.txt, line" in str(caught.value) and FIRST not in str(caught.value)


def test_credentials_come_out_of_the_metadata_whatever_their_case():
    """Authorization: Bearer (any case), else X-Api-Key; both keys are always taken out."""
    credentials, rest = credentials_from(
        {"Authorization": f"bearer  {FIRST} ", "X-API-KEY": SECOND, "trace": "t"}
    )
    assert credentials == Credentials(FIRST) and rest == {"trace": "t"}
    assert credentials_from({"x-api-key": SECOND})[0].token == SECOND
    assert credentials_from({"authorization": f"Basic {FIRST}"})[0].token == ""  # present, not valid
    assert not credentials_from({})[0].present
    assert FIRST not in repr(credentials)


def test_the_token_file_answers_the_same_for_an_unknown_and_a_wrong_token(tmp_path: Path):
    """UNAUTHENTICATED, one message for every invalid token; a missing one says what to send."""
    path = tmp_path / "tokens"
    path.write_text(f"{FIRST} acme\n")
    tokens = TokenFile(str(path))
    assert tokens.authenticate(Credentials(FIRST)).tenant == "acme"
    messages = set()
    for wrong in (SECOND, FIRST[:-1], "", FIRST + " "):
        with pytest.raises(Unauthenticated) as caught:
            tokens.authenticate(Credentials(wrong))
        messages.add(caught.value.message)
    with pytest.raises(Unauthenticated, match="Authorization: Bearer"):
        tokens.authenticate(Credentials(None))
    assert messages == {"the credential is not valid"}


def test_a_reload_that_fails_keeps_the_tokens_in_force(tmp_path: Path):
    """A broken file on reload is an error naming the line; the previous tokens keep working."""
    path = tmp_path / "tokens"
    path.write_text(f"{FIRST} acme\n")
    tokens = TokenFile(str(path))
    path.write_text("broken\n")
    with pytest.raises(ValueError, match="line 1"):
        tokens.reload()
    assert tokens.authenticate(Credentials(FIRST)).tenant == "acme"


async def test_rotation_on_sigusr1_and_tokens_never_in_logs_or_metrics(tmp_path: Path):
    """SIGUSR1 swaps the token file in without a restart (old token refused, new one served, over TCP
    with `ingress call --token` and HTTP); no log line or metric of the whole run holds a token."""
    path = tmp_path / "tokens"
    path.write_text(f"{FIRST} acme\n")
    args = (
        "--tcp",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--auth-tokens",
        str(path),
    )
    async with worker_process(*args) as worker:
        tcp = "{}:{}".format(*worker.addresses["tcp"])
        http = "http://{}:{}".format(*worker.addresses["http"])
        before = [await _cli_call(tcp, token) for token in (FIRST, SECOND)]
        path.write_text(f"{SECOND} beta admin\n")
        worker.send_signal(signal.SIGUSR1)
        with trio.fail_after(10):
            await worker.wait_event("auth.reloaded")
        after = [await _cli_call(tcp, token) for token in (FIRST, SECOND)]
        async with httpx.AsyncClient(base_url=http) as client:
            refused = await client.post("/v1/echo", json={}, headers={"authorization": f"Bearer {FIRST}"})
            served = await client.post(
                "/v1/echo", json={"x": 1}, headers={"authorization": f"Bearer {SECOND}"}
            )
            health = await client.get("/health")
        async with httpx.AsyncClient() as client:
            metrics = (await client.get("http://{}:{}/metrics".format(*worker.addresses["metrics"]))).text
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
    assert [c.returncode for c in before] == [0, 1] and "UNAUTHENTICATED" in before[1].stderr
    assert [c.returncode for c in after] == [1, 0] and "UNAUTHENTICATED" in after[0].stderr
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer ")
    assert served.status_code == 200 and health.status_code == 200  # /health needs no credential
    assert 'reason="unauthenticated"' in metrics
    everything = json.dumps(worker.events) + metrics + "".join(c.stderr + c.stdout for c in before + after)
    everything += refused.text + served.text
    assert FIRST not in everything and SECOND not in everything


async def _cli_call(tcp: str, token: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "runtime", "call", "echo", "{}", "--tcp", tcp, "--token", token]
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    )


async def test_metrics_can_be_protected_while_probes_stay_open(tmp_path: Path):
    """metrics_scope: /metrics wants a credential granting it (401 with WWW-Authenticate, 403 without
    the scope, 200 with it) on the ops listener and the HTTP port; /health, /ready and /status stay open."""
    path = tmp_path / "tokens"
    path.write_text(f"{FIRST} ops metrics\n{SECOND} acme\n")
    config = WorkerConfig(authenticator=TokenFile(str(path)), metrics_scope="metrics")
    async with (
        open_worker(
            create_mocker("ops-auth"), [HttpTransport(port=0)], config, metrics_address=("127.0.0.1", 0)
        ) as handle,
        httpx.AsyncClient() as client,
    ):
        for name in ("metrics", "http"):
            base = "http://{}:{}".format(*handle.addresses[name])
            anonymous = await client.get(f"{base}/metrics")
            unscoped = await client.get(f"{base}/metrics", headers={"authorization": f"Bearer {SECOND}"})
            scoped = await client.get(f"{base}/metrics", headers={"authorization": f"Bearer {FIRST}"})
            probes = [
                (await client.get(f"{base}{path}")).status_code for path in ("/health", "/ready", "/status")
            ]
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith(
                "Bearer "
            )
            assert unscoped.status_code == 403 and "metrics" in unscoped.text
            assert scoped.status_code == 200 and "ingress_" in scoped.text
            assert probes == [200, 200, 200]


async def test_a_clients_token_rides_on_every_request_of_tcp_and_nats(tmp_path: Path):
    """TcpClient.connect(token=) and NatsClient.connect(token=): every request carries it; a stream's
    own metadata may still override it."""
    from transports.nats import NatsClient, NatsTransport
    from transports.tcp import TcpClient, TcpTransport

    path = tmp_path / "tokens"
    path.write_text(f"{FIRST} acme\n")
    config = WorkerConfig(authenticator=TokenFile(str(path)))
    async with (
        nats_server() as nats_url,
        open_worker(
            create_mocker("token-test"), [TcpTransport(port=0), NatsTransport(nats_url)], config
        ) as handle,
    ):
        async with TcpClient.connect(*handle.addresses["tcp"], token=FIRST) as tcp:
            by_tcp = await tcp.call("echo", {"x": 1})
            with pytest.raises(Unauthenticated):
                await tcp.call("echo", {}, metadata={"authorization": "Bearer other"})
        async with NatsClient.connect(nats_url, token=FIRST) as nats:
            by_nats = await nats.call("echo", {"x": 2})
    assert by_tcp == {"x": 1} and by_nats == {"x": 2}
