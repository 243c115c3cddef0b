"""The authentication contract, the same on every transport (docs/security.md): a request without a
credential or with a wrong one is UNAUTHENTICATED, one whose credential lacks the endpoint's scope is
PERMISSION_DENIED, neither retryable nor run, each counted; a right one runs with its principal on the
context and the credential nowhere in ``ctx.metadata``; a user's check (an expired token) is honoured."""

from __future__ import annotations

import pytest

from runtime import Credentials, Principal, Unauthenticated

from .helpers import rejections

GOOD, ADMIN, EXPIRED = "tok-good-5b1c", "tok-admin-77d2", "tok-expired-0e9a"


class ContractAuth:
    """Two tokens, and one the user's check says has expired (a JWT past its exp, say)."""

    def authenticate(self, credentials: Credentials) -> Principal:
        if credentials.token == GOOD:
            return Principal("alice", "acme")
        if credentials.token == ADMIN:
            return Principal("root", "ops", frozenset({"admin"}))
        if credentials.token == EXPIRED:
            raise Unauthenticated("the token has expired")
        raise Unauthenticated(
            "the credential is not valid" if credentials.present else "a credential is required"
        )


pytestmark = pytest.mark.worker_config(authenticator=ContractAuth())


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({}, "a credential is required"),
        (_bearer("not-a-token"), "not valid"),
        ({"authorization": f"Basic {GOOD}"}, "not valid"),  # only Bearer carries a token
        (_bearer(EXPIRED), "expired"),
    ],
    ids=["none", "wrong", "not-bearer", "expired"],
)
async def test_no_wrong_or_expired_credential_is_unauthenticated_not_retryable_and_not_run(
    driver, metadata, says
):
    """UNAUTHENTICATED (HTTP 401), not retryable, the handler never runs, counted by reason."""
    reply = await driver.call("context", {}, metadata=metadata)
    assert (reply.code, reply.retryable) == ("UNAUTHENTICATED", False) and says in reply.message
    assert reply.status in (None, 401)
    assert rejections(driver, "context", "unauthenticated") == 1
    assert driver.handle.binding(driver.transport, "context").statistics().started == 0


async def test_a_right_credential_runs_with_its_principal_and_the_credential_stays_out_of_metadata(driver):
    """The handler sees ctx.principal; neither Authorization nor X-Api-Key reaches ctx.metadata."""
    reply = await driver.call("context", {}, metadata={**_bearer(GOOD), "trace": "t-1"})
    assert reply.ok, reply
    [answer] = reply.chunks
    assert answer["principal"] == {"subject": "alice", "tenant": "acme"}
    assert {key.lower() for key in answer["metadata"]} & {"authorization", "x-api-key"} == set()
    assert any(key.lower() == "trace" for key in answer["metadata"])


async def test_an_api_key_header_is_a_credential_too(driver):
    """X-Api-Key: TOKEN works where Authorization: Bearer is not sent."""
    reply = await driver.call("context", {}, metadata={"x-api-key": GOOD})
    assert reply.ok and reply.chunks[0]["principal"]["tenant"] == "acme"


async def test_a_credential_without_the_endpoints_scope_is_permission_denied(driver):
    """PERMISSION_DENIED (HTTP 403), not retryable, names the scope; the admin token gets in."""
    denied = await driver.call("admin", {}, metadata=_bearer(GOOD))
    allowed = await driver.call("admin", {}, metadata=_bearer(ADMIN))
    assert (denied.code, denied.retryable) == ("PERMISSION_DENIED", False) and "admin" in denied.message
    assert denied.status in (None, 403)
    assert allowed.ok and allowed.chunks == ["ok"]
    assert rejections(driver, "admin", "permission_denied") == 1


@pytest.mark.needs("signal_routes", reason="HTTP addresses a running request by id from another call")
async def test_only_the_caller_a_request_runs_for_may_stop_or_kill_it(driver):
    """HTTP's stop/kill routes check the credential: none is 401, another tenant's finds nothing (404)."""
    async with driver.open(
        "tokens", {"n": 5, "hold_at": 1}, metadata=_bearer(GOOD), request_id="r-own-1"
    ) as call:
        await driver.probe.held.wait()
        anonymous = await driver.signal("tokens", "r-own-1", "kill", {})
        stranger = await driver.signal("tokens", "r-own-1", "kill", _bearer(ADMIN))
        own = await driver.signal("tokens", "r-own-1", "stop", _bearer(GOOD))
        driver.probe.release.set()
        reply = await call.finish()
    assert (anonymous, stranger, own) == (401, 404, 202)
    assert reply.ok and not reply.code


@pytest.mark.deviates(nats="nobody subscribes to an unknown endpoint's subject: NATS answers 'no responders'")
async def test_a_caller_without_a_credential_learns_no_endpoint_names(driver):
    """Authentication comes first: an unknown endpoint without a credential is UNAUTHENTICATED, not a
    NOT_FOUND that lists what the worker serves."""
    reply = await driver.call("no-such-endpoint", {}, metadata={})
    assert reply.code == "UNAUTHENTICATED" and "context" not in (reply.message or "")
