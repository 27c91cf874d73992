"""`clipjob ckpt ...`: inspect and convert checkpoints."""

from __future__ import annotations

import typer

ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect and convert checkpoints.")
