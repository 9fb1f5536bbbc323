"""``splitcem defenses | configs | attacks``: what is registered and bundled."""

from __future__ import annotations

import typer

from splitcem.cli import app


@app.command()
def defenses() -> None:
    """List the registered defenses, one line each."""
    from splitcem.defenses import DEFENSES

    for name in DEFENSES.names():
        typer.echo(f"{name:>12}  {DEFENSES.doc(name)}")
    for name, why in DEFENSES.failed_plugins().items():
        typer.echo(f"{name:>12}  (not loaded) {why}")


@app.command()
def configs() -> None:
    """List the bundled run configs: `splitcem run NAME` runs one."""
    from splitcem.config import bundled_configs, config_summary

    for name, path in bundled_configs().items():
        typer.echo(f"{name:<28}  {config_summary(path)}")


@app.command()
def attacks() -> None:
    """List the registered attacks, one line each."""
    from splitcem.attacks import ATTACKS

    for name in ATTACKS.names():
        typer.echo(f"{name:>12}  {ATTACKS.doc(name)}")
    for name, why in ATTACKS.failed_plugins().items():
        typer.echo(f"{name:>12}  (not loaded) {why}")
