"""`omniola eval`: evaluate a model on a task and write its results."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cli_options import WeightsOption
from ..errors import OmniolaError


def eval_command(
    task: Annotated[Optional[str], typer.Option(help="tiny | mmbench | videomme | librispeech | audio_qa")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the default model).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="The task's file or folder (tiny: a tiny-world directory, default $OMNIOLA_HOME/data/tiny).")] = None,
    media: Annotated[Optional[Path], typer.Option(
        help="videomme / audio_qa: folder of the media files (default: next to the data file).")] = None,
    split: Annotated[Optional[str], typer.Option(
        help="tiny: test | val | oot, one split only (default: test, and out-of-template oot beside it when the "
             "world has it).")] = None,
    kinds: Annotated[Optional[str], typer.Option(
        help="tiny: comma-separated kinds (default: every QA kind and asr; add caption to score captions).")] = None,
    multi_turn: Annotated[Optional[str], typer.Option(
        help="tiny: later turns of a conversation asked after the ground-truth turns (context) or alone.")] = None,
    modality_removal: Annotated[Optional[bool], typer.Option(
        "--modality-removal/--no-modality-removal",
        help="tiny: also ask every video + audio question without its audio and without its frames, scored apart "
             "(default on when a video + audio kind is evaluated).")] = None,
    video_audio: Annotated[Optional[str], typer.Option(
        help="tiny: a video + audio question's sound: the record's audio file at its <speech> marker (markers, as "
             "training reads it by default) or the video's own sound track, placed where the model's processor "
             "puts it (sound_track; what a model with video_sound_track=interleaved was trained on).")] = None,
    circular: Annotated[Optional[bool], typer.Option(
        "--circular/--no-circular", help="mmbench: circular evaluation (default on).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="First N questions of each kind / group.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions decoded together.")] = 8,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="Default: the task's.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (default).")] = 0.0,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: cuda if available)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for <task>.json, <task>.predictions.jsonl, <task>.md.")] = Path(
        "eval_results"
    ),
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    anchor: Annotated[Optional[bool], typer.Option(
        "--anchor/--no-anchor",
        help="Tasks with ASR: also transcribe the clips with Whisper's own decoder (CTranslate2, beam 5) and report "
             "its WER and model WER / anchor WER (default on; skipped with a warning if it cannot be loaded, "
             "unless asked for).")] = None,
    anchor_model: Annotated[Optional[str], typer.Option(
        help="The anchor: whisper-tiny.en (default, offline) or a CTranslate2 Whisper directory.")] = None,
    lmms_eval: Annotated[Optional[str], typer.Option(
        "--lmms-eval", help="Instead of --task: comma-separated lmms-eval tasks, run by lmms-eval.")] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option(
        help="--lmms-eval: a folder of extra lmms-eval task YAML files (repeatable).")] = None,
    weights: WeightsOption = None,
):
    """Evaluate a model on a benchmark (MMBench, VideoMME, LibriSpeech, audio QA or the tiny omni world), or on
    lmms-eval tasks with --lmms-eval."""
    if (task is None) == (lmms_eval is None):
        typer.secho("error: give either --task or --lmms-eval", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    if lmms_eval is not None:  # options of the other mode are mistakes, not silently ignored
        other = {"--data": data, "--media": media, "--split": split, "--kinds": kinds, "--multi-turn": multi_turn,
                 "--modality-removal": modality_removal, "--video-audio": video_audio, "--circular": circular,
                 "--temperature": temperature or None, "--anchor": anchor, "--anchor-model": anchor_model,
                 "--weights": weights}  # lmms-eval's model_args take dtype=
    else:
        other = {"--include-path": include_path}
    given = [name for name, value in other.items() if value is not None]
    if given:
        typer.secho(f"error: {', '.join(given)}: not used with {'--lmms-eval' if lmms_eval else '--task'}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    if lmms_eval is not None:
        _run_lmms_eval(lmms_eval, include_path or [], model=model, limit=limit, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, seed=seed, device=device, out=out, quiet=quiet)
        return
    if anchor is False and anchor_model is not None:
        typer.secho("error: --anchor-model: not used with --no-anchor", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    from ..inference import load_model
    from .runner import evaluate, markdown_table
    from .tasks import load_task

    try:
        loaded = load_task(
            task, data, split=split, kinds=[k.strip() for k in kinds.split(",") if k.strip()] if kinds else None,
            multi_turn=multi_turn, modality_removal=modality_removal, video_audio=video_audio, circular=circular,
            media=media, limit=limit,
        )
        if model is None:
            from ..cli import ensure_default_model

            model = ensure_default_model()
        ola, processor = load_model(model, device=device, weights=weights)
        specialist = _load_anchor(loaded, anchor, anchor_model, ola, batch_size)
        result = evaluate(ola, processor, loaded, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
                          temperature=temperature, out=out, progress=not quiet, anchor=specialist)
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


def _load_anchor(task, anchor: bool | None, anchor_model: str | None, model, batch_size: int):
    """The Whisper anchor for a task with ASR samples, unless `--no-anchor`. When it was not asked for by name
    (`--anchor` / `--anchor-model`) and cannot be loaded, the run goes on without it, with a warning."""
    from ..errors import ComponentNotFoundError
    from .anchor import DEFAULT_ANCHOR, WhisperAnchor, model_device

    if anchor is False or not any(s.metric == "wer" and s.error is None for s in task.samples):
        return None
    try:
        return WhisperAnchor(anchor_model or DEFAULT_ANCHOR, device=model_device(model), batch_size=batch_size)
    except ComponentNotFoundError as err:
        if anchor or anchor_model is not None:
            raise
        typer.secho(f"warning: no Whisper anchor ({err}); --no-anchor silences this", fg=typer.colors.YELLOW,
                    err=True)
        return None


def _run_lmms_eval(tasks: str, include_path: list[Path], *, model: Path | None, limit: int | None, batch_size: int,
                   max_new_tokens: int | None, seed: int, device: str | None, out: Path, quiet: bool) -> None:
    """`omniola eval --lmms-eval TASKS`: lmms-eval's `simple_evaluate` on the omniola model; prints its table."""
    try:
        from lmms_eval.utils import make_table

        from .lmms_eval_adapter import run_lmms_eval
    except ImportError as err:
        typer.secho(f"error: --lmms-eval needs lmms-eval ({err}); install it with: pip install 'omniola[lmms]' && "
                    "pip install --no-deps lmms_eval==0.7.3", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    try:
        if model is None:
            from ..cli import ensure_default_model

            model = ensure_default_model()
        results = run_lmms_eval([t.strip() for t in tasks.split(",") if t.strip()], model=model,
                                include_path=include_path, limit=limit, batch_size=batch_size,
                                max_new_tokens=max_new_tokens or 256, device=device, out=out, seed=seed,
                                progress=not quiet)
    except OmniolaError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    typer.echo(make_table(results))
    if "groups" in results:
        typer.echo(make_table(results, "groups"))
    counts = ", ".join(f"{name}: {n['effective']}" for name, n in results.get("n-samples", {}).items())
    typer.secho(f"[lmms-eval {version('lmms_eval')} | documents {counts} | {results['files']['results']}]",
                fg=typer.colors.BRIGHT_BLACK, err=True)
