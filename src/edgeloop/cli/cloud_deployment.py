"""`edgeloop cloud deployment …`: deploy components to the fleet and follow the rollout."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgeloop.cli._common import JsonOption, console, one_line_errors, print_json
from edgeloop.cli.cloud import CloudClient, UrlOption
from edgeloop.core.errors import ValidationError

__all__ = ["deployment_app"]

deployment_app = typer.Typer(
    help="Deploy components to thing groups in stages, and follow the rollouts.",
    no_args_is_help=True,
)

# A rollout is over in these; an aborted one once its rollback has nothing left to do.
SETTLED = ("COMPLETED", "CANCELED", "SUPERSEDED")
EXECUTION_ORDER = (
    "QUEUED",
    "IN_PROGRESS",
    "SUCCEEDED",
    "FAILED",
    "REJECTED",
    "TIMED_OUT",
    "CANCELED",
    "REMOVED",
)
_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "REJECTED": "red", "TIMED_OUT": "red"}

IdArgument = Annotated[str, typer.Argument(help="The deployment's id.")]
WatchOption = Annotated[
    bool, typer.Option("--watch", "-w", help="Follow the rollout live until it settles.")
]


def _document(path: Path, group: str | None, thing: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValidationError("no such file", source=str(path)) from None
    except ValueError as err:
        raise ValidationError(f"not JSON: {err}", source=str(path)) from None
    if not isinstance(doc, dict):
        raise ValidationError("must be a JSON object (a CreateDeployment body)", source=str(path))
    if group and thing:
        raise ValidationError("give --group or --thing, not both", field="--group")
    if group:
        doc["targetArn"] = f"thinggroup/{group}"
    elif thing:
        doc["targetArn"] = f"thing/{thing}"
    elif "targetArn" not in doc:
        raise ValidationError(
            "the document has no targetArn: give --group NAME or --thing NAME",
            source=str(path),
        )
    return doc


@deployment_app.command("create")
@one_line_errors
def deployment_create(
    document: Annotated[
        Path,
        typer.Argument(
            help="A CreateDeployment body (JSON): components, deploymentPolicies, "
            "iotJobConfiguration, and targetArn unless --group or --thing is given."
        ),
    ],
    group: Annotated[str | None, typer.Option(help="Deploy to this thing group.")] = None,
    thing: Annotated[str | None, typer.Option(help="Deploy to this one thing.")] = None,
    watch: WatchOption = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a deployment; its canary (or first wave) is notified at once."""
    body = _document(document, group, thing)
    with CloudClient(url) as api:
        created = api.call("POST", "/deployments", json_body=body)
        if as_json and not watch:
            print_json(created)
            return
        if not as_json:
            console.print(
                f"deployment [bold]{created['deploymentId']}[/bold] created for "
                f"{escape(created['target'])}: {created['targets']} hubs",
                highlight=False,
            )
        if watch:
            _follow(api, created["deploymentId"], as_json=as_json)


@deployment_app.command("list")
@one_line_errors
def deployment_list(
    target: Annotated[str | None, typer.Option(help="A group's name, or thing/NAME.")] = None,
    status: Annotated[str | None, typer.Option(help="Only deployments in this status.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deployments, newest first."""
    params = {k: v for k, v in (("target", target), ("status", status)) if v}
    with CloudClient(url) as api:
        found = api.call("GET", "/deployments", params=params)["deployments"]
    if as_json:
        print_json(found)
        return
    table = Table("id", "name", "target", "status", "progress", "succeeded", "failed")
    for d in found:
        executions = d["executions"]
        failed = sum(executions.get(s, 0) for s in ("FAILED", "REJECTED", "TIMED_OUT"))
        table.add_row(
            d["deploymentId"],
            escape(d["deploymentName"]),
            escape(d["target"]),
            _status(d["status"]),
            f"{d['released']}/{d['targets']}",
            str(executions.get("SUCCEEDED", 0)),
            str(failed),
        )
    console.print(table if found else "no deployments")


@deployment_app.command("status")
@one_line_errors
def deployment_status(
    deployment_id: IdArgument,
    watch: WatchOption = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """A deployment's rollout: waves, successes, failures, and the abort decision."""
    with CloudClient(url) as api:
        if watch:
            _follow(api, deployment_id, as_json=as_json)
            return
        detail = api.call("GET", f"/deployments/{deployment_id}", what="deployment")
    if as_json:
        print_json(detail)
    else:
        console.print(render(detail))


def _transition(verb: str, deployment_id: str, url: str | None, as_json: bool, body: Any) -> None:
    with CloudClient(url) as api:
        result = api.call("POST", f"/deployments/{deployment_id}/{verb}", json_body=body)
    if as_json:
        print_json(result)
    else:
        console.print(f"deployment {deployment_id} is {_status(result['status'])}", highlight=False)


@deployment_app.command("pause")
@one_line_errors
def deployment_pause(
    deployment_id: IdArgument, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Release no more waves (hubs already notified carry on)."""
    _transition("pause", deployment_id, url, as_json, None)


@deployment_app.command("resume")
@one_line_errors
def deployment_resume(
    deployment_id: IdArgument, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Release waves again."""
    _transition("resume", deployment_id, url, as_json, None)


@deployment_app.command("cancel")
@one_line_errors
def deployment_cancel(
    deployment_id: IdArgument,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "canceled by an operator",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop for good: queued hubs are skipped; hubs keep what they run."""
    _transition("cancel", deployment_id, url, as_json, {"reason": reason})


# -- the live view ------------------------------------------------------------------------


def settled(detail: dict[str, Any]) -> bool:
    """Whether a rollout has nothing left to do (an abort: once its rollback is done)."""
    executions = detail.get("executions", {})
    if detail["status"] in SETTLED:
        return True
    if detail["status"] != "ABORTED":
        return False
    rollback = detail.get("rollback") or {}
    return (
        not executions.get("IN_PROGRESS")
        and not rollback.get("QUEUED")
        and not (rollback.get("IN_PROGRESS"))
    )


def _follow(api: CloudClient, deployment_id: str, *, as_json: bool, every: float = 1.0) -> None:
    path = f"/deployments/{deployment_id}"
    detail = api.call("GET", path, what="deployment")
    if as_json:
        while not settled(detail):
            time.sleep(every)
            detail = api.call("GET", path, what="deployment")
        print_json(detail)
        return
    with Live(render(detail), console=console, refresh_per_second=4) as live:
        while not settled(detail):
            time.sleep(every)
            detail = api.call("GET", path, what="deployment")
            live.update(render(detail))


def render(detail: dict[str, Any]) -> Group:
    """The rollout as a rich renderable: header, progress, executions, waves, decision."""
    executions = detail.get("executions", {})
    head = Text.assemble(
        (f"{detail['deploymentId']}", "bold"),
        f"  {detail['deploymentName'] or '(unnamed)'} → {detail['target']}  ",
        (detail["status"], _STATUS_STYLE.get(detail["status"], "")),
        f"  phase {detail['phase']}",
    )
    components = ", ".join(f"{n} {v}" for n, v in sorted(detail["components"].items()))
    total = max(1, detail["targets"])
    done = sum(executions.get(s, 0) for s in ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"))
    bar = _bar(detail["released"], done, total)
    lines: list[Any] = [
        head,
        Text(f"components: {components}"),
        Text.assemble(
            f"notified {detail['released']}/{detail['targets']}  executed {done}  ",
            f"rate {detail['ratePerMinute']:.0f}/min  ",
            bar,
        ),
    ]
    table = Table("status", "hubs", box=None, pad_edge=False)
    for status in EXECUTION_ORDER:
        if executions.get(status):
            table.add_row(Text(status, _STYLE.get(status, "")), str(executions[status]))
    lines.append(table)
    waves = [e for e in detail.get("events", []) if e["kind"] == "wave"]
    if waves:
        wave_table = Table("wave", "at", "phase", "hubs", "notified", "rate/min", box=None)
        for number, event in enumerate(waves[-8:], start=max(1, len(waves) - 7)):
            d = event["detail"]
            wave_table.add_row(
                str(number),
                event["at"][11:19],
                d.get("phase", ""),
                str(d.get("size", "")),
                str(d.get("released", "")),
                f"{d.get('ratePerMinute', 0):.0f}",
            )
        lines.append(wave_table)
    if detail["canary"]:
        lines.append(Text(f"canary: {', '.join(detail['canary'])}"))
    if detail["status"] == "ABORTED":
        lines.append(Text(f"aborted: {detail['reason']}", "bold red"))
        rollback = detail.get("rollback") or {}
        lines.append(
            Text(
                f"fleet rollback to {detail.get('previousDeploymentId') or 'nothing'}: "
                + (", ".join(f"{k} {v}" for k, v in rollback.items() if v) or "no hub to roll back")
            )
        )
    elif detail["status"] == "CANCELED":
        lines.append(Text(f"canceled: {detail['reason']}", "yellow"))
    elif detail["status"] == "COMPLETED":
        lines.append(Text("completed: every notified hub ran it", "green"))
    return Group(*lines)


_STATUS_STYLE = {
    "ACTIVE": "cyan",
    "PAUSED": "yellow",
    "COMPLETED": "green",
    "ABORTED": "bold red",
    "CANCELED": "yellow",
    "SUPERSEDED": "dim",
}


def _status(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def _bar(released: int, done: int, total: int, width: int = 30) -> Text:
    executed = round(width * done / total)
    notified = max(executed, round(width * released / total))
    return Text.assemble(
        ("█" * executed, "green"),
        ("▒" * (notified - executed), "cyan"),
        ("·" * (width - notified), "dim"),
    )
