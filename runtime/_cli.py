"""The ``ingress`` command (also ``python -m runtime``): ``serve`` a worker, ``call`` an endpoint.

This is the composition root: the only place that picks transports from flags, configures logging and
turns outcomes into exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

from ._config import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, WorkerConfig
from ._errors import IngressError, StartupFailed
from ._logging import LOG_FORMATS, LOG_LEVELS, configure_logging
from ._worker import Transport, Worker

DEFAULT_APP = "runtime.mocker:worker"
DEFAULT_TCP = ("127.0.0.1", 9000)
DEFAULT_HTTP = ("127.0.0.1", 8000)
# `ingress call --timeout`: how much longer than the deadline it waits for the worker's own answer.
DEADLINE_GRACE = 1.0
_DEFAULTS = WorkerConfig()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        # serve's INGRESS_ variables are read (and checked) only when serve runs: a stale one must not
        # break `ingress call` or `ingress --version`.
        parser = _parser(environment=arguments[:1] == ["serve"])
        args = parser.parse_args(arguments)
        code: int = args.run(args)
    except _UsageError as exc:
        print(f"ingress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


def _parser(environment: bool = True) -> argparse.ArgumentParser:
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
        "--http",
        type=_address,
        metavar="HOST:PORT",
        help="serve HTTP/1.1 and h2 here (with none of --http, --tcp, --nats: 127.0.0.1:8000 and TCP 9000)",
    )
    serve.add_argument(
        "--certfile",
        type=_readable_file,
        metavar="PEM",
        help="serve HTTPS (ALPN h2, http/1.1) on --http with this certificate (HTTP only for now)",
    )
    serve.add_argument("--keyfile", type=_readable_file, metavar="PEM", help="the private key of --certfile")
    serve.add_argument(
        "--http-backlog",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="listen queue of the HTTP port, capped by net.core.somaxconn",
    )
    serve.add_argument("--tcp", type=_address, metavar="HOST:PORT", help="serve the TCP protocol here")
    serve.add_argument(
        "--nats", type=_nats_url, metavar="URL", help="serve through this NATS server (queue groups)"
    )
    serve.add_argument("--namespace", default="ingress", help="NATS subject prefix")
    serve.add_argument(
        "--nats-startup-timeout",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="keep trying an unreachable NATS server this long at start-up, then exit 1",
    )
    _nats_auth_arguments(serve)
    serve.add_argument(
        "--metrics", type=_address, metavar="HOST:PORT", help="serve /metrics, /health and /ready here"
    )
    serve.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=_DEFAULTS.drain_timeout,
        metavar="S",
        help="after a shutdown signal, how long running requests may take before they are killed",
    )
    serve.add_argument(
        "--shutdown-delay",
        type=_seconds,
        default=_DEFAULTS.shutdown_delay,
        metavar="S",
        help="keep serving this long after a shutdown signal, with /ready already 503",
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
        default="{}",
        help="the request as JSON (default {}); - reads it from stdin, @FILE from a file",
    )
    target = call.add_mutually_exclusive_group()
    target.add_argument("--tcp", type=_address, metavar="HOST:PORT", help="default 127.0.0.1:9000")
    target.add_argument("--http", metavar="URL", help="e.g. http://127.0.0.1:8000 or https://host:8443")
    target.add_argument("--nats", type=_nats_url, metavar="URL", help="e.g. nats://127.0.0.1:4222")
    call.add_argument("--namespace", default="ingress", help="NATS subject prefix (with --nats)")
    call.add_argument(
        "--cafile", type=_readable_file, metavar="PEM", help="with an https --http URL: trust this CA"
    )
    _nats_auth_arguments(call)
    call.add_argument("--timeout", type=_seconds, metavar="S", help="deadline for the whole call")
    call.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    call.set_defaults(run=_call)
    return parser


class _UsageError(Exception):
    pass


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
            raise _UsageError(f"{variable}={text!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}")
        set_flag = text.lower() in _TRUE
        return not set_flag if isinstance(action, argparse._StoreFalseAction) else set_flag
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise _UsageError(f"{variable}={text!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise _UsageError(f"{variable}={text!r}: expected one of {', '.join(map(str, action.choices))}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trio-ingress")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _nats_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-token", metavar="TOKEN", help="NATS token authentication")
    parser.add_argument("--nats-creds", metavar="FILE", help="NATS credentials file (JWT and nkey seed)")
    parser.add_argument("--nats-tls-ca", metavar="PEM", help="connect to NATS over TLS, trusting this CA")


def _nats_options(args: argparse.Namespace) -> dict[str, Any]:
    """The nats.connect options the command line asked for."""
    options: dict[str, Any] = {}
    if args.nats_token:
        options["token"] = args.nats_token
    if args.nats_creds:
        options["user_credentials"] = args.nats_creds
    if args.nats_tls_ca:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=args.nats_tls_ca)
    return options


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:9000), got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _nats_url(text: str) -> str:
    # The same check NatsTransport and NatsClient make, as a usage error (exit 2) instead of a failure;
    # imported here so that the core does not import a transport at start-up for every command.
    from transports.nats._protocol import check_url

    try:
        return check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds, got {text!r}")
    return value


def _readable_file(text: str) -> str:
    """A file that exists and can be read: a TLS file that is not there is named at once, not as a bare
    "[Errno 2]" from deep inside the TLS set-up."""
    try:
        with open(text, "rb"):
            return text
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror or exc}") from None


def _positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def load_app(spec: str, app_dir: str = ".") -> Worker:
    """Import ``module:attribute`` and check that it names a Worker. ``app_dir`` goes first on the
    import path, as with uvicorn and hypercorn, so ``ingress serve app:worker`` finds ``./app.py``.

    A module or attribute that is not there is a usage error (exit 2); a module that raises while it is
    imported is the app's failure (``AppImportFailed``, exit 1)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise _UsageError(f"APP must look like module:attribute (e.g. app:worker), got {spec!r}")
    directory = os.path.abspath(app_dir)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not _names_part_of(module_name, exc.name):
            raise AppImportFailed(module_name, exc) from exc  # the app imports something missing
        raise _UsageError(
            f"cannot import {module_name!r}: no module named {exc.name!r} in {directory} "
            "or on the Python path (--app-dir chooses the directory)"
        ) from None
    except Exception as exc:
        raise AppImportFailed(module_name, exc) from exc
    if not hasattr(module, attribute):
        raise _UsageError(f"module {module_name!r} ({_origin(module)}) has no attribute {attribute!r}")
    app = getattr(module, attribute)
    if not isinstance(app, Worker):
        raise _UsageError(f"{spec!r} is a {type(app).__name__}, not a runtime.Worker")
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


def _serve(args: argparse.Namespace) -> int:
    # The composition root picks transports; the runtime itself never imports them.
    from transports.http import HttpTransport
    from transports.nats import NatsTransport
    from transports.tcp import TcpTransport

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
    if args.http is None and args.tcp is None and args.nats is None:  # no flag: something to curl
        args.http, args.tcp = DEFAULT_HTTP, DEFAULT_TCP
    transports: list[Transport] = []
    if (args.certfile is None) != (args.keyfile is None):
        raise _UsageError("--certfile and --keyfile go together")
    if args.certfile is not None and args.http is None:
        # Silently serving cleartext when TLS was asked for would be worse than refusing.
        raise _UsageError(
            "--certfile/--keyfile serve TLS on --http, which is not given (TCP and NATS "
            "listeners have no TLS here yet; --nats-tls-ca connects to NATS over TLS)"
        )
    if args.http is not None:
        host, port = args.http
        transports.append(
            HttpTransport(host, port, certfile=args.certfile, keyfile=args.keyfile, backlog=args.http_backlog)
        )
    if args.tcp is not None:
        transports.append(TcpTransport(*args.tcp))
    if args.nats is not None:
        transports.append(
            NatsTransport(
                args.nats,
                args.namespace,
                connect_options=_nats_options(args),
                startup_timeout=args.nats_startup_timeout,
            )
        )
    config = WorkerConfig(
        drain_timeout=args.drain_timeout, shutdown_delay=args.shutdown_delay, access_log=args.access_log
    )
    try:
        return worker.run(transports, config, metrics_address=args.metrics)
    except StartupFailed:
        return EXIT_FAILURE  # the worker logged why (worker.startup_failed); a traceback adds nothing


def _call(args: argparse.Namespace) -> int:
    text, source = _request_text(args.request)
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"the request ({source}) is not valid JSON: {exc}") from exc
    metadata = dict(_pair(item) for item in args.metadata)
    if args.http is not None:
        from transports.http import parse_base_url

        try:
            parse_base_url(args.http)
        except ValueError as exc:
            raise _UsageError(str(exc)) from exc
    configure_logging("console", "warning", sys.stderr)
    return trio.run(_call_async, args, request, metadata)


def _request_text(argument: str) -> tuple[str, str]:
    """The request's JSON and where it came from: the argument, ``-`` for stdin, ``@FILE`` for a file
    (a request too big for a command line)."""
    if argument == "-":
        try:
            return sys.stdin.read(), "stdin"
        except UnicodeDecodeError as exc:
            raise _UsageError(f"the request on stdin is not UTF-8: {exc.reason}") from None
    if argument.startswith("@"):
        path = argument[1:]
        try:
            with open(path, encoding="utf-8") as file:
                return file.read(), path
        except OSError as exc:
            raise _UsageError(f"cannot read the request from {path!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise _UsageError(f"the request in {path!r} is not UTF-8: {exc.reason}") from None
    return argument, "the argument"


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise _UsageError(f"--metadata takes KEY=VALUE, got {item!r}")
    return key, value


async def _call_async(args: argparse.Namespace, request: Any, metadata: dict[str, str]) -> int:
    # The worker gets the deadline itself and answers DEADLINE_EXCEEDED when it passes; this end waits
    # a little longer for that answer before it gives up on its own (and the worker sees a disconnect).
    deadline = trio.current_time() + args.timeout if args.timeout is not None else None
    patience = args.timeout + DEADLINE_GRACE if args.timeout is not None else float("inf")
    try:
        with trio.fail_after(patience):
            async for chunk in _chunks(args, request, metadata, deadline):
                sys.stdout.write(json.dumps(chunk) + "\n")
                sys.stdout.flush()
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


async def _chunks(
    args: argparse.Namespace, request: Any, metadata: dict[str, str], deadline: float | None
) -> AsyncIterator[Any]:
    if args.http is not None:
        from transports.http import http_stream

        if args.timeout is not None:
            metadata = {**metadata, "x-request-timeout-ms": str(max(1, int(args.timeout * 1000)))}
        async for chunk in http_stream(args.http, args.endpoint, request, metadata, cafile=args.cafile):
            yield chunk
        return
    if args.nats is not None:
        from transports.nats import NatsClient

        options = _nats_options(args)
        async with NatsClient.connect(
            args.nats, namespace=args.namespace, connect_options=options
        ) as nats_client:
            async for chunk in nats_client.stream(
                args.endpoint, request, metadata=metadata, deadline=deadline
            ):
                yield chunk
        return
    from transports.tcp import TcpClient

    async with TcpClient.connect(*(args.tcp or DEFAULT_TCP)) as client:
        async for chunk in client.stream(args.endpoint, request, metadata=metadata, deadline=deadline):
            yield chunk
