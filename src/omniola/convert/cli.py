"""`omniola convert ...`: checkpoints of other implementations -> omniola checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import OmniolaError

convert_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Convert checkpoints of other implementations into omniola checkpoints.",
)


@convert_app.command("ola")
def ola(
    src: Annotated[Path, typer.Argument(help="Original Ola checkpoint directory (e.g. a THUdyh/Ola-7b download).")],
    out: Annotated[Path, typer.Argument(help="omniola checkpoint directory to create.")],
    whisper: Annotated[Optional[Path], typer.Option(
        help="openai-whisper large-v3.pt (default: config.json speech_encoder, also looked up next to SRC).")] = None,
    beats: Annotated[Optional[Path], typer.Option(
        help="BEATs checkpoint (default: config.json music_encoder, also looked up next to SRC).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Directory with the Qwen2 tokenizer, when SRC has none.")] = None,
    no_tokenizer: Annotated[bool, typer.Option(
        "--no-tokenizer", help="Write the model without tokenizer files (SRC has none, e.g. a test fixture).")] = False,
    vision_heads: Annotated[Optional[int], typer.Option(
        min=1, help="Vision tower attention heads (default 16: SigLIP so400m, as the original hard-codes).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (keep the checkpoint's) | float32 | bfloat16 | float16")] = "auto",
    max_shard_gb: Annotated[float, typer.Option(
        min=1e-4, help="Largest output shard in GiB (about the conversion's peak memory).")] = 2.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
):
    """Convert an original Ola checkpoint (config.json model_type ola_qwen + safetensors) for omniola."""
    from .ola import convert_ola_checkpoint

    try:
        convert_ola_checkpoint(
            src, out, whisper=whisper, beats=beats, tokenizer=tokenizer, no_tokenizer=no_tokenizer,
            vision_heads=vision_heads, dtype=dtype, max_shard_bytes=int(max_shard_gb * 1024**3),
            overwrite=overwrite, log=lambda line: typer.echo(line, err=True),
        )
    except OmniolaError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


@convert_app.command("gguf")
def gguf(
    model: Annotated[Path, typer.Argument(help="An omniola model directory.")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    quant: Annotated[str, typer.Option(help="q8_0 | f16 | f32 (the matrices; norms stay f32).")] = "q8_0",
):
    """Export the model's language model to GGUF for llama.cpp (the media encoders stay in the omniola checkpoint;
    `--weights gguf-q8_0` runs a model this way, handing llama.cpp the prompt as embeddings)."""
    from ..inference import load_model
    from .gguf_export import export_gguf

    try:
        ola, processor = load_model(model, device="cpu", weights="fp32")
        path = export_gguf(ola, processor.tokenizer, out, quant=quant)
    except OmniolaError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {quant})")
