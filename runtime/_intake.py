"""The core's intake: the one interface every transport turns wire events into.

A transport keeps one ``Caller`` per connection (TCP), one for its reply inboxes (NATS) or one for the
whole listener (HTTP, where each call watches its own connection). For each request off the wire it
calls ``Caller.open`` (synchronously, before it spawns anything), and then ``Call.run`` with the raw
payload and its ``ResponseSink``. Everything between the wire and the handler happens here or in the
dispatcher, the same way for every transport:

- ``open``: endpoint lookup (NOT_FOUND), refusal while starting or draining (UNAVAILABLE, retryable),
  the caller's credential (UNAUTHENTICATED, PERMISSION_DENIED; taken out of the metadata whatever the
  outcome, runtime/_auth.py), the caller's own limit (OVERLOADED, retryable), the request context with
  its principal, and accept: from this moment
  the request is counted in flight, so the drain can never see zero while its task is being started.
  A refusal is an ``IngressError`` the transport answers through its sink; rejections are counted here.
- ``run``: decoding of the payload and deadline (BAD_REQUEST), admission, the handler, one outcome,
  every metric and the canonical log line, release (runtime/_dispatch.py).
- The caller's registry of open calls: ``stop``/``kill`` by the transport's key (stream id, inbox),
  ``find`` by request id, and ``gone`` when the caller disconnects, which kills every open call and
  counts each one as a disconnect, once.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from ._auth import ANONYMOUS, Credentials, Principal, authorize, credentials_from
from ._context import KillReason, RequestContext, new_request_id
from ._dispatch import answer_error, dispatch_payload, settle_unrun
from ._endpoint import EndpointBinding, ResponseSink, TransportBinding
from ._errors import (
    BadRequest,
    IngressError,
    InternalError,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from ._exchange import Inbox

DRAINING = "worker is draining; send new requests elsewhere"
STARTING = "worker is starting (its engine is not up yet); retry shortly or send the request elsewhere"


@dataclass(frozen=True, slots=True)
class Admitted:
    """What ``Caller.check`` found: the binding, the principal, and the metadata without the credential."""

    binding: EndpointBinding
    principal: Principal
    metadata: dict[str, str]


class Caller:
    """The open calls of one caller, keyed by whatever the transport names them with."""

    __slots__ = ("_calls", "_transport", "certified", "exchanges", "max_calls", "peer")

    def __init__(
        self,
        transport: TransportBinding,
        *,
        peer: str | None = None,
        max_calls: int | None = None,
        exchanges: bool = False,
    ) -> None:
        self._transport = transport
        self.peer = peer
        # Whether the transport streams an exchange's messages into ``Call.inbox`` as they come. If not,
        # a duplex endpoint takes the request payload as all of its input (NDJSON lines, then the end).
        self.exchanges = exchanges
        # More open calls than this at once are refused OVERLOADED (say, streams on one connection).
        self.max_calls = max_calls
        # Who a verified client certificate says the caller is (mutual TLS), for every request of it.
        self.certified: Principal | None = None
        self._calls: dict[Hashable, Call] = {}

    def check(
        self, endpoint: str, metadata: Mapping[str, str] | None = None, certified: Principal | None = None
    ) -> Admitted:
        """The binding a request for ``endpoint`` would run on and who it runs for, or the refusal:
        NOT_FOUND, UNAVAILABLE while starting or draining, UNAUTHENTICATED, PERMISSION_DENIED (each
        counted). For a transport that must read more of the request before it can ``open`` it (HTTP's
        body), so that a refusal needs nothing more from the caller: pass the result to ``open``."""
        credentials, rest = credentials_from(metadata or {})
        # Who first: a caller without a valid credential learns nothing, not even which endpoints exist.
        principal = self._authenticated(endpoint, credentials, certified or self.certified)
        binding = self._binding(endpoint)
        try:
            authorize(principal, binding.name, binding.endpoint.options.scopes)
        except PermissionDenied:
            binding.metrics.rejection("permission_denied")
            raise
        return Admitted(binding, principal, rest)

    def _binding(self, endpoint: str) -> EndpointBinding:
        binding = self._transport.lookup(endpoint)  # NotFound
        if not binding.accepting:
            binding.metrics.rejection("unavailable")
            raise Unavailable(DRAINING, retryable=True)
        if not self._transport.started.is_set():
            binding.metrics.rejection("starting")
            raise Unavailable(STARTING, retryable=True)
        return binding

    def _authenticated(
        self, endpoint: str, credentials: Credentials, certified: Principal | None
    ) -> Principal:
        """Who the request runs for (``_identify``), each refusal counted on the endpoint if it exists. A
        check that fails unexpectedly (a bug in a user's hook) refuses the request as INTERNAL, logged,
        rather than letting it through."""
        binding = self._transport.endpoints.get(endpoint)
        try:
            return self._identify(credentials, certified)
        except (Unauthenticated, PermissionDenied) as refusal:
            if binding is not None:
                binding.metrics.rejection(refusal.code.name.lower())
            raise
        except Exception:
            if binding is not None:
                binding.metrics.rejection("auth_error")
            self._transport.runtime.logger.exception("auth.check_failed", endpoint=endpoint)
            raise InternalError("the worker could not check the credential") from None

    def _identify(self, credentials: Credentials, certified: Principal | None) -> Principal:
        """A token's principal (the worker's authenticator's answer), else a verified client
        certificate's, else anonymous where no authenticator asks for a credential."""
        authenticator = self._transport.runtime.config.authenticator
        if credentials.present and authenticator is not None:
            return authenticator.authenticate(credentials)
        if certified is not None:
            return certified
        if authenticator is not None:
            return authenticator.authenticate(credentials)  # no credential: it says what to send
        return ANONYMOUS

    def find_own(
        self, endpoint: str, request_id: str, metadata: Mapping[str, str], certified: Principal | None = None
    ) -> list[Call]:
        """``find``, for a caller who must be the one the requests run for (HTTP's stop and kill
        routes): its credential is checked like a request's (UNAUTHENTICATED), and only its own
        requests are found, so another caller's look like none at all."""
        principal = self._authenticated(endpoint, credentials_from(metadata)[0], certified)
        # Who, not the token file's other fields (a reload may change a weight under a running request).
        return [
            call
            for call in self.find(endpoint, request_id)
            if (call.ctx.principal.subject, call.ctx.principal.tenant)
            == (principal.subject, principal.tenant)
        ]

    def open(
        self,
        key: Hashable,
        endpoint: str,
        *,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        peer: str | None = None,
        admitted: Admitted | None = None,
    ) -> Call:
        """Take a request for ``endpoint``; raises the ``IngressError`` to answer if it is refused.
        ``admitted``: what ``check`` said for this request already (its credential is not checked twice;
        the worker's state is)."""
        if admitted is None:
            admitted = self.check(endpoint, metadata)
        else:
            self._binding(endpoint)  # still accepting: the drain may have begun since
        binding = admitted.binding
        if self.max_calls is not None and len(self._calls) >= self.max_calls:
            binding.metrics.rejection("stream_limit")
            raise Overloaded(f"more than {self.max_calls} concurrent requests from one caller (stream limit)")
        if key in self._calls:
            # Two requests under one key (a NATS reply subject used twice) would share one registry
            # entry, and their answers one destination: the second is the caller's mistake.
            raise BadRequest(f"a request under {key!r} is still running; use a new one for each request")
        ctx = RequestContext(
            id=request_id or new_request_id(),
            endpoint=binding.name,
            transport=self._transport.name,
            runtime=self._transport.runtime,
            peer=peer or self.peer,
            metadata=admitted.metadata,
            principal=admitted.principal,
        )
        binding.accept(ctx)  # counted in flight from now, before the transport spawns anything
        call = Call(self, key, binding, ctx)
        if binding.endpoint.duplex:
            options = binding.endpoint.options
            call.inbox = Inbox(options.max_input_bytes, options.input_timeout)
        self._calls[key] = call
        return call

    def calls(self) -> list[Call]:
        """The open calls (a copy: safe to use while they finish)."""
        return list(self._calls.values())

    def get(self, key: Hashable) -> Call | None:
        return self._calls.get(key)

    def stop(self, key: Hashable) -> bool:
        """Ask the call's stream to end early (clean end); False if it is not open (it ended already)."""
        call = self._calls.get(key)
        if call is not None:
            call.ctx.stop_generating()
        return call is not None

    def kill(self, key: Hashable) -> bool:
        """Cancel the call's handler now (the caller hears CANCELLED); False if it is not open."""
        call = self._calls.get(key)
        if call is not None:
            call.ctx.kill(KillReason.CALLER_KILL)
        return call is not None

    def find(self, endpoint: str, request_id: str) -> list[Call]:
        """The open calls of ``endpoint`` with this request id (for transports that address requests
        by id, as HTTP's stop and kill routes do). Ids come from callers, so there may be several."""
        return [c for c in self._calls.values() if c.ctx.id == request_id and c.ctx.endpoint == endpoint]

    def drop(self, key: Hashable, reason: str) -> None:
        """One call's caller went away (an HTTP client closed its connection, a NATS inbox vanished)."""
        call = self._calls.get(key)
        if call is not None:
            call.ctx.caller_gone(reason)

    def gone(self, reason: str) -> None:
        """The caller went away (``reason``: closed, reset, gone): kill every open call; each is counted
        as a disconnect under ``reason`` when it ends (runtime/_dispatch.py)."""
        for call in list(self._calls.values()):
            call.ctx.caller_gone(reason)

    def __len__(self) -> int:
        return len(self._calls)

    def _close(self, call: Call) -> None:
        if self._calls.get(call.key) is call:
            del self._calls[call.key]


class Call:
    """One accepted request, from ``Caller.open`` until it is answered (``run``, ``fail`` or ``abandon``)."""

    __slots__ = ("_caller", "_settled", "binding", "ctx", "inbox", "key")

    def __init__(self, caller: Caller, key: Hashable, binding: EndpointBinding, ctx: RequestContext) -> None:
        self._caller = caller
        self.key = key
        self.binding = binding
        self.ctx = ctx
        self._settled = False  # run, fail or abandon happened: each call has exactly one outcome
        # A duplex endpoint's inbound messages: the transport offers them here and ends it (half-close).
        self.inbox: Inbox | None = None

    async def run(
        self,
        payload: bytes | bytearray | memoryview,
        sink: ResponseSink,
        *,
        timeout_ms: str | int | None = None,
        deadline_unix: str | None = None,
        timeout_name: str = "timeout",
        streamed_input: bool | None = None,
    ) -> str:
        """Decode and run the request, answering through ``sink``; returns its outcome. For an exchange on
        a transport that does not stream its input, ``payload`` is all of it (NDJSON lines); one that
        does offers the messages to ``inbox`` itself, the first one (if any) right after ``open``.
        ``streamed_input`` says which for this call, where the caller chooses (NATS); by default the
        transport's ``Caller.exchanges`` decides."""
        self._settle()
        if self.inbox is not None:
            if not (self._caller.exchanges if streamed_input is None else streamed_input):
                self.inbox.fill(payload)
            payload = b""
        try:
            return await dispatch_payload(
                self.binding,
                self.ctx,
                payload,
                sink,
                timeout_ms=timeout_ms,
                deadline_unix=deadline_unix,
                timeout_name=timeout_name,
                inbox=self.inbox,
            )
        finally:
            self._close()

    async def fail(self, error: IngressError, sink: ResponseSink) -> None:
        """Answer ``error`` without running the handler (the request could not be read, say), with the
        same accounting as any other outcome."""
        self._settle()
        try:
            await answer_error(self.binding, self.ctx, sink, error)
        finally:
            self._close()

    def abandon(self, reason: str) -> None:
        """The caller left before the request could run: counted ``disconnected`` under ``reason``."""
        self._settle()
        settle_unrun(self.binding, self.ctx, gone=reason)
        self._close()

    def _settle(self) -> None:
        if self._settled:
            raise RuntimeError(f"request {self.ctx.id!r} was already run, failed or abandoned")
        self._settled = True

    def _close(self) -> None:
        if self.ctx in self.binding.tracker:  # the dispatcher never took it (an exception before it did)
            settle_unrun(self.binding, self.ctx)
        self._caller._close(self)


async def refuse(sink: ResponseSink, error: IngressError) -> None:
    """Answer a refusal from ``Caller.open`` (nothing ran, so the code alone decides ``retryable``)."""
    await sink.send_error(error, error.resolve_retryable(chunks_sent=0))
