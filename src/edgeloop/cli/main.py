"""`edgeloop`: the command line of the hub runtime and, later, the cloud."""

from __future__ import annotations

import typer

from edgeloop import __version__
from edgeloop.cli.device import app as device_app

app = typer.Typer(
    name="edgeloop",
    help="The edge-ML loop of an appliance-monitoring product, self-hosted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(device_app, name="device")


@app.command()
def version() -> None:
    """Print edgeloop's version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
