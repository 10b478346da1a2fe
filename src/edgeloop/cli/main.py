"""`edgeloop`: the command line of the hub runtime and of the cloud."""

from __future__ import annotations

import typer

from edgeloop import __version__
from edgeloop.cli.bench import app as bench_app
from edgeloop.cli.cloud import app as cloud_app
from edgeloop.cli.cloud_deployment import deployment_app
from edgeloop.cli.cloud_lake import lake_app
from edgeloop.cli.cloud_ml import ml_app
from edgeloop.cli.device import app as device_app
from edgeloop.cli.sim import app as sim_app

app = typer.Typer(
    name="edgeloop",
    help="The edge-ML loop of an appliance-monitoring product, self-hosted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(device_app, name="device")
app.add_typer(cloud_app, name="cloud")
app.add_typer(bench_app, name="bench")
app.add_typer(sim_app, name="sim")
cloud_app.add_typer(deployment_app, name="deployment")
cloud_app.add_typer(lake_app, name="lake")
cloud_app.add_typer(ml_app, name="ml")


@app.command()
def version() -> None:
    """Print edgeloop's version."""
    typer.echo(__version__)


@app.command()
def demo(
    seconds: float = typer.Option(20.0, help="How long to show the hub."),
    keep: bool = typer.Option(False, help="Leave the hub running afterwards."),
) -> None:
    """Run a hub with example components and show their states live."""
    from rich.console import Console

    from edgeloop.demo import run

    raise typer.Exit(run(seconds, keep, Console()))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
