"""`edgeloop sim …`: simulated monitoring kits — live over MQTT, or as a dataset."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from edgeloop.cli._common import JsonOption, console, err_console, one_line_errors, print_json
from edgeloop.core.errors import ValidationError

app = typer.Typer(
    help="Simulated monitoring kits on furnaces, fridges, washers and water pumps.",
    no_args_is_help=True,
)

DEFAULT_APPLIANCES = "furnace,fridge,washer,pump"

AppliancesOption = Annotated[
    str | None,
    typer.Option(
        help="Kits to simulate, by appliance, comma-separated (furnace, fridge, washer, "
        f"pump; repeat one for two kits). Default without --scenario: {DEFAULT_APPLIANCES}.",
        show_default=False,
    ),
]
ScenarioOption = Annotated[
    Path | None,
    typer.Option(
        help="A scenario file (JSON or YAML): kits, seeds and fault injections.",
        exists=True,
        dir_okay=False,
    ),
]
SeedOption = Annotated[
    int | None, typer.Option(help="Seed for every kit (default: the scenario's, else 0).")
]
StartOption = Annotated[
    str | None,
    typer.Option(
        help="Simulated time of the first reading: ISO 8601, or 'now' (default: the "
        "scenario's, else 2025-01-06T00:00:00Z).",
    ),
]
DurationOption = Annotated[
    str | None,
    typer.Option(help="Simulated time to cover, e.g. 90m, 6h, 2d (default: until stopped)."),
]
CountOption = Annotated[int | None, typer.Option(help="Readings per kit, at most.", min=1)]


def _scenario(
    appliances: str | None, scenario: Path | None, seed: int | None, start: str | None
) -> Any:
    from edgeloop.sim.scenario import home, load_scenario, parse_time

    if scenario is not None and appliances:
        raise ValidationError("give --appliances or --scenario, not both", field="--appliances")
    if scenario is not None:
        chosen = load_scenario(scenario)
    else:
        names = [a.strip() for a in (appliances or DEFAULT_APPLIANCES).split(",") if a.strip()]
        chosen = home(names)
    changes: dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = seed
    if start is not None:
        if start.strip().lower() == "now":
            changes["start_ms"] = int(time.time()) * 1000
        else:
            changes["start_ms"] = parse_time(start, field="--start")
    from dataclasses import replace

    return replace(chosen, **changes)


def _seconds(duration: str | None) -> float | None:
    from edgeloop.sim.scenario import parse_duration

    return None if duration is None else parse_duration(duration, field="--duration")


@app.command()
@one_line_errors
def kits(
    hub: Annotated[str, typer.Option(help="The hub's MQTT broker, HOST:PORT (mutual TLS).")],
    ca: Annotated[
        Path,
        typer.Option(
            help="CA certificate (PEM) that signed the broker's certificate.", exists=True
        ),
    ],
    certs: Annotated[
        Path,
        typer.Option(
            help="Folder of kit certificates: <kit>.cert.pem and <kit>.key.pem per kit.",
            file_okay=False,
        ),
    ],
    ca_key: Annotated[
        Path | None,
        typer.Option(
            help="The CA's private key (PEM): issue certificates for kits missing from --certs "
            "(signed by --ca).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    appliances: AppliancesOption = None,
    scenario: ScenarioOption = None,
    seed: SeedOption = None,
    speed: Annotated[
        float,
        typer.Option(
            help="Simulated seconds per real second; 0: as fast as the broker acks.", min=0
        ),
    ] = 60.0,
    duration: DurationOption = None,
    count: CountOption = None,
    start: StartOption = None,
    topic_prefix: Annotated[
        str, typer.Option(help="Kits publish on PREFIX/<kit>/telemetry and PREFIX/<kit>/status.")
    ] = "kits",
    mqtt: Annotated[str, typer.Option(help="MQTT version: 5 or 3.1.1.")] = "5",
    hostname_check: Annotated[
        bool,
        typer.Option(help="Check that the broker's certificate names the --hub host."),
    ] = True,
    window: Annotated[
        int, typer.Option(help="Readings a kit may have unacknowledged.", min=1, max=65535)
    ] = 100,
    as_json: JsonOption = False,
) -> None:
    """Run each kit as an MQTT client with its own certificate, publishing its readings (QoS 1)
    to the hub's broker; Ctrl-C stops after the readings in flight are acknowledged."""
    from edgeloop.sim.certs import kit_identities
    from edgeloop.sim.kits import KitClient, KitTls, parse_broker, run_kits
    from edgeloop.sim.payload import check_prefix

    if mqtt not in ("5", "3.1.1"):
        raise ValidationError("must be 5 or 3.1.1", field="--mqtt")
    broker = parse_broker(hub)
    prefix = check_prefix(topic_prefix)
    home = _scenario(appliances, scenario, seed, start)
    duration_s = _seconds(duration)
    identities = kit_identities([k.kit_id for k in home.kits], certs, ca_cert=ca, ca_key=ca_key)
    clients = {
        kit.kit_id: KitClient(
            kit,
            broker,
            KitTls(ca=ca, cert=ident.cert, key=ident.key, check_hostname=hostname_check),
            prefix=prefix,
            protocol="5" if mqtt == "5" else "3.1.1",
            window=window,
        )
        for kit, ident in zip(home.kits, identities, strict=True)
    }
    stop = threading.Event()
    _stop_on_signals(stop)
    started = time.monotonic()
    outcome = None
    try:
        for client in clients.values():
            client.start()
        if as_json:
            outcome = run_kits(
                home, clients, speed=speed, duration_s=duration_s, count=count, stop=stop
            )
        else:
            with Live(console=console, refresh_per_second=4, transient=False) as live:

                def tick(simulated: float) -> None:
                    live.update(_view(home, clients, simulated, speed, started, stop.is_set()))

                outcome = run_kits(
                    home,
                    clients,
                    speed=speed,
                    duration_s=duration_s,
                    count=count,
                    stop=stop,
                    tick=tick,
                )
    finally:
        for client in clients.values():
            client.close()
    statuses = [c.status() for c in clients.values()]
    unacked = sum(s.sent - s.acked - s.rejected for s in statuses)
    refused = [s for s in statuses if s.rejected]
    if as_json:
        print_json(
            {
                "broker": str(broker),
                "scenario": home.name,
                "seed": home.seed,
                "stopped": outcome.stopped,
                "simulatedSeconds": outcome.simulated_s,
                "elapsedSeconds": round(time.monotonic() - started, 3),
                "kits": [
                    {
                        "kit": s.kit_id,
                        "appliance": s.appliance,
                        "sent": s.sent,
                        "acked": s.acked,
                        "refused": s.rejected,
                        "firstSeq": s.first_seq,
                        "lastSeq": s.last_seq,
                        "connects": s.connects,
                        "error": s.error,
                    }
                    for s in statuses
                ],
            }
        )
    for s in refused:
        err_console.print(
            f"[red]error:[/red] {broker} refused {s.rejected} reading(s) of kit {s.kit_id}: "
            f"{s.rejection} (does its ACL let the kit publish under {prefix}/?)",
            highlight=False,
        )
    if unacked:
        err_console.print(
            f"[red]error:[/red] {unacked} reading(s) sent were not acknowledged by {broker}",
            highlight=False,
        )
    if unacked or refused:
        raise typer.Exit(1)


def _stop_on_signals(stop: threading.Event) -> None:
    """First Ctrl-C (or SIGTERM): stop after the acks; a second Ctrl-C: stop now."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def _view(
    home: Any,
    clients: dict[str, Any],
    simulated: float,
    speed: float,
    started: float,
    stopping: bool,
) -> Group:
    sim_now = datetime.fromtimestamp(home.start_ms / 1000 + simulated, tz=UTC)
    elapsed = time.monotonic() - started
    pace = "as fast as acks allow" if speed <= 0 else f"speed {speed:g}x"
    head = Text.from_markup(
        f"[bold]{escape(home.name)}[/bold] seed {home.seed} · simulated "
        f"{sim_now:%Y-%m-%d %H:%M:%S}Z (+{simulated / 3600:.2f} h) · {pace} · "
        f"{elapsed:.0f} s elapsed" + (" · [yellow]stopping…[/yellow]" if stopping else "")
    )
    table = Table(show_lines=False)
    for column in ("kit", "appliance", "link", "sent", "acked", "in flight", "last seq", "label"):
        table.add_column(
            column,
            justify="right" if column in ("sent", "acked", "in flight", "last seq") else "left",
        )
    for client in clients.values():
        s = client.status()
        link = "[green]up[/green]" if s.connected else f"[red]down[/red] {escape(s.error or '')}"
        label = s.label if s.label in ("", "normal") else f"[bold red]{escape(s.label)}[/bold red]"
        table.add_row(
            escape(s.kit_id),
            s.appliance,
            link,
            str(s.sent),
            str(s.acked) + (f" [red]({s.rejected} refused)[/red]" if s.rejected else ""),
            str(s.in_flight),
            "—" if s.last_seq is None else str(s.last_seq),
            label,
        )
    return Group(head, table)


@app.command()
@one_line_errors
def generate(
    appliances: AppliancesOption = None,
    scenario: ScenarioOption = None,
    seed: SeedOption = None,
    start: StartOption = None,
    duration: Annotated[
        str, typer.Option(help="Simulated time to cover, e.g. 90m, 6h, 2d.")
    ] = "1d",
    count: CountOption = None,
    out: Annotated[
        Path, typer.Option(help="JSON Lines file to write ('-': standard output).")
    ] = Path("-"),
    truth: Annotated[
        bool,
        typer.Option(
            help="Add every active fault and the label's level to each line "
            "(not part of the telemetry reading)."
        ),
    ] = False,
) -> None:
    """Write readings as fast as they can be made: one telemetry payload per line."""
    from edgeloop.sim.generator import HomeSimulator
    from edgeloop.sim.payload import encode

    home = _scenario(appliances, scenario, seed, start)
    duration_s = _seconds(duration)
    sim = HomeSimulator(home)
    total = sum(
        min(count or 10**18, -(-round((duration_s or 0) * 1000) // k.interval_ms))
        for k in home.kits
    )
    to_stdout = str(out) == "-"
    stream = sys.stdout.buffer if to_stdout else out.open("wb")
    written = 0
    try:
        with Progress(console=err_console, transient=True, disable=to_stdout) as progress:
            task = progress.add_task("generating", total=total)
            for reading in sim.readings(duration_s=duration_s, count=count):
                line = encode(reading)
                if truth:
                    doc = json.loads(line)
                    doc["faults"], doc["level"] = list(reading.faults), reading.level
                    line = json.dumps(doc, separators=(",", ":")).encode()
                stream.write(line + b"\n")
                written += 1
                if written % 5000 == 0:
                    progress.update(task, completed=written)
    finally:
        if not to_stdout:
            stream.close()
    if not to_stdout:
        err_console.print(f"{written} readings from {len(home.kits)} kit(s) written to {out}")


@app.command()
@one_line_errors
def catalog(as_json: JsonOption = False) -> None:
    """List the appliances (with their kits' sensors) and the fault modes."""
    from edgeloop.sim.models import APPLIANCES, FAULTS

    if as_json:
        print_json(
            {
                "appliances": [
                    {
                        "kind": m.kind,
                        "title": m.title,
                        "aliases": list(m.aliases),
                        "intervalSeconds": m.interval_s,
                        "sensors": [
                            {"name": s.name, "quantity": s.quantity.value, "unit": s.unit}
                            for s in m.sensors
                        ],
                    }
                    for m in APPLIANCES.values()
                ],
                "faults": [
                    {
                        "name": f.name,
                        "title": f.title,
                        "appliesTo": sorted(f.applies_to),
                        "defaultRampSeconds": f.default_ramp_s,
                        "signature": f.signature,
                    }
                    for f in FAULTS.values()
                ],
            }
        )
        return
    table = Table(title="appliances", title_style="bold")
    for column in ("kind", "aliases", "every", "sensors"):
        table.add_column(column)
    for m in APPLIANCES.values():
        sensors = ", ".join(f"{s.name} ({s.unit})" for s in m.sensors)
        table.add_row(m.kind, ", ".join(m.aliases), f"{m.interval_s:g} s", sensors)
    console.print(table)
    faults = Table(title="fault modes", title_style="bold")
    for column in ("fault", "appliances", "default ramp", "what changes"):
        faults.add_column(column)
    for f in FAULTS.values():
        ramp = f"{f.default_ramp_s / 3600:g} h" if f.default_ramp_s else "step"
        faults.add_row(f.name, ", ".join(sorted(f.applies_to)), ramp, escape(f.signature))
    console.print(faults)
