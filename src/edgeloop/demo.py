"""`edgeloop demo`: a hub with two example components, their states shown live.

The demo starts a real agent on a temporary hub folder, deploys the example components in
``examples/components`` (a heartbeat, and a sensor reader that crashes now and then and is
restarted with backoff), shows the component table live, then stops everything.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from edgeloop.cli.device import components_table
from edgeloop.edge.control import ControlClient, wait_for_agent

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "components"


def run(seconds: float, keep: bool, console: Console) -> int:
    """Run the demo for ``seconds``; returns an exit code."""
    if not EXAMPLES.is_dir():
        console.print(f"[red]error:[/red] example components not found at {EXAMPLES}")
        return 1
    root = Path(tempfile.mkdtemp(prefix="edgeloop-demo-")) / "hub"
    root.mkdir()
    (root / "agent.json").write_text(
        '{"restart": {"base_delay": 0.5, "max_delay": 4, "cooloff": 10}, "health_window": 1}\n'
    )
    console.print(f"[bold]edgeloop demo[/bold]: starting a hub at {root}")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeloop.edge.agent",
            "--root",
            str(root),
            "--thing-name",
            "demo-hub",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "agent.stderr", "wb"),  # noqa: SIM115 (closed with the process)
    )
    try:
        wait_for_agent(root, agent)
        with ControlClient(root) as client:
            started = time.monotonic()
            record = client.call(
                "deploy",
                recipeDir=str(EXAMPLES / "recipes"),
                artifactDir=str(EXAMPLES / "artifacts"),
                merge={"com.example.Heartbeat": "1.0.0", "com.example.FlakySensor": "1.0.0"},
            )
            console.print(f"deploying 2 example components (deployment {record['deploymentId']})")
            while record["status"] not in ("SUCCEEDED", "FAILED"):
                time.sleep(0.05)
                record = client.call("deployment", id=record["deploymentId"])
            took = time.monotonic() - started
            console.print(f"deployment {record['status']} in {took:.2f} s")
            if record["status"] != "SUCCEEDED":
                console.print(record.get("failureCause") or "")
                return 1
            _show_live(client, root, seconds, console)
        if keep:
            console.print(
                f"the hub keeps running (pid {agent.pid}); try:\n"
                f"  edgeloop device components --root {root}\n"
                f"  edgeloop device logs com.example.FlakySensor --root {root} --follow\n"
                f"stop it with: kill {agent.pid}"
            )
            return 0
        return 0
    finally:
        if not keep:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
            shutil.rmtree(root.parent, ignore_errors=True)
            console.print("hub stopped, demo folder removed")


def _show_live(client: ControlClient, root: Path, seconds: float, console: Console) -> None:
    deadline = time.monotonic() + seconds
    sensor_log = root / "logs" / "com.example.FlakySensor.log"

    def frame() -> Group:
        table = components_table(client.call("components"))
        left = max(0.0, deadline - time.monotonic())
        table.title = f"hub demo-hub: components (demo ends in {left:.0f} s)"
        tail = sensor_log.read_text().splitlines()[-4:] if sensor_log.exists() else []
        return Group(table, Panel(Text("\n".join(tail)), title="FlakySensor log (last lines)"))

    if console.is_terminal:
        with Live(frame(), console=console, refresh_per_second=4) as live:
            while time.monotonic() < deadline:
                time.sleep(0.25)
                live.update(frame())
    else:
        # Not a terminal (CI, a pipe): a snapshot every few seconds instead of a live view.
        while time.monotonic() < deadline:
            console.print(frame())
            time.sleep(min(4.0, max(0.0, deadline - time.monotonic())))
        console.print(frame())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m edgeloop.demo``."""
    parser = argparse.ArgumentParser(prog="edgeloop demo", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to show the hub")
    parser.add_argument("--keep", action="store_true", help="leave the hub running afterwards")
    args = parser.parse_args(argv)
    try:
        return run(args.seconds, args.keep, Console())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
