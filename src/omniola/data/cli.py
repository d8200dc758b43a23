"""`omniola data ...`: training-data commands.

Registered in `omniola.cli` with `app.add_typer(data_app, name="data")`.
"""

from __future__ import annotations

import logging
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import OmniolaError

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Training data: build the tiny omni world.",
)


class TinyScale(str, Enum):
    small = "small"
    full = "full"


@data_app.callback()
def _data() -> None:
    """Training data: build the tiny omni world (Ola-format records with real media)."""


@data_app.command()
def tiny(
    out: Annotated[Path, typer.Option(help="Output folder (a partial build there is resumed).")],
    seed: Annotated[int, typer.Option(help="Everything is a deterministic function of the seed.")] = 0,
    scale: Annotated[TinyScale, typer.Option(help="small: ~40 records in seconds; full: ~17k records.")] = (
        TinyScale.small
    ),
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering media (same output for any number).")] = 1,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Build the tiny omni world: easy-VQA images, TTS speech, sounds and narrated videos, in Ola's format."""
    from .tiny_world import KINDS, SPLITS, build_tiny_world

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            manifest = build_tiny_world(out, seed=seed, scale=scale.value, workers=workers, progress=not quiet)
        except OmniolaError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from err
    for w in caught:
        typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    elapsed = time.perf_counter() - started
    width = max(len(k) for k in KINDS)
    typer.echo(f"{'kind':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
    for kind in KINDS:
        typer.echo(f"{kind:<{width}}  " + "  ".join(f"{manifest['counts'][s][kind]:>6}" for s in SPLITS))
    typer.echo(f"{'total':<{width}}  " + "  ".join(f"{manifest['totals'][s]:>6}" for s in SPLITS))
    typer.echo(f"{manifest['totals']['all']} records, {sum(manifest['media'].values())} media files in {out} "
               f"({elapsed:.1f} s, seed {seed}, scale {scale.value})")
