"""Transports are plug-ins: the runtime imports none, and a third-party one needs no change to runtime/."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import trio

from runtime import ErrorCode
from runtime.plugins import discover
from runtime.testing import spawn_process

HERE = pathlib.Path(__file__).parent
RUNTIME = HERE.parent / "runtime"


def _with_path(directory: pathlib.Path) -> dict[str, str]:
    """The environment of a child that also sees the distributions in ``directory``."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


def test_no_module_of_the_runtime_imports_a_transport():
    """Nothing under runtime/ imports the transports package: the core does not depend on its plug-ins."""
    offenders = []
    for path in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "transports"]
    assert offenders == []


def test_importing_the_runtime_and_its_command_line_loads_no_transport():
    """`import runtime` and the CLI module leave sys.modules without any transport module."""
    code = (
        "import sys, runtime, runtime._cli, runtime.testing\n"
        "print([m for m in sys.modules if m.startswith('transports')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_installed_transports_are_found_through_their_entry_points():
    """The project's own transports register like anyone else's: http, nats and tcp are discovered."""
    assert {"http", "nats", "tcp"} <= {plugin.name for plugin in discover()}


async def test_a_third_party_transport_registers_through_its_entry_point_and_serves_a_request():
    """A transport from another distribution (tests/plugin_dist) adds its flag and serves the worker."""
    command = [sys.executable, "-m", "runtime", "serve", "--line", "127.0.0.1:0", "--log-format", "json"]
    async with spawn_process(command, env=_with_path(HERE / "plugin_dist")) as worker:
        assert set(worker.addresses) == {"line"}  # the only transport asked for
        stream = await trio.open_tcp_stream(*worker.addresses["line"])
        async with stream:
            await stream.send_all(b'echo {"text":"hi"}\nnope {}\n')
            received = b""
            with trio.fail_after(10):
                while received.count(b"\n") < 3:
                    received += await stream.receive_some()
    lines = received.decode().splitlines()  # the refusal may come first: the echo runs in its own task
    answers = [json.loads(line.removeprefix("data ")) for line in lines if line.startswith("data ")]
    refusals = [json.loads(line.removeprefix("error ")) for line in lines if line.startswith("error ")]
    assert [a["text"] for a in answers] == ["hi"]
    assert "end 1" in lines
    (error,) = refusals
    assert (error["code"], error["retryable"]) == (ErrorCode.NOT_FOUND.name, False)


async def test_a_third_party_client_serves_ingress_call_and_refuses_duplex_it_cannot_run():
    """`ingress call --line` runs through the plug-in's client; `--duplex --line` is a usage error (2)."""
    serve = [sys.executable, "-m", "runtime", "serve", "--line", "127.0.0.1:0", "--log-format", "json"]
    env = _with_path(HERE / "plugin_dist")
    async with spawn_process(serve, env=env) as worker:
        host, port = worker.addresses["line"]
        results = []
        for extra in ([], ["--duplex"]):
            command = [sys.executable, "-m", "runtime", "call", "echo", '{"n": 1}', "--line"]
            command.append(f"{host}:{port}")
            results.append(
                await trio.run_process(
                    [*command, *extra],
                    env={**os.environ, **env},
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            )
    called, duplex = results
    assert called.returncode == 0 and json.loads(called.stdout) == {"n": 1}, called.stderr
    assert duplex.returncode == 2 and b"cannot run exchanges" in duplex.stderr


def test_a_plugin_that_fails_to_load_is_named_and_the_others_still_work():
    """A broken install is named in a warning (not an unknown flag); the installed transports still load."""
    env = {**os.environ, **_with_path(HERE / "plugin_broken_dist")}
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0 and "--tcp HOST:PORT" in result.stdout
    assert (
        "warning: transport plug-in 'broken'" in result.stderr and "no_such_module_anywhere" in result.stderr
    )


def test_tls_flags_with_no_transport_flag_serve_https_on_the_default_port():
    """`serve --certfile C --keyfile K` alone: the defaults come up, HTTP with TLS (not a usage error)."""
    from runtime._cli import _parser, _transports
    from transports.http import HttpTransport
    from transports.tcp import TcpTransport

    plugins = discover()
    args = _parser(plugins, environment=False).parse_args(
        ["serve", "--certfile", __file__, "--keyfile", __file__]
    )
    transports = {type(t): t for t in _transports(args, plugins)}
    assert set(transports) == {HttpTransport, TcpTransport}
    http = transports[HttpTransport]
    assert (http.port, http.certfile, http.keyfile) == (8000, __file__, __file__)
