"""The error vocabulary shared by every transport.

A handler raises one of these to choose what its caller sees; the dispatcher turns anything else into
INTERNAL. Each transport maps an ``ErrorCode`` to its native form (TCP error frame code, HTTP status,
NATS header) in one place, so the meaning is the same whichever way a caller arrived.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Wire-stable codes: the integer values are part of the TCP protocol and must never change."""

    BAD_REQUEST = 1
    NOT_FOUND = 2
    UNAVAILABLE = 3  # retryable: nothing was processed
    OVERLOADED = 4  # retryable: admission rejected
    DEADLINE_EXCEEDED = 5
    CANCELLED = 6
    SHUTTING_DOWN = 7
    INTERNAL = 8
    UNAUTHENTICATED = 9  # no credential, or one that is not valid (docs/security.md)
    PERMISSION_DENIED = 10  # a valid credential without a scope the endpoint requires


# Codes whose meaning is "this worker did not start the work": a retry elsewhere is always safe.
ALWAYS_RETRYABLE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED})


class IngressError(Exception):
    """Root of every error the runtime reports to a caller.

    ``retryable`` tells the caller whether sending the same request to another worker is safe. ``None``
    means "decide from the code and from whether any chunk was already sent" (see ``resolve_retryable``).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def resolve_retryable(self, *, chunks_sent: int) -> bool:
        """Whether the caller may retry. Once a chunk was sent, never: a retry elsewhere would repeat
        output the caller already has, whatever the code or the handler said. Before that: the explicit
        choice, then the code (UNAVAILABLE, OVERLOADED: nothing started; SHUTTING_DOWN: killed before
        it produced anything)."""
        if chunks_sent:
            return False
        if self.retryable is not None:
            return self.retryable
        return self.code in ALWAYS_RETRYABLE or self.code is ErrorCode.SHUTTING_DOWN

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, retryable={self.retryable!r})"


class BadRequest(IngressError):
    code = ErrorCode.BAD_REQUEST


class NotFound(IngressError):
    code = ErrorCode.NOT_FOUND


class Unavailable(IngressError):
    code = ErrorCode.UNAVAILABLE


class ExchangeEnded(Unavailable):
    """An exchange client's ``send`` or ``end`` after the worker ended (or refused) the exchange: the
    reader of its answers has the outcome, so a sender that hears this may simply stop."""

    def __init__(self, message: str = "the exchange has ended") -> None:
        super().__init__(message, retryable=False)


class Overloaded(IngressError):
    code = ErrorCode.OVERLOADED


class DeadlineExceeded(IngressError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(IngressError):
    code = ErrorCode.CANCELLED


class ShuttingDown(IngressError):
    code = ErrorCode.SHUTTING_DOWN


class InternalError(IngressError):
    code = ErrorCode.INTERNAL


class Unauthenticated(IngressError):
    """No credential, or one that is not valid. Never retryable: the same credential fails anywhere."""

    code = ErrorCode.UNAUTHENTICATED

    def __init__(self, message: str, *, retryable: bool | None = False) -> None:
        super().__init__(message, retryable=retryable)


class PermissionDenied(IngressError):
    """A valid credential without a scope the endpoint requires. Never retryable."""

    code = ErrorCode.PERMISSION_DENIED

    def __init__(self, message: str, *, retryable: bool | None = False) -> None:
        super().__init__(message, retryable=retryable)


class RemoteError(IngressError):
    """Raised by a client when the worker answered with an error.

    ``code`` is an instance attribute here (the remote chose it) and ``retryable`` is always decided.
    """

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool) -> None:
        super().__init__(message, retryable=retryable)
        self.code = code

    def __str__(self) -> str:
        hint = "retryable" if self.retryable else "not retryable"
        return f"{self.code.name}: {self.message} ({hint})"


# The exception of each code. A handler raises one to choose its caller's code; a client raises the
# matching ``RemoteError`` subclass (runtime/_wire_errors.py), so ``except Overloaded`` works on both ends.
ERROR_CLASSES: dict[ErrorCode, type[IngressError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        Unavailable,
        Overloaded,
        DeadlineExceeded,
        Cancelled,
        ShuttingDown,
        InternalError,
        Unauthenticated,
        PermissionDenied,
    )
}


class StartupFailed(Exception):
    """A worker could not start: a transport failed to come up (port in use, server refused, ...).

    Not an IngressError: no request was involved. ``ingress serve`` logs it and exits 1."""

    def __init__(self, transport: str, cause: BaseException) -> None:
        super().__init__(f"transport {transport!r} could not start: {describe(cause)}")
        self.transport = transport


class EngineStartFailed(Exception):
    """The worker's lifespan (its engine's start-up) raised: ``ingress serve`` logs it and exits 4."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the engine failed to start: {type(cause).__name__}: {describe(cause)}")


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, as nurseries wrap a lone error; else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    """A one-line account of an error for a log or a message: its text, or its type when it has none."""
    exc = sole_exception(exc)
    return str(exc) or type(exc).__name__
