"""`edgeloop cloud ml …`: train models from the lake, browse the model registry, promote and
package versions.

Every command is a client of the cloud's API (``/api/v1/ml/...``). Training runs inside
the cloud, next to its lake and object store (its fits in a process pool there, or on the
Dask cluster given with ``--cluster``): ``train`` starts a run and follows it with a
progress bar until it ends (Ctrl-C stops following, not the run; ``--detach`` does not
follow at all), so it works the same against a cloud on this machine or a remote one.
"""

from __future__ import annotations

import getpass
import time
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeloop.cli._common import JsonOption, console, one_line_errors, print_json
from edgeloop.cli.cloud import CloudClient, UrlOption
from edgeloop.core.errors import CloudError, ValidationError

__all__ = ["ml_app"]

ml_app = typer.Typer(
    help="Train anomaly models from the lake; list, show, promote and package versions.",
    no_args_is_help=True,
)

POLL_SECONDS = 0.5


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def _q(segment: str) -> str:
    return quote(segment, safe="")


@ml_app.command("train")
@one_line_errors
def ml_train(
    appliance: Annotated[
        list[str] | None,
        typer.Option("--appliance", "-a", help="An appliance kind to train (repeat; all)."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Readings from: an ISO 8601 time, or 90m, 6h, 7d ago.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Readings before: the same forms.")] = None,
    holdout: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="Share of each kit's latest readings held out.")
    ] = 0.3,
    per_device: Annotated[
        bool, typer.Option(help="Fit each kit's own model too; keep it where it pays.")
    ] = True,
    cluster: Annotated[
        str | None,
        typer.Option(help="A Dask scheduler (tcp://host:port); default: a process pool."),
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes of the pool.")] = None,
    detach: Annotated[bool, typer.Option(help="Start the run and return its id.")] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train models from the lake: snapshot, fit, evaluate on held-out labels, register."""
    body: dict[str, Any] = {
        "appliances": appliance or [],
        "since": since,
        "until": until,
        "holdout": holdout,
        "perDevice": per_device,
        "cluster": cluster,
        "workers": workers,
        "by": _who(),
    }
    fields = {"since": "--since", "until": "--until", "cluster": "--cluster", "spec": "--appliance"}
    with CloudClient(url) as api:
        run = api.call("POST", "/ml/train", json_body=body, fields=fields)
        if detach:
            if as_json:
                print_json(run)
            else:
                console.print(f"training run {run['id']} started", highlight=False)
            return
        run = _follow(api, run, quiet=as_json)
    if as_json:
        print_json(run)
    else:
        _report(run)
    if run["state"] != "succeeded":
        raise CloudError(f"training run {run['id']} failed: {run['error']}")


def _follow(api: CloudClient, run: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    path = f"/ml/runs/{_q(run['id'])}"
    columns = (
        TextColumn("[bold]{task.fields[phase]:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task("starting", total=None, phase="queued")
        while True:
            bar.update(
                task,
                completed=run["done"],
                total=run["total"] or None,
                description=escape(run["message"]),
                phase=run["phase"],
            )
            if run["state"] not in ("queued", "running"):
                return run
            time.sleep(POLL_SECONDS)
            run = api.call("GET", path)


def _report(run: dict[str, Any]) -> None:
    outcome = run.get("outcome")
    if not outcome:
        return
    table = Table("model", "version", "scope", "F1", "precision", "recall", "false alarms/day")
    for version in outcome["registered"]:
        m = version["metrics"]
        table.add_row(
            escape(version["name"]),
            str(version["version"]),
            version["scope"] + (f" {escape(version['device'])}" if version["device"] else ""),
            f"{m['f1']:.2f}",
            f"{m['precision']:.2f}",
            f"{m['recall']:.2f}",
            f"{m['false_alarms_per_day']:.2f}",
        )
    console.print(table)
    for skipped in outcome["skipped"]:
        console.print(
            f"not kept: {escape(skipped['name'])} (F1 {skipped['f1']:.2f} against the kind's "
            f"{skipped['kindF1']:.2f}: {skipped['reason']})",
            style="dim",
            highlight=False,
        )
    console.print(
        f"dataset {outcome['datasetHash'][:12]} ({outcome['readings']:,} readings), "
        f"{outcome['seconds']:.1f} s",
        highlight=False,
    )


@ml_app.command("runs")
@one_line_errors
def ml_runs(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Training runs the cloud has kept, newest first."""
    with CloudClient(url) as api:
        runs = api.call("GET", "/ml/runs")
    if as_json:
        print_json(runs)
        return
    table = Table("id", "state", "phase", "progress", "started", "by", "result")
    for run in runs:
        outcome = run.get("outcome")
        result = f"{len(outcome['registered'])} versions" if outcome else escape(run["error"] or "")
        table.add_row(
            run["id"],
            run["state"],
            run["phase"],
            f"{run['done']}/{run['total']}",
            run["startedAt"][:19],
            escape(run["request"]["by"]),
            result,
        )
    console.print(table)


@ml_app.command("models")
@one_line_errors
def ml_models(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Every model: its latest version, aliases and latest quality."""
    with CloudClient(url) as api:
        models = api.call("GET", "/ml/models")
    if as_json:
        print_json(models)
        return
    table = Table("model", "appliance", "scope", "latest", "versions", "aliases", "F1", "updated")
    for model in models:
        m = model["latestMetrics"]
        table.add_row(
            escape(model["name"]),
            escape(model["appliance"]),
            model["scope"],
            str(model["latest"]),
            str(model["versions"]),
            ", ".join(f"{a}={v}" for a, v in model["aliases"].items()) or "—",
            f"{m['f1']:.2f}" if "f1" in m else "—",
            model["updatedAt"][:19],
        )
    console.print(table)


def _split(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    if not name:
        raise ValidationError("give a model name, as NAME or NAME@VERSION", field="NAME")
    return name, version or None


@ml_app.command("show")
@one_line_errors
def ml_show(
    model: Annotated[
        str,
        typer.Argument(
            help="NAME, or NAME@VERSION (a number, an alias or latest).", show_default=False
        ),
    ],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """A model's versions and alias history, or one version's details."""
    name, ref = _split(model)
    with CloudClient(url) as api:
        if ref is None:
            shown = api.call("GET", f"/ml/models/{_q(name)}")
        else:
            shown = api.call("GET", f"/ml/models/{_q(name)}/versions/{_q(ref)}")
    if as_json:
        print_json(shown)
        return
    if ref is None:
        _show_model(shown)
    else:
        _show_version(shown)


def _show_model(model: dict[str, Any]) -> None:
    table = Table("version", "aliases", "F1", "precision", "recall", "dataset", "code", "created")
    for v in model["versions"]:
        m = v["metrics"]
        table.add_row(
            str(v["version"]),
            ", ".join(v["aliases"]) or "—",
            f"{m.get('f1', 0):.2f}",
            f"{m.get('precision', 0):.2f}",
            f"{m.get('recall', 0):.2f}",
            v["datasetHash"][:12],
            escape(v["codeVersion"]),
            f"{v['createdAt'][:19]} by {escape(v['createdBy'])}",
        )
    console.print(table)
    if model["aliasHistory"]:
        history = Table("when", "alias", "from", "to", "who", "reason", title="alias history")
        for change in model["aliasHistory"]:
            history.add_row(
                change["at"][:19],
                change["alias"],
                str(change["fromVersion"] or "—"),
                str(change["toVersion"] or "—"),
                escape(change["who"]),
                escape(change["reason"]),
            )
        console.print(history)


def _show_version(v: dict[str, Any]) -> None:
    m = v["metrics"]
    console.print(
        f"[bold]{escape(v['name'])}[/bold] version {v['version']} "
        f"({v['scope']}{' ' + escape(v['device']) if v['device'] else ''}, "
        f"{escape(v['appliance'])}); aliases: {', '.join(v['aliases']) or '—'}",
        highlight=False,
    )
    console.print(
        f"dataset {v['datasetHash']}, code {escape(v['codeVersion'])}, "
        f"artifact {v['artifact']['size']:,} bytes sha256 {v['artifact']['sha256'][:12]}",
        highlight=False,
    )
    console.print(
        f"held out: {m.get('readings', 0):,} readings, {m.get('episodes', 0)} fault episodes, "
        f"{m.get('alarms', 0)} alarms ({m.get('false_alarms', 0)} false); precision "
        f"{m.get('precision', 0):.2f}, recall {m.get('recall', 0):.2f}, F1 {m.get('f1', 0):.2f}",
        highlight=False,
    )
    faults = m.get("faults") or {}
    if faults:
        table = Table("fault", "episodes", "detected", "recall", "median delay")
        for name, q in faults.items():
            delay = q["median_delay_s"]
            table.add_row(
                escape(name),
                str(q["episodes"]),
                str(q["detected"]),
                f"{q['recall']:.2f}",
                "—" if delay is None else f"{delay / 60:.1f} min",
            )
        console.print(table)


@ml_app.command("promote")
@one_line_errors
def ml_promote(
    name: Annotated[str, typer.Argument(help="The model.", show_default=False)],
    version: Annotated[
        str, typer.Argument(help="A version number (or an alias holding one).", show_default=False)
    ],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "champion",
    reason: Annotated[str, typer.Option(help="Why, for the alias history.")] = "",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point an alias (champion, challenger, ...) at a version; the history keeps the change."""
    body = {
        "version": int(version) if version.isdigit() else version,
        "reason": reason,
        "by": _who(),
    }
    with CloudClient(url) as api:
        change = api.call(
            "POST",
            f"/ml/models/{_q(name)}/aliases/{_q(alias)}",
            json_body=body,
            fields={"alias": "--alias", "version": "VERSION"},
        )
    if as_json:
        print_json(change)
        return
    before = change["fromVersion"]
    console.print(
        f"{escape(name)}@{change['alias']} -> version {change['toVersion']}"
        + (f" (was {before})" if before is not None else ""),
        highlight=False,
    )


@ml_app.command("package")
@one_line_errors
def ml_package(
    name: Annotated[str, typer.Argument(help="The model.", show_default=False)],
    version: Annotated[
        str, typer.Argument(help="A version number, an alias, or latest.", show_default=False)
    ],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish a version as the component edgeloop.model.NAME, ready to deploy."""
    with CloudClient(url) as api:
        packaged = api.call("POST", f"/ml/models/{_q(name)}/versions/{_q(version)}/package")
    if as_json:
        print_json(packaged)
        return
    component, component_version = packaged["componentName"], packaged["componentVersion"]
    state = "published" if packaged["created"] else "already published"
    console.print(f"{component} {component_version} {state}", highlight=False)
    console.print(
        f'deploy it (a canary first): a document with {{"components": {{"{component}": '
        f'{{"componentVersion": "{component_version}"}}}}}} to edgeloop cloud deployment '
        "create DOCUMENT --group GROUP",
        style="dim",
        highlight=False,
    )
