"""Typer sub-apps, one module per command group; `clipjob.cli` mounts them."""
