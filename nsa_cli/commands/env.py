"""`nsa env`: python, torch, triton, CUDA, GPU, and whether kernels can run here."""

from __future__ import annotations

import typer
from rich.table import Table

from nsa_cli.support.common import cli_errors, console, print_json
from nsa_cli.support.environment import environment_report


@cli_errors
def env(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the versions and whether the Triton kernels can run here."""
    report = environment_report()
    if as_json:
        print_json(report)
        return
    table = Table(title="nsa env")
    table.add_column("what")
    table.add_column("value")
    for key, value in report.items():
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)
