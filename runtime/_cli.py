"""The ``ingress`` command (also ``python -m runtime``): ``serve`` a worker, ``call`` an endpoint.

This is the composition root: it asks the installed transport plug-ins (runtime/plugins.py) for their
flags and transports, configures logging and turns outcomes into exit codes. It imports no transport.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio

from ._auth import AUTHORIZATION, TokenFile
from ._config import EXIT_ENGINE_FAILED, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, WorkerConfig
from ._errors import BadRequest, EngineStartFailed, IngressError, StartupFailed
from ._logging import LOG_FORMATS, LOG_LEVELS, configure_logging
from ._worker import Transport, Worker
from .plugins import (
    CallTarget,
    DuplexTarget,
    PluginFailed,
    TlsFiles,
    TransportPlugin,
    UsageError,
    address,
    discover,
    readable_file,
    seconds,
)

DEFAULT_APP = "runtime.mocker:worker"


def token_file(path: str) -> TokenFile:
    """``--auth-tokens``: the file, read and checked now (a bad line is a usage error naming it)."""
    try:
        return TokenFile(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# `ingress call --timeout`: how much longer than the deadline it waits for the worker's own answer.
DEADLINE_GRACE = 1.0
_DEFAULTS = WorkerConfig()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        # serve's INGRESS_ variables are read (and checked) only when serve runs: a stale one must not
        # break `ingress call` or `ingress --version`.
        plugins = discover(warn=lambda message: print(f"ingress: warning: {message}", file=sys.stderr))
        parser = _parser(plugins, environment=arguments[:1] == ["serve"])
        args = parser.parse_args(arguments)
        code: int = args.run(args, plugins)
    except UsageError as exc:
        print(f"ingress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PluginFailed as exc:
        print(f"ingress: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code


def _parser(plugins: Sequence[TransportPlugin], environment: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingress", description="Serve inference endpoints over HTTP, NATS and a framed TCP protocol."
    )
    parser.add_argument("--version", action="version", version=f"ingress {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve a worker until SIGTERM/SIGINT/SIGHUP",
        description="Serve a worker. Every option can also come from an environment variable "
        f"({ENV_PREFIX}<OPTION>, e.g. {ENV_PREFIX}DRAIN_TIMEOUT=10); a flag wins over its variable.",
    )
    serve.add_argument(
        "app",
        nargs="?",
        default=DEFAULT_APP,
        help="module:attribute naming a Worker",
    )
    serve.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="look for APP's module in this directory first (. is the current directory)",
    )
    serve.add_argument(
        "--certfile",
        type=readable_file,
        metavar="PEM",
        help="serve TLS with this certificate on every transport that can (HTTP: HTTPS with ALPN h2)",
    )
    serve.add_argument("--keyfile", type=readable_file, metavar="PEM", help="the private key of --certfile")
    serve.add_argument(
        "--client-ca",
        type=readable_file,
        metavar="PEM",
        help="mutual TLS: require a client certificate signed by this CA (its subject names the caller)",
    )
    for plugin in plugins:
        _add_arguments(
            plugin, plugin.add_serve_arguments, serve.add_argument_group(f"{plugin.name} transport")
        )
    serve.add_argument(
        "--metrics",
        type=address,
        metavar="HOST:PORT",
        help="serve /metrics, /health, /ready and /status here",
    )
    serve.add_argument(
        "--drain-timeout",
        type=seconds,
        default=_DEFAULTS.drain_timeout,
        metavar="S",
        help="after a shutdown signal, how long running requests may take before they are killed",
    )
    serve.add_argument(
        "--shutdown-delay",
        type=seconds,
        default=_DEFAULTS.shutdown_delay,
        metavar="S",
        help="keep serving this long after a shutdown signal, with /ready already 503",
    )
    serve.add_argument(
        "--auth-tokens",
        type=token_file,
        metavar="FILE",
        help="require a credential on every request: one a line, TOKEN TENANT [SCOPE,...] [weight=N]; "
        "re-read on SIGUSR1 (docs/security.md)",
    )
    serve.add_argument(
        "--metrics-scope",
        metavar="SCOPE",
        help="/metrics answers only a credential granting SCOPE (with --auth-tokens; probes stay open)",
    )
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, default="auto", help="auto: console on a TTY, JSON otherwise"
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="the lowest level logged")
    serve.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="skip the per-request log line"
    )
    serve.set_defaults(run=_serve)
    _from_environment(serve, read=environment)

    call = commands.add_parser("call", help="call an endpoint; prints each chunk as a JSON line")
    call.add_argument("endpoint")
    call.add_argument(
        "request",
        nargs="?",
        default=None,
        help="the request as JSON (default {}); - reads it from stdin, @FILE from a file "
        "(with --duplex: an optional first message)",
    )
    call.add_argument(
        "--duplex",
        action="store_true",
        help="a full-duplex exchange: send each NDJSON line of stdin as a message (its end is the "
        "half-close) and print each answer the moment it arrives",
    )
    target = call.add_mutually_exclusive_group()
    for plugin in plugins:
        group = call.add_argument_group(f"{plugin.name} transport")
        _add_arguments(plugin, partial(plugin.add_call_arguments, target=target), group)
    _client_tls_arguments(call)
    call.add_argument("--timeout", type=seconds, metavar="S", help="deadline for the whole call")
    call.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    call.add_argument(
        "--token",
        metavar="TOKEN",
        help="the credential, sent as Authorization: Bearer TOKEN on every transport",
    )
    call.set_defaults(run=_call)

    status = commands.add_parser(
        "status",
        help="print a worker's live state (phase, readiness, load per endpoint) as one JSON object",
        description="--http takes the worker's HTTP port or its --metrics listener (both serve /status); "
        "--tcp asks on a connection (PING, protocol version 4); --nats asks the first worker of the "
        "namespace to answer",
    )
    target = status.add_mutually_exclusive_group(required=True)
    for plugin in plugins:
        if hasattr(plugin, "status_target"):
            group = status.add_argument_group(f"{plugin.name} transport")
            _add_arguments(plugin, partial(plugin.add_call_arguments, target=target), group)
    _client_tls_arguments(status)
    status.add_argument("--timeout", type=seconds, default=5.0, metavar="S", help="give up after this long")
    status.set_defaults(run=_status)
    return parser


def _client_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The client side of TLS, shared by every transport that speaks it (HTTPS, TCP over TLS)."""
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--cafile", type=readable_file, metavar="PEM", help="TLS: trust this CA (HTTPS, or TCP over TLS)"
    )
    group.add_argument(
        "--certfile", type=readable_file, metavar="PEM", help="mutual TLS: present this client certificate"
    )
    group.add_argument("--keyfile", type=readable_file, metavar="PEM", help="the private key of --certfile")


def _status(args: argparse.Namespace, plugins: Sequence[TransportPlugin]) -> int:
    """Ask the worker the flags name for its status and print it; a worker that cannot be reached
    (or not within --timeout) is one line on stderr and exit 1."""
    offers = (getattr(plugin, "status_target", None) for plugin in plugins)
    ask = next(target for offer in offers if offer is not None and (target := offer(args)) is not None)
    configure_logging("console", "warning", sys.stderr)

    async def status() -> dict[str, Any]:
        with trio.fail_after(args.timeout):
            report: dict[str, Any] = await ask()
            return report

    try:
        report = trio.run(status)
    except IngressError as error:
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        return EXIT_FAILURE
    except trio.TooSlowError:
        print(f"error: UNAVAILABLE: no status within {args.timeout:g} s", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(report))
    return EXIT_OK


# serve's options from the environment: --drain-timeout is INGRESS_DRAIN_TIMEOUT, and so on.
ENV_PREFIX = "INGRESS_"
# What a boolean flag's variable accepts (anything else is a usage error).
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def environment_variable(action: argparse.Action) -> str:
    """INGRESS_<OPTION> for ``--option`` (INGRESS_APP for the positional APP)."""
    name = action.option_strings[-1] if action.option_strings else action.dest
    return ENV_PREFIX + name.lstrip("-").replace("-", "_").upper()


def _from_environment(command: argparse.ArgumentParser, *, read: bool) -> None:
    """Say in --help, with the default, which variable each option of ``command`` reads; with ``read``,
    let the variables that are set be the defaults (checked like the flag would be). argparse keeps
    its actions in ``_actions``."""
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        variable = environment_variable(action)
        shown = "none" if action.default is None else action.default
        if isinstance(action, argparse._StoreFalseAction):
            shown = "on"
        action.help = f"{action.help or ''} [default: {shown}; env {variable}]".strip()
        if read and variable in os.environ:
            action.default = _environment_value(action, variable, os.environ[variable])
            action.required = False


def _environment_value(action: argparse.Action, variable: str, text: str) -> Any:
    if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction):
        if text.lower() not in _TRUE + _FALSE:
            raise UsageError(f"{variable}={text!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}")
        set_flag = text.lower() in _TRUE
        return not set_flag if isinstance(action, argparse._StoreFalseAction) else set_flag
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise UsageError(f"{variable}={text!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{variable}={text!r}: expected one of {', '.join(map(str, action.choices))}")
    return value


def _add_arguments(plugin: TransportPlugin, add: Any, group: Any) -> None:
    """``add(group)``; a plug-in whose flag clashes with another's (or the core's) is named, not a
    traceback from argparse."""
    try:
        add(group)
    except argparse.ArgumentError as exc:
        raise PluginFailed(f"transport plug-in {plugin.name!r} adds a flag that is taken: {exc}") from exc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trio-ingress")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def load_app(spec: str, app_dir: str = ".") -> Worker:
    """Import ``module:attribute`` and check that it names a Worker. ``app_dir`` goes first on the
    import path, as with uvicorn and hypercorn, so ``ingress serve app:worker`` finds ``./app.py``.

    A module or attribute that is not there is a usage error (exit 2); a module that raises while it is
    imported is the app's failure (``AppImportFailed``, exit 1)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"APP must look like module:attribute (e.g. app:worker), got {spec!r}")
    directory = os.path.abspath(app_dir)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not _names_part_of(module_name, exc.name):
            raise AppImportFailed(module_name, exc) from exc  # the app imports something missing
        raise UsageError(
            f"cannot import {module_name!r}: no module named {exc.name!r} in {directory} "
            "or on the Python path (--app-dir chooses the directory)"
        ) from None
    except Exception as exc:
        raise AppImportFailed(module_name, exc) from exc
    if not hasattr(module, attribute):
        raise UsageError(f"module {module_name!r} ({_origin(module)}) has no attribute {attribute!r}")
    app = getattr(module, attribute)
    if not isinstance(app, Worker):
        raise UsageError(f"{spec!r} is a {type(app).__name__}, not a runtime.Worker")
    return app


class AppImportFailed(Exception):
    """The app's module raised while it was imported (its own bug or a missing dependency)."""

    def __init__(self, module: str, cause: BaseException) -> None:
        super().__init__(f"importing {module!r} failed: {type(cause).__name__}: {cause}")


def _names_part_of(module_name: str, missing: str) -> bool:
    """Whether the missing module is the app's module itself or one of its parent packages."""
    return module_name == missing or module_name.startswith(missing + ".")


def _origin(module: Any) -> str:
    return str(getattr(module, "__file__", None) or module.__name__)


def _serve(args: argparse.Namespace, plugins: Sequence[TransportPlugin]) -> int:
    configure_logging(args.log_format, args.log_level)
    try:
        worker = load_app(args.app, args.app_dir)
    except AppImportFailed as exc:
        if args.log_level == "debug":
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
            print(f"ingress: {exc}", file=sys.stderr)
        else:
            print(f"ingress: {exc} (--log-level debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    transports = _transports(args, plugins)
    if args.metrics_scope is not None and args.auth_tokens is None:
        raise UsageError("--metrics-scope needs --auth-tokens: without them no credential could grant it")
    config = WorkerConfig(
        drain_timeout=args.drain_timeout,
        shutdown_delay=args.shutdown_delay,
        access_log=args.access_log,
        authenticator=args.auth_tokens,
        metrics_scope=args.metrics_scope,
    )
    try:
        return worker.run(transports, config, metrics_address=args.metrics)
    except StartupFailed:
        return EXIT_FAILURE  # the worker logged why (worker.startup_failed); a traceback adds nothing
    except EngineStartFailed:
        return EXIT_ENGINE_FAILED  # logged too, with the engine's error


def _transports(args: argparse.Namespace, plugins: Sequence[TransportPlugin]) -> list[Transport]:
    """What the installed plug-ins build from the flags; with no transport flag at all, their defaults
    (something to curl)."""
    if not plugins:
        raise PluginFailed(
            "no transport plug-in is installed: install the project (pip install -e .), which registers "
            "them under the entry-point group trio_ingress.transports"
        )
    if (args.certfile is None) != (args.keyfile is None):
        raise UsageError("--certfile and --keyfile go together")
    if args.client_ca is not None and args.certfile is None:
        raise UsageError("--client-ca (mutual TLS) needs --certfile and --keyfile")
    tls = TlsFiles(args.certfile, args.keyfile, args.client_ca) if args.certfile is not None else None
    chosen = [(plugin, plugin.transport(args, tls)) for plugin in plugins]
    if all(transport is None for _, transport in chosen):  # no transport flag at all: the defaults
        chosen = [(plugin, plugin.default_transport(args, tls)) for plugin in plugins]
    selected = [(plugin, transport) for plugin, transport in chosen if transport is not None]
    if tls is not None and not any(plugin.serves_tls for plugin, _ in selected):
        # Silently serving cleartext when TLS was asked for would be worse than refusing.
        able = " or ".join(f"--{plugin.name}" for plugin in plugins if plugin.serves_tls) or "no transport"
        raise UsageError(
            f"--certfile/--keyfile serve TLS on {able}, which is not given "
            "(NATS keeps its own TLS: --nats-tls-ca connects to NATS over TLS)"
        )
    uncertified = [f"--{plugin.name}" for plugin, _ in selected if not plugin.serves_tls]
    if tls is not None and tls.client_ca is not None and uncertified and args.auth_tokens is None:
        # Mutual TLS would close the TLS listeners while these took anyone: refuse rather than half-lock.
        raise UsageError(
            f"--client-ca requires client certificates, which {' and '.join(uncertified)} cannot carry: "
            "add --auth-tokens so that requests there need a credential too"
        )
    return [transport for _, transport in selected]


def _call(args: argparse.Namespace, plugins: Sequence[TransportPlugin]) -> int:
    if args.duplex and args.request == "-":
        raise UsageError("--duplex reads its messages from stdin: give no request, or one first message")
    text, source = _request_text("{}" if args.request is None else args.request)
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the request ({source}) is not valid JSON: {exc}") from exc
    metadata = dict(_pair(item) for item in args.metadata)
    if args.token is not None:
        metadata[AUTHORIZATION] = f"Bearer {args.token}"
    plugin, target = _call_target(args, plugins)
    configure_logging("console", "warning", sys.stderr)
    if args.duplex:
        first = None if args.request is None else request
        return trio.run(_exchange_async, args, _duplex_target(args, plugin), first, metadata)
    return trio.run(_call_async, args, target, request, metadata)


def _call_target(
    args: argparse.Namespace, plugins: Sequence[TransportPlugin]
) -> tuple[TransportPlugin, CallTarget]:
    """The client of the transport the flags name; with none named, the one default an installed
    plug-in offers (TCP's 127.0.0.1:9000)."""
    for plugin in plugins:
        target = plugin.call_target(args)
        if target is not None:
            return plugin, target
    defaults = [(p, t) for p in plugins if (t := p.default_call_target(args)) is not None]
    if len(defaults) == 1:
        return defaults[0]
    named = ", ".join(f"--{plugin.name}" for plugin in plugins) or "none installed"
    raise UsageError(f"name the transport to call through ({named})")


def _duplex_target(args: argparse.Namespace, plugin: TransportPlugin) -> DuplexTarget:
    offer = getattr(plugin, "duplex_target", None)
    target = offer(args) if offer is not None else None
    if target is None:
        raise UsageError(f"--duplex: the {plugin.name} transport's client cannot run exchanges (yet)")
    return target  # type: ignore[no-any-return]


def _request_text(argument: str) -> tuple[str, str]:
    """The request's JSON and where it came from: the argument, ``-`` for stdin, ``@FILE`` for a file
    (a request too big for a command line)."""
    if argument == "-":
        try:
            return sys.stdin.read(), "stdin"
        except UnicodeDecodeError as exc:
            raise UsageError(f"the request on stdin is not UTF-8: {exc.reason}") from None
    if argument.startswith("@"):
        path = argument[1:]
        try:
            with open(path, encoding="utf-8") as file:
                return file.read(), path
        except OSError as exc:
            raise UsageError(f"cannot read the request from {path!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"the request in {path!r} is not UTF-8: {exc.reason}") from None
    return argument, "the argument"


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"--metadata takes KEY=VALUE, got {item!r}")
    return key, value


async def _exchange_async(
    args: argparse.Namespace, target: DuplexTarget, first: Any, metadata: dict[str, str]
) -> int:
    """``call --duplex``: the messages are NDJSON lines of stdin (after ``first``, if given), sent as
    they are read; each answer is printed (and flushed) the moment it arrives."""

    async def messages() -> AsyncIterator[Any]:
        if first is not None:
            yield first
        # A non-blocking stream on a copy of stdin, not a thread: reading it can be cancelled (the
        # worker ended the exchange, --timeout) even while a terminal waits for a line.
        async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
            pending = b""
            while data := await stdin.receive_some():
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if line.strip():  # NDJSON: blank lines are no messages
                        yield _stdin_message(line)
            if pending.strip():
                yield _stdin_message(pending)

    async def work(deadline: float | None) -> None:
        await target(args.endpoint, messages(), metadata, deadline, _print_chunk)

    return await _run_call(args, work)


def _stdin_message(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise BadRequest(f"a line of stdin is not JSON: {exc}") from None


def _print_chunk(chunk: Any) -> None:
    sys.stdout.write(json.dumps(chunk) + "\n")
    sys.stdout.flush()


async def _call_async(
    args: argparse.Namespace, target: CallTarget, request: Any, metadata: dict[str, str]
) -> int:
    async def work(deadline: float | None) -> None:
        async for chunk in target(args.endpoint, request, metadata, deadline):
            _print_chunk(chunk)

    return await _run_call(args, work)


async def _run_call(args: argparse.Namespace, work: Callable[[float | None], Awaitable[None]]) -> int:
    """Run ``work`` with the caller's deadline; an error is one line on stderr and exit 1.

    The worker gets the deadline itself and answers DEADLINE_EXCEEDED when it passes; this end waits a
    little longer for that answer before it gives up on its own (and the worker sees a disconnect)."""
    deadline = trio.current_time() + args.timeout if args.timeout is not None else None
    patience = args.timeout + DEADLINE_GRACE if args.timeout is not None else float("inf")
    try:
        with trio.fail_after(patience):
            await work(deadline)
    except IngressError as exc:
        print(
            f"error: {exc.code.name}: {exc.message} (retryable: {str(exc.retryable).lower()})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except trio.TooSlowError:
        print(f"error: DEADLINE_EXCEEDED: no answer within {args.timeout:g} s (--timeout)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
