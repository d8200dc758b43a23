"""`omniola experiment`: run a named experiment on the tiny world and write its report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import OmniolaError


def list_experiments() -> str:
    from .definitions import EXPERIMENTS

    lines = []
    for e in EXPERIMENTS.values():
        arms = ", ".join(f"{a.name} ({a.recipe})" for a in e.arms)
        lines.append(f"{e.name}\n  {e.title}\n  arms: {arms}\n  seeds: {e.default_seeds} | evaluated: "
                     f"{', '.join(e.kinds)}" + (f" | normalised to: {e.reference}" if e.reference else ""))
    return "\n".join(lines)


def experiment_command(
    name: Annotated[Optional[str], typer.Argument(help="The experiment (see --list).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the experiments and exit.")] = False,
    seeds: Annotated[Optional[int], typer.Option(
        min=1, help="Seeds per arm, 0..N-1 (default: the experiment's).")] = None,
    scale: Annotated[float, typer.Option(
        min=0.0, help="Multiplies the common step budget (arms keep equal totals).")] = 1.0,
    scales: Annotated[Optional[str], typer.Option(
        help="A budget sweep instead of one --scale: comma- or space-separated scales, e.g. '0.25,0.5,1' (runs "
             "already made at a scale are reused).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Test questions per evaluated kind.")] = 100,
    arms: Annotated[Optional[str], typer.Option(help="Comma-separated arms to run (default: all).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: <omniola home>/experiments/NAME).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Tiny world for training and evaluation (default: the recipes').")] = None,
    feature_cache: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: <omniola home>/"
                                                                "feature_cache, shared by runs).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Evaluation batch size.")] = 16,
    keep_stages: Annotated[bool, typer.Option(help="Keep every stage's model (default: only the final one).")] = False,
    report_only: Annotated[bool, typer.Option(help="Only rebuild the report from OUT/results/*.json.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
):
    """Train and evaluate an experiment's arms on the tiny world (resumable), then write OUT/report.md + figures."""
    if list_:
        typer.echo(list_experiments())
        return
    if name is None:
        raise typer.BadParameter("name an experiment (or --list)")
    from .runner import run_experiment

    sweep = None
    if scales is not None:
        try:
            sweep = [float(x) for x in scales.replace(",", " ").split()]
        except ValueError:
            raise typer.BadParameter(f"--scales takes numbers such as '0.25,0.5,1', got {scales!r}")
        if not sweep:
            raise typer.BadParameter("--scales is empty")

    def log(line: str) -> None:
        typer.secho(line, fg=typer.colors.CYAN, err=True)

    try:
        report = run_experiment(
            name, out, seeds=seeds, scale=scale, scales=sweep, limit=limit, data=data, feature_cache=feature_cache,
            arms=[a.strip() for a in arms.split(",") if a.strip()] if arms else None, batch_size=batch_size,
            keep_stages=keep_stages, report_only=report_only, progress=not quiet, log=log,
            command=shlex.join(["omniola", *sys.argv[1:]]),
        )
    except OmniolaError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    typer.echo(str(report))
