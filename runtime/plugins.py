"""Transport plug-ins: how ``ingress`` finds the transports it can serve and call, importing none.

A transport package registers one plug-in object under the entry-point group ``trio_ingress.transports``
(the packaging ecosystem's own mechanism, as pytest plugins use), in its ``pyproject.toml``::

    [project.entry-points."trio_ingress.transports"]
    mytransport = "my_package.plugin:plugin"

The plug-in contributes its name, its own command-line flags for ``serve`` and ``call``, and builds its
transport (or its client) from the parsed arguments; ``ingress serve`` serves whatever is installed and
asked for. The shared flags (``--certfile``/``--keyfile``) belong to the core and reach every plug-in
that serves TLS. A plug-in module should import its transport lazily (inside ``transport``/``call``),
so that ``ingress --help`` does not pay for every transport's dependencies.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import trio

from ._errors import ExchangeEnded, IngressError, describe, sole_exception
from ._worker import Transport

ENTRY_POINT_GROUP = "trio_ingress.transports"

# How ``ingress call`` reaches an endpoint through a plug-in's client: yields each chunk (one for a
# unary endpoint), raises ``IngressError`` for an error; ``deadline`` is in ``trio.current_time()``
# terms (None: none), and the worker should get it too.
CallTarget = Callable[[str, Any, Mapping[str, str], float | None], AsyncIterator[Any]]


# How ``ingress call --duplex`` runs an exchange through a plug-in's client: sends every message of the
# async iterator (then half-closes), calls ``answer`` with each answer as it arrives, and returns when
# the worker ended the exchange; an error is an ``IngressError``. A plug-in offers it with an optional
# method ``duplex_target(args) -> DuplexTarget | None``.
DuplexTarget = Callable[
    [str, AsyncIterator[Any], Mapping[str, str], float | None, Callable[[Any], None]], Awaitable[None]
]


# How ``ingress status`` asks a worker for its live state through a plug-in's client (the /status
# object, docs/operations.md "Status"); an unreachable worker is an ``IngressError``. A plug-in offers
# it with an optional method ``status_target(args) -> StatusTarget | None``.
StatusTarget = Callable[[], Awaitable[dict[str, Any]]]


class ExchangeSession(Protocol):
    """What a plug-in's client gives for one exchange (``TcpClient.exchange``, ``NatsClient.exchange``)."""

    async def send(self, message: Any) -> None: ...

    async def end(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Any]: ...


async def run_exchange(
    session: ExchangeSession, messages: AsyncIterator[Any], answer: Callable[[Any], None]
) -> None:
    """The body of a ``DuplexTarget`` once its client opened the exchange: send every message (then
    half-close) while handing each answer to ``answer``, until the worker ends the exchange."""
    try:
        async with trio.open_nursery() as nursery:

            async def send_all() -> None:
                try:
                    async for message in messages:
                        await session.send(message)
                    await session.end()
                except ExchangeEnded:
                    return  # the worker ended it first: the answers say how, below
                finally:
                    # Input the worker no longer wants is closed here, not left to the garbage
                    # collector (which would run its cleanup later, or warn); briefly, whatever is
                    # being cancelled around us.
                    close = getattr(messages, "aclose", None)
                    if close is not None:
                        with trio.move_on_after(1.0, shield=True):
                            await close()

            nursery.start_soon(send_all)
            async for chunk in session:
                answer(chunk)
            nursery.cancel_scope.cancel()  # the worker ended the exchange: stop reading the input
    except BaseExceptionGroup as group:
        # The sender's error (a bad line of input, an exchange that ended under it) as itself.
        error = sole_exception(group)
        if isinstance(error, IngressError):
            raise error from None
        raise


class UsageError(Exception):
    """A command-line mistake (a flag, a combination): ``ingress`` prints it and exits 2."""


class PluginFailed(Exception):
    """An installed transport plug-in could not be loaded (``ingress`` says which, and exits 1)."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The shared ``--certfile``/``--keyfile`` (and ``--client-ca``: mutual TLS): a plug-in that serves
    TLS uses them for its listener."""

    certfile: str
    keyfile: str
    client_ca: str | None = None


@runtime_checkable
class TransportPlugin(Protocol):
    """What an entry point of ``trio_ingress.transports`` names."""

    name: str
    # Whether ``transport`` serves TLS with the shared --certfile/--keyfile.
    serves_tls: bool

    def add_serve_arguments(self, parser: Any) -> None:
        """Add this transport's ``serve`` flags to ``parser`` (an argparse group; the address flag is
        conventionally ``--{name}``)."""

    def transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        """The transport ``serve`` asked for, or None when its flags were not given."""

    def default_transport(self, args: argparse.Namespace, tls: TlsFiles | None) -> Transport | None:
        """What to serve when no transport was asked for at all (None: nothing)."""

    def add_call_arguments(self, parser: Any, target: Any) -> None:
        """Add this transport's ``call`` flags; its address flag goes in ``target``, a mutually
        exclusive group (a call goes one way)."""

    def call_target(self, args: argparse.Namespace) -> CallTarget | None:
        """The client ``call`` asked for, or None when its flags were not given."""

    def default_call_target(self, args: argparse.Namespace) -> CallTarget | None:
        """The client to use when no transport was named (None: not this one; at most one installed
        plug-in may offer one, else the caller must name a transport). A plug-in whose client can run
        exchanges also has ``duplex_target(args) -> DuplexTarget | None`` (optional: see above)."""


def discover(warn: Callable[[str], None] | None = None) -> list[TransportPlugin]:
    """Every installed transport plug-in, by name. One that fails to load, or is not a plug-in, is left
    out and named through ``warn`` (so ``--version`` and the other transports still work, and a missing
    flag is explained); without ``warn`` that is a ``PluginFailed``. Two plug-ins of one name are always
    a ``PluginFailed``: which one serves must not depend on the order of sys.path."""
    plugins: dict[str, TransportPlugin] = {}
    sources: dict[str, str] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"{entry_point.name!r} ({entry_point.value})"
        try:
            plugin = entry_point.load()
            if not isinstance(plugin, TransportPlugin):
                raise TypeError(f"it is a {type(plugin).__name__}, not a runtime.plugins.TransportPlugin")
        except Exception as exc:
            message = f"transport plug-in {where} failed to load: {describe(exc)}"
            if warn is None:
                raise PluginFailed(message) from exc
            warn(message)
            continue
        if plugin.name in plugins:
            raise PluginFailed(
                f"two transport plug-ins are named {plugin.name!r}: {sources[plugin.name]} and {where}"
            )
        plugins[plugin.name], sources[plugin.name] = plugin, where
    return [plugins[name] for name in sorted(plugins)]


# Argument types for plug-ins' flags, so every transport checks an address or a duration alike.


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host is 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:9000), got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def seconds(text: str) -> float:
    """A non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client side of ``call``/``status``'s shared ``--cafile``/``--certfile``/``--keyfile``: a TLS
    context when any is given (a CA to trust, a client certificate for mutual TLS), else None."""
    cafile, certfile, keyfile = (getattr(args, name, None) for name in ("cafile", "certfile", "keyfile"))
    if cafile is None and certfile is None:
        return None
    if (certfile is None) != (keyfile is None):
        raise UsageError("--certfile and --keyfile go together")
    from ._tls import client_context

    return client_context(cafile, certfile, keyfile)


def readable_file(text: str) -> str:
    """A file that exists and can be read: a TLS file that is not there is named at once, not as a bare
    "[Errno 2]" from deep inside the TLS set-up."""
    try:
        with open(text, "rb"):
            return text
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror or exc}") from None
