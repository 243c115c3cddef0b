"""deploy/kubernetes/deployment.yaml against the CLI: its numbers and flags must agree with each other.

Read as text with regular expressions: no YAML library is a dependency of the project, and the few
lines checked here have one fixed shape.
"""

from __future__ import annotations

import re
from pathlib import Path

from runtime._cli import _parser
from runtime.plugins import discover

DEPLOYMENT = Path(__file__).parent.parent / "deploy" / "kubernetes" / "deployment.yaml"
# Beyond the drain: kill_grace (1 s), the engine's stop and phase 3 need a few seconds before SIGKILL.
MIN_MARGIN_S = 10


def _text() -> str:
    return DEPLOYMENT.read_text(encoding="utf-8")


def _container_args() -> list[str]:
    """The items of the container's ``args:`` list, comments and quotes stripped."""
    lines = _text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "args:")
    items = []
    for line in lines[start + 1 :]:
        if line.strip().startswith("#"):
            continue
        item = re.match(r"\s+- (\S+)", line)
        if item is None:
            break
        items.append(item.group(1).strip("\"'"))
    return items


def _serve_args():
    args = _container_args()
    assert args[0] == "serve"
    return _parser(discover(), environment=False).parse_args(args)


def test_grace_period_covers_the_shutdown_delay_and_the_drain():
    """terminationGracePeriodSeconds >= --shutdown-delay + --drain-timeout + 10 s, or the kubelet's
    SIGKILL would cut the drain (editing one number without the other fails here)."""
    grace = int(re.search(r"terminationGracePeriodSeconds:\s*(\d+)", _text()).group(1))
    given = {arg.partition("=")[0] for arg in _container_args()}
    assert {"--shutdown-delay", "--drain-timeout"} <= given  # explicit, not the defaults
    args = _serve_args()
    assert grace >= args.shutdown_delay + args.drain_timeout + MIN_MARGIN_S


def test_container_args_are_a_valid_serve_command_line():
    """Every flag in the container's args is one `ingress serve` accepts, and every listener binds
    0.0.0.0 (the default 127.0.0.1 is unreachable from outside the pod)."""
    args = _serve_args()
    for listener in (args.http, args.tcp, args.metrics):
        assert listener[0] == "0.0.0.0"


def test_ports_probes_and_scrape_annotation_match_the_listeners():
    """The containerPorts are the ports the flags bind, and the scrape annotation names the
    --metrics port (which the probes use by name)."""
    text, args = _text(), _serve_args()
    ports = dict(re.findall(r"- name: (\w+)\s+containerPort: (\d+)", text))
    assert ports == {"http": str(args.http[1]), "tcp": str(args.tcp[1]), "metrics": str(args.metrics[1])}
    assert re.search(r'prometheus\.io/port: "(\d+)"', text).group(1) == str(args.metrics[1])
    probes = re.findall(r"path: (/\w+)\s+port: (\w+)", text)
    assert probes == [("/ready", "metrics"), ("/ready", "metrics"), ("/health", "metrics")]
