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
    scale: Annotated[TinyScale, typer.Option(help="small: 95 records in seconds; full: ~35k records.")] = (
        TinyScale.small
    ),
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering media (same output for any number).")] = 1,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Build the tiny omni world: easy-VQA images, drawn pictures, TTS speech, sounds and narrated videos, in Ola's
    format, with an out-of-template test split (oot)."""
    from .tiny_world import SPLIT_KINDS, SPLITS, build_tiny_world

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
    kinds = list(dict.fromkeys(k for split in SPLITS for k in SPLIT_KINDS[split]))
    width = max(len(k) for k in kinds)
    typer.echo(f"{'kind':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
    for kind in kinds:
        typer.echo(f"{kind:<{width}}  " + "  ".join(f"{manifest['counts'][s].get(kind, '-'):>6}" for s in SPLITS))
    typer.echo(f"{'total':<{width}}  " + "  ".join(f"{manifest['totals'][s]:>6}" for s in SPLITS))
    typer.echo(f"{manifest['totals']['all']} records, {sum(manifest['media'].values())} media files in {out} "
               f"({elapsed:.1f} s, seed {seed}, scale {scale.value})")


@data_app.command()
def crossmodal(
    videos: Annotated[Path, typer.Option(help="Folder of videos (mp4/mkv/webm/mov) and sibling .srt/.vtt files.")],
    out: Annotated[Path, typer.Option(help="Output: crossmodal.json, crossmodal_report.json, cache/ (resumed).")],
    api_base: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint (http://host:8000/v1).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name sent to --api-base.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    local_model: Annotated[Path | None, typer.Option(help="Local omniola model dir as generator.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file replacing crossmodal_prompts.txt.")] = None,
    frames: Annotated[int, typer.Option(min=1, help="Frames sampled per video (timestamps go in the prompt).")] = 8,
    questions_per_video: Annotated[int, typer.Option(min=1, help="QA pairs asked for (kept at most) per video.")] = 3,
    transcriber: Annotated[str, typer.Option(help="For videos without subtitles: 'none' (skip them), or a local "
                                                  "Whisper model dir / cached id such as whisper-tiny.en.")] = "none",
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature of --api-base.")] = 0.7,
):
    """Ola's cross-modal QA: ask an LLM for questions that need both a video's frames and its sound track."""
    import os

    from .crossmodal import LocalModelGenerator, OpenAIGenerator, build_crossmodal, load_prompts, make_transcriber

    try:
        if (api_base is None) == (local_model is None):
            raise typer.BadParameter("give either --api-base with --model, or --local-model")
        if local_model is not None:
            generator = LocalModelGenerator(local_model)
        else:
            if not model:
                raise typer.BadParameter("--api-base needs --model")
            generator = OpenAIGenerator(api_base, model, api_key=os.environ.get(api_key_env), temperature=temperature)
        report = build_crossmodal(videos, out, generator=generator, prompts=load_prompts(prompts),
                                  transcriber=make_transcriber(transcriber), num_frames=frames,
                                  questions_per_video=questions_per_video)
    except OmniolaError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from err
    summary = report.to_dict()
    typer.echo(f"{summary['records']} records from {summary['videos_with_records']}/{summary['videos']} videos "
               f"({summary['videos_resumed']} resumed) -> {out / 'crossmodal.json'}")
    for title in ("skipped_videos", "dropped"):
        if summary[title]:
            typer.echo(f"{title}: " + ", ".join(f"{k}={v}" for k, v in summary[title].items()))
