"""`edgeloop device …`: run a hub and manage what it runs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from edgeloop.cli._common import (
    JsonOption,
    RootOption,
    console,
    err_console,
    one_line_errors,
    print_json,
)
from edgeloop.core.errors import AgentError, ValidationError
from edgeloop.edge.control import ControlClient

app = typer.Typer(help="Run a hub and manage its components.", no_args_is_help=True)

STATE_STYLE = {
    "RUNNING": "green",
    "FINISHED": "cyan",
    "ERRORED": "red",
    "BROKEN": "bold red",
    "STARTING": "yellow",
    "STOPPING": "yellow",
    "INSTALLED": "blue",
    "NEW": "dim",
}


@app.command()
@one_line_errors
def run(
    root: RootOption,
    thing_name: Annotated[
        str | None, typer.Option(help="The hub's thing name (default: the host name).")
    ] = None,
    health_window: Annotated[
        float | None,
        typer.Option(help="Default seconds a deployment's components must stay healthy."),
    ] = None,
    cloud_endpoint: Annotated[
        str | None, typer.Option(help="The cloud's MQTT broker, HOST:PORT (saved in agent.json).")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="The hub's certificate (PEM); its CN is the thing name.")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="The hub's private key (PEM).")] = None,
    ca: Annotated[Path | None, typer.Option(help="The cloud's CA chain (PEM).")] = None,
) -> None:
    """Run the hub's agent in the foreground (Ctrl-C stops it and its components)."""
    _save_cloud_flags(root, cloud_endpoint, cert, key, ca)
    argv = [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(root)]
    if thing_name:
        argv += ["--thing-name", thing_name]
    if health_window is not None:
        argv += ["--health-window", str(health_window)]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, so the agent process carries none of the CLI's imports (memory is a target).
    os.execv(sys.executable, argv)


def _save_cloud_flags(root: Path, endpoint: str | None, *files: Path | None) -> None:
    """Merge the cloud flags into ``<root>/agent.json``'s ``cloud`` key, validated first, so
    that later runs without flags keep the connection."""
    given = {"endpoint": endpoint} if endpoint else {}
    given |= {k: str(f.resolve()) for k, f in zip(("cert", "key", "ca"), files, strict=True) if f}
    if not given:
        return
    from edgeloop.edge.settings import AgentSettings

    path = root / "agent.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError as err:
        raise ValidationError(f"not valid JSON ({err})", source=str(path)) from err
    if not isinstance(doc, dict):
        raise ValidationError("must be a JSON object", source=str(path))
    doc["cloud"] = {**(doc.get("cloud") or {}), **given}
    root.mkdir(parents=True, exist_ok=True)
    AgentSettings(root=root).with_document(doc, source=f"{path} with the --cloud flags")
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


@app.command()
@one_line_errors
def status(root: RootOption, as_json: JsonOption = False) -> None:
    """Show the agent's status."""
    with ControlClient(root) as client:
        result = client.call("status")
    if as_json:
        print_json(result)
        return
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result["components"].items())) or "none"
    console.print(f"[bold]hub[/bold] {result['thingName']} at {result['root']}")
    console.print(f"agent {result['version']}, pid {result['pid']}, up {_ago(result['startedAt'])}")
    console.print(f"deployment {result['deploymentId'] or '(none yet)'}")
    console.print(f"components: {counts}")
    ipc = result.get("ipc") or {}
    if ipc:
        console.print(
            f"ipc: {ipc['connections']} connection(s), {ipc['subscriptions']} subscription(s), "
            f"{ipc['published']} published, {ipc['pending']} queued, "
            f"{ipc['dropped']} dropped for slow subscribers, {ipc['deniedCalls']} denied call(s)"
        )
    cloud = result.get("cloud")
    if cloud:
        state = "[green]connected[/green]" if cloud["connected"] else "[red]offline[/red]"
        since = f" (changed {_ago(cloud['since'])})" if cloud.get("since") else ""
        console.print(f"cloud: {cloud['endpoint']} {state}{since}, {cloud['queued']} queued")
    for line in fleet_lines(result.get("fleet")):
        console.print(line)
    for line in broker_lines(result.get("broker"), result.get("bridge")):
        console.print(line, highlight=False)


def broker_lines(broker: dict[str, Any] | None, bridge: dict[str, Any] | None) -> list[str]:
    """What ``device status`` says about the kits' broker and the bridge's mappings."""
    lines = []
    if broker:
        state = broker["state"]
        style = STATE_STYLE.get(state, "")
        shown = f"[{style}]{state}[/{style}]" if style else state
        lines.append(
            f"broker: {shown}, kits on {broker['host']}:{broker['port']} (mTLS, CA "
            f"{escape(broker['caFile'])}), pid {broker['pid'] or '-'}, "
            f"{broker['restarts']} restart(s)"
        )
        if broker.get("serverCaFile"):
            lines.append(f"  kits trust the hub with {escape(broker['serverCaFile'])}")
        if broker.get("droppedForClients"):
            lines.append(
                f"  [red]the broker dropped queued messages {broker['droppedForClients']} "
                "time(s) (its queue cap); see its log[/red]"
            )
        error = broker.get("lastError")
        if error and state != "RUNNING":
            lines.append(f"  [red]{escape(str(error['reason']))}[/red]")
    if bridge:
        link = "[green]connected[/green]" if bridge["connected"] else "[red]not connected[/red]"
        lines.append(
            f"bridge: {link}, {bridge['acked']} acknowledged, {bridge['pendingAcks']} storing, "
            f"{bridge['stale']} left for redelivery"
        )
        if bridge.get("blocked"):
            lines.append(f"  [red]blocked, retrying: {escape(bridge['blocked'])}[/red]")
        if bridge.get("lost"):
            lines.append(f"  [red]{bridge['lost']} IPC/cloud message(s) lost (see the log)[/red]")
        for m in bridge["mappings"]:
            lines.append(
                f"  {escape(m['name'])}: {escape(m['topic'])} {m['source']} -> "
                f"{escape(m['target'])}: {m['received']} received, {m['forwarded']} forwarded, "
                f"{m['invalid']} invalid, {m['duplicates']} duplicate(s), "
                f"{m['deadLettered']} dead-lettered"
            )
    return lines


def fleet_lines(fleet: dict[str, Any] | None) -> list[str]:
    """What ``device status`` says about fleet deployments: the job in hand, the last
    outcome, and the deployment each target has on the hub."""
    if not fleet:
        return []
    current = fleet.get("current")
    if current:
        what = f"job {current['jobId']}"
        if current.get("deploymentId"):
            what += f" (deployment {current['deploymentId']}, target {current.get('target')})"
        lines = [f"fleet: {what}: {fleet['step']} since {_ago(fleet.get('since'))}"]
    else:
        lines = ["fleet: idle, no job in hand"]
    last = fleet.get("last")
    if last:
        colour = {"SUCCEEDED": "green", "FAILED": "red"}.get(last["status"], "yellow")
        why = f": {escape(str(last['reason']))}" if last.get("reason") else ""
        lines.append(
            f"  last job {last['jobId']} [{colour}]{last['status']}[/{colour}] "
            f"{_ago(last.get('at'))}{why}"
        )
    for target, entry in sorted((fleet.get("targets") or {}).items()):
        components = ", ".join(f"{n} {v}" for n, v in sorted(entry["components"].items()))
        lines.append(
            f"  target {target}: deployment {entry.get('deploymentId')} "
            f"({escape(components) or 'no components'})"
        )
    return lines


@app.command()
@one_line_errors
def components(root: RootOption, as_json: JsonOption = False) -> None:
    """List components: name, version, state, pid, restarts, last error."""
    with ControlClient(root) as client:
        result = client.call("components")
    if as_json:
        print_json(result)
        return
    console.print(components_table(result))


def components_table(rows: list[dict[str, Any]]) -> Table:
    """The components as a rich table."""
    table = Table(title="components")
    for column in ("name", "version", "state", "pid", "restarts", "since"):
        table.add_column(column, no_wrap=True)
    table.add_column("last error / note", min_width=12)
    for row in rows:
        style = STATE_STYLE.get(row["state"], "")
        error = row.get("lastError")
        detail = row.get("note") or ""
        if error:
            detail = f"{error['reason']}" + (f"; {detail}" if detail else "")
        table.add_row(
            row["name"],
            row["version"],
            f"[{style}]{row['state']}[/{style}]" if style else row["state"],
            str(row["pid"] or "-"),
            str(row["restarts"]),
            _ago(row["since"]),
            detail,
        )
    return table


@app.command()
@one_line_errors
def streams(root: RootOption, as_json: JsonOption = False) -> None:
    """Show the hub's durable streams: pending, exported, dropped (and why), oldest age."""
    with ControlClient(root) as client:
        result = client.call("streams")
    if as_json:
        print_json(result)
        return
    console.print(streams_table(result))


def streams_table(rows: list[dict[str, Any]]) -> Table:
    """The spool's streams as a rich table, in export order."""
    table = Table(title="streams")
    for column in ("stream", "priority", "full policy", "pending", "size", "oldest"):
        table.add_column(column, no_wrap=True)
    for column in ("appended", "exported", "dead-lettered"):
        table.add_column(column, justify="right")
    table.add_column("dropped", min_width=12)
    table.add_column("export", min_width=12)
    for row in rows:
        age = row["oldestPendingAge"]
        dropped = ", ".join(f"{reason}: {n}" for reason, n in sorted(row["dropped"].items()))
        table.add_row(
            row["name"],
            str(row["priority"]),
            row["fullPolicy"],
            f"{row['pending']} ({_bytes(row['pendingBytes'])})",
            f"{_bytes(row['diskBytes'])} of {_bytes(row['maxBytes'])}",
            "-" if age is None else _duration(age),
            str(row["appended"]),
            str(row["exported"]),
            str(row["deadLettered"]),
            f"[red]{escape(dropped)}[/red]" if dropped else "-",
            export_cell(row.get("export")),
        )
    return table


def export_cell(export: dict[str, Any] | None) -> str:
    """How a stream goes to the cloud, and what its exporter is doing or why it waits."""
    if not export:
        return "-"
    text = f"{export['policy']} {export['state']}"
    if export.get("retryIn") is not None:
        text += f", next try in {_duration(export['retryIn'])}"
    if export.get("deadLettered"):
        text += f", {export['deadLettered']} refused"
    error = export.get("lastError")
    return f"{text}: [red]{escape(error)}[/red]" if error else text


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


@app.command()
@one_line_errors
def deploy(
    root: RootOption,
    recipe_dir: Annotated[
        Path | None, typer.Option(help="Folder of recipes (JSON or YAML) to add to the hub.")
    ] = None,
    artifact_dir: Annotated[
        Path | None, typer.Option(help="Artifacts laid out as <name>/<version>/<file>.")
    ] = None,
    merge: Annotated[
        list[str] | None, typer.Option(help="Add or update a root component: NAME=VERSION.")
    ] = None,
    remove: Annotated[list[str] | None, typer.Option(help="Remove a root component.")] = None,
    update_config: Annotated[
        str | None,
        typer.Option(
            help='Configuration updates: JSON {"NAME": {"MERGE": {...}, "RESET": ["/ptr"]}}, '
            "or @FILE."
        ),
    ] = None,
    failure_handling: Annotated[
        str, typer.Option(help="ROLLBACK (default) or DO_NOTHING.")
    ] = "ROLLBACK",
    health_window: Annotated[
        float | None, typer.Option(help="Seconds the components must stay healthy.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for the components to settle.")
    ] = None,
    component_update_policy: Annotated[
        str,
        typer.Option(
            help="NOTIFY_COMPONENTS (default: components may defer the update) or "
            "SKIP_NOTIFY_COMPONENTS."
        ),
    ] = "NOTIFY_COMPONENTS",
    wait: Annotated[bool, typer.Option(help="Wait for the outcome.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Deploy components from local recipes and artifacts, like the Greengrass CLI."""
    request: dict[str, Any] = {
        "recipeDir": str(recipe_dir.resolve()) if recipe_dir else None,
        "artifactDir": str(artifact_dir.resolve()) if artifact_dir else None,
        "merge": _parse_merge(merge or []),
        "remove": list(remove or []),
        "updateConfig": _parse_update_config(update_config),
        "failureHandling": failure_handling.upper(),
        "healthWindow": health_window,
        "timeout": timeout,
        "componentUpdatePolicy": component_update_policy.upper(),
    }
    started = time.monotonic()
    with ControlClient(root) as client:
        record = client.call("deploy", **request)
        if wait:
            record = _wait_for_deployment(client, record["deploymentId"], quiet=as_json)
    elapsed = time.monotonic() - started
    if as_json:
        print_json(record)
    else:
        _print_deployment(record, elapsed if wait else None)
    if record["status"] == "FAILED":
        raise typer.Exit(1)


def _parse_merge(items: list[str]) -> dict[str, str]:
    merge: dict[str, str] = {}
    for item in items:
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            raise ValidationError(f"{item!r} is not NAME=VERSION", field="--merge")
        merge[name.strip()] = version.strip()
    return merge


def _parse_update_config(text: str | None) -> Any:
    if not text:
        return None
    source = "--update-config"
    if text.startswith("@"):
        path = Path(text[1:])
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValidationError(f"cannot read it: {err.strerror}", source=source) from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValidationError(f"not valid JSON ({err})", source=source) from err


def _wait_for_deployment(client: ControlClient, deployment_id: str, *, quiet: bool) -> Any:
    terminal = ("SUCCEEDED", "FAILED", "CANCELED")
    if quiet or not console.is_terminal:
        while True:
            record = client.call("deployment", id=deployment_id)
            if record["status"] in terminal:
                return record
            time.sleep(0.05)
    with Live(console=console, refresh_per_second=8, transient=True) as live:
        while True:
            record = client.call("deployment", id=deployment_id)
            if record["status"] in terminal:
                return record
            table = components_table(client.call("components"))
            table.title = f"deployment {deployment_id}: {record['status']}"
            live.update(table)
            time.sleep(0.1)


def _print_deployment(record: dict[str, Any], elapsed: float | None) -> None:
    status = record["status"]
    took = f" in {elapsed:.2f} s" if elapsed is not None else ""
    colour = {"SUCCEEDED": "green", "FAILED": "red"}.get(status, "yellow")
    console.print(
        f"deployment {record['deploymentId']} [{colour}]{status}[/{colour}]{took}"
        + (f" ({record['detailedStatus']})" if record.get("detailedStatus") else ""),
        highlight=False,
    )
    if record.get("failureCause"):
        err_console.print(record["failureCause"], highlight=False, markup=False)


@app.command()
@one_line_errors
def deployments(
    root: RootOption,
    deployment_id: Annotated[str | None, typer.Argument(help="Show one deployment.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the hub's deployments, newest first (or show one)."""
    with ControlClient(root) as client:
        if deployment_id:
            record = client.call("deployment", id=deployment_id)
            if as_json:
                print_json(record)
            else:
                _print_deployment(record, None)
                console.print_json(data=record["request"])
            return
        result = client.call("deployments")
    if as_json:
        print_json(result)
        return
    table = Table(title="deployments")
    for column in ("id", "status", "detail", "created", "components", "failure"):
        table.add_column(column, overflow="fold")
    for rec in result:
        req = rec["request"]
        what = ", ".join(
            [f"{n}={v}" for n, v in req["merge"].items()] + [f"-{n}" for n in req["remove"]]
        )
        cause = (rec.get("failureCause") or "").splitlines()
        table.add_row(
            rec["deploymentId"],
            rec["status"],
            rec.get("detailedStatus") or "",
            _ago(rec["createdAt"]),
            what,
            cause[0] if cause else "",
        )
    console.print(table)


@app.command()
@one_line_errors
def restart(name: str, root: RootOption) -> None:
    """Restart a component (and its HARD dependents)."""
    _component_request("restart", name, root)


@app.command()
@one_line_errors
def stop(name: str, root: RootOption) -> None:
    """Stop a component until it is restarted or redeployed."""
    _component_request("stop", name, root)


def _component_request(op: str, name: str, root: Path) -> None:
    # Shutdown scripts and grace periods can take a while: a generous timeout.
    with ControlClient(root, timeout=120) as client:
        result = client.call(op, name=name)
    console.print(f"{name}: {result['state']}")


@app.command()
@one_line_errors
def logs(
    name: str,
    root: RootOption,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines to show.")] = 50,
) -> None:
    """Show a component's log (``edgeloop`` for the agent's own)."""
    from edgeloop.edge.logs import follow as follow_log
    from edgeloop.edge.logs import tail_lines
    from edgeloop.edge.settings import Layout

    layout = Layout(root)
    path = layout.logs / "edgeloop.log" if name == "edgeloop" else layout.component_log(name)
    if not path.exists():
        have = sorted(p.stem for p in layout.logs.glob("*.log")) if layout.logs.exists() else []
        raise AgentError(
            f"no log for {name!r} under {layout.logs} (logs: {', '.join(have) or 'none'})"
        )
    for line in tail_lines(path, lines):
        typer.echo(line)
    if follow:

        async def _follow() -> None:
            async for line in follow_log(path):
                typer.echo(line)

        try:
            asyncio.run(_follow())
        except KeyboardInterrupt:
            pass


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
