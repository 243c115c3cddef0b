"""`ingress serve APP` as a new user runs it: the real console script, an app file in a fresh directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from runtime.testing import spawn_process
from transports.tcp import TcpClient

# The small worker file the README shows.
APP = """\
from runtime import Worker

worker = Worker("mine")


@worker.endpoint("echo")
async def echo(request, ctx):
    return {"mine": request}
"""
INGRESS = str(Path(sys.executable).with_name("ingress"))


def _ingress(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INGRESS, *args], capture_output=True, text=True, timeout=30, check=False, cwd=cwd)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


@pytest.mark.parametrize("where", ["cwd", "--app-dir"])
async def test_ingress_serve_finds_an_app_in_the_current_directory_or_app_dir(
    app_dir, tmp_path_factory, where
):
    """`ingress serve app:worker` imports ./app.py (or from --app-dir), serves it and exits 0 on SIGTERM."""
    cwd, extra = (
        (app_dir, [])
        if where == "cwd"
        else (tmp_path_factory.mktemp("elsewhere"), ["--app-dir", str(app_dir)])
    )
    command = [INGRESS, "serve", "app:worker", *extra, "--tcp", "127.0.0.1:0", "--log-format", "json"]
    async with spawn_process(command, cwd=str(cwd)) as worker:
        async with TcpClient.connect(*worker.addresses["tcp"]) as client:
            answer = await client.call("echo", {"x": 1})
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
    assert answer == {"mine": {"x": 1}}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("nosuchmodule:worker", "cannot import 'nosuchmodule': no module named 'nosuchmodule'"),
        ("app:nosuch", "module 'app' ("),
        ("app:APP_NAME", "'app:APP_NAME' is a str, not a runtime.Worker"),
        ("app", "APP must look like module:attribute"),
    ],
)
def test_an_app_that_is_not_there_is_one_line_and_exit_two(app_dir, spec, says):
    """A missing module or attribute, or a non-Worker, is one line on stderr naming it, and exit 2."""
    (app_dir / "app.py").write_text(APP + "APP_NAME = 'mine'\n")
    result = _ingress("serve", spec, "--tcp", "127.0.0.1:0", cwd=app_dir)
    assert result.returncode == EXIT_USAGE
    assert says in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("ingress")]) == 1


def test_an_app_that_raises_while_importing_is_one_line_and_exit_one(app_dir):
    """A module that raises on import: exit 1, one line naming module and cause; the traceback on debug."""
    (app_dir / "broken.py").write_text("import os\nCONFIG = 1 / 0\n")
    (app_dir / "needs.py").write_text("import some_dependency_that_is_not_installed\n")
    plain = _ingress("serve", "broken:worker", "--tcp", "127.0.0.1:0", cwd=app_dir)
    missing = _ingress("serve", "needs:worker", "--tcp", "127.0.0.1:0", cwd=app_dir)
    debug = _ingress("serve", "broken:worker", "--tcp", "127.0.0.1:0", "--log-level", "debug", cwd=app_dir)
    assert plain.returncode == missing.returncode == debug.returncode == EXIT_FAILURE
    assert plain.stderr.strip().splitlines() == [
        "ingress: importing 'broken' failed: ZeroDivisionError: division by zero "
        "(--log-level debug shows the traceback)"
    ]
    assert "some_dependency_that_is_not_installed" in missing.stderr and "Traceback" not in missing.stderr
    assert "Traceback" in debug.stderr and 'broken.py", line 2' in debug.stderr


def test_the_console_script_is_what_the_readme_runs():
    """The test above runs the installed `ingress` script, not `python -m runtime` (they differed)."""
    assert os.access(INGRESS, os.X_OK)
