"""`ingress serve` configuration: flags or INGRESS_ variables (flags win), --help, --version."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import EXIT_OK, EXIT_USAGE
from runtime.testing import spawn_process

INGRESS = str(Path(sys.executable).with_name("ingress"))


def _ingress(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INGRESS, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("env", "flags", "drain_timeout"),
    [
        ({"INGRESS_DRAIN_TIMEOUT": "7"}, [], 7.0),
        ({"INGRESS_DRAIN_TIMEOUT": "7"}, ["--drain-timeout", "3"], 3.0),
    ],
    ids=["variable", "flag-wins"],
)
async def test_options_come_from_the_environment_and_flags_win(env, flags, drain_timeout):
    """INGRESS_TCP and INGRESS_DRAIN_TIMEOUT configure a real worker; a flag beats its variable."""
    variables = {"INGRESS_TCP": "127.0.0.1:0", "INGRESS_LOG_FORMAT": "json", **env}
    async with spawn_process([INGRESS, "serve", *flags], env=variables) as worker:
        assert set(worker.addresses) == {"tcp"}  # from INGRESS_TCP alone: no default HTTP listener
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
        requested = await worker.wait_event("shutdown.requested")
    assert requested["drain_timeout"] == drain_timeout


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("INGRESS_DRAIN_TIMEOUT", "soon", "non-negative number of seconds"),
        ("INGRESS_LOG_LEVEL", "loud", "expected one of debug, info"),
        ("INGRESS_TCP", "localhost", "HOST:PORT"),
        ("INGRESS_NO_ACCESS_LOG", "maybe", "expected one of 1, true"),
    ],
)
def test_a_bad_variable_is_a_usage_error_that_names_it(variable, value, says):
    """A variable that would be a bad flag is exit 2 with one line naming the variable and its value."""
    result = _ingress("serve", env={variable: value})
    assert result.returncode == EXIT_USAGE
    assert f"{variable}={value!r}" in result.stderr and says in result.stderr


def test_help_shows_every_option_with_its_default_and_variable():
    """`ingress serve --help` gives every option a help text, its default and its INGRESS_ variable."""
    text = " ".join(_ingress("serve", "--help").stdout.split())
    options = set(re.findall(r"\[(--[a-z-]+)", text)) | {"--no-access-log"}
    assert {"--drain-timeout", "--shutdown-delay", "--log-format", "--log-level", "--http"} <= options
    for option in options:
        variable = "INGRESS_" + option.lstrip("-").replace("-", "_").upper()
        assert f"env {variable}]" in text, option
    assert text.count("[default:") == len(options) + 1  # and APP


def test_version():
    """`ingress --version` prints the installed version."""
    from importlib.metadata import version

    result = _ingress("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ingress {version('trio-ingress')}"


def test_a_bad_serve_variable_does_not_break_other_commands():
    """A stale INGRESS_ variable of serve leaves `ingress --version` and `ingress call` alone."""
    stale = {"INGRESS_LOG_LEVEL": "verbose", "INGRESS_CERTFILE": "/nowhere.pem"}
    version = _ingress("--version", env=stale)
    call = _ingress("call", "echo", "--tcp", "127.0.0.1:1", env=stale)
    assert version.returncode == 0
    assert call.returncode == 1 and "UNAVAILABLE" in call.stderr  # it tried: nobody listens there
