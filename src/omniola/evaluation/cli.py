"""`omniola eval`: evaluate a model on a task and write its results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import OmniolaError


def eval_command(
    task: Annotated[str, typer.Option(help="tiny | mmbench | videomme | librispeech | audio_qa")],
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the default model).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="The task's file or folder (tiny: a tiny-world directory, default $OMNIOLA_HOME/data/tiny).")] = None,
    media: Annotated[Optional[Path], typer.Option(
        help="videomme / audio_qa: folder of the media files (default: next to the data file).")] = None,
    split: Annotated[Optional[str], typer.Option(help="tiny: test | val (default test).")] = None,
    kinds: Annotated[Optional[str], typer.Option(
        help="tiny: comma-separated kinds (default: every QA kind and asr; add caption to score captions).")] = None,
    multi_turn: Annotated[Optional[str], typer.Option(
        help="tiny: later turns of a conversation asked after the ground-truth turns (context) or alone.")] = None,
    circular: Annotated[Optional[bool], typer.Option(
        "--circular/--no-circular", help="mmbench: circular evaluation (default on).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="First N questions of each kind / group.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per generate call.")] = 8,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="Default: the task's.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (default).")] = 0.0,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: cuda if available)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for <task>.json, <task>.predictions.jsonl, <task>.md.")] = Path(
        "eval_results"
    ),
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Evaluate a model on a benchmark (MMBench, VideoMME, LibriSpeech, audio QA or the tiny omni world)."""
    from ..inference import load_model
    from .runner import evaluate, markdown_table
    from .tasks import load_task

    try:
        loaded = load_task(
            task, data, split=split, kinds=[k.strip() for k in kinds.split(",") if k.strip()] if kinds else None,
            multi_turn=multi_turn, circular=circular, media=media, limit=limit,
        )
        if model is None:
            from ..cli import ensure_default_model

            model = ensure_default_model()
        ola, processor = load_model(model, device=device)
        result = evaluate(ola, processor, loaded, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
                          temperature=temperature, out=out, progress=not quiet)
    except OmniolaError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    typer.echo(markdown_table([result]), nl=False)
    counts, timing = result["counts"], result["timing"]
    per = timing["seconds_per_sample"]
    typer.secho(
        f"[{counts['samples']} samples: {counts['generated']} generated, {counts['unparsable']} unparsable, "
        f"{counts['failed']} failed, {counts['invalid']} invalid | {timing['generate_s']:.1f}s"
        + (f", {per:.2f}s/sample" if per is not None else "") + f" | {result['files']['results']}]",
        fg=typer.colors.BRIGHT_BLACK, err=True,
    )
    for issue in result["issues"][:5]:
        typer.secho(f"  {issue}", fg=typer.colors.YELLOW, err=True)
