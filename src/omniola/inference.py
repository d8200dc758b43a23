"""Loading a model for inference; where omniola keeps its models. Generation is `omniola.generation.Engine`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import InputError
from .modeling_ola import OlaForConditionalGeneration
from .processing_ola import OlaProcessor
from .weights import (
    GGUF_FORMATS,
    apply_weight_format,
    check_weight_format,
    default_weight_format,
    weight_format_of,
)

DEFAULT_HOME_ENV = "OMNIOLA_HOME"


def omniola_home() -> Path:
    """Where omniola keeps its models and data: `$OMNIOLA_HOME`, else `~/.cache/omniola`."""
    return Path(os.environ.get(DEFAULT_HOME_ENV) or Path.home() / ".cache" / "omniola")


def default_model_dir() -> Path:
    """The default model's directory: `<omniola home>/models/tiny` (trained by `recipes/tiny.yaml`)."""
    return omniola_home() / "models" / "tiny"


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    path: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    weights: str | None = None,
) -> tuple[OlaForConditionalGeneration, OlaProcessor]:
    """Loads an omniola checkpoint directory for inference.

    Args:
        path: An omniola model directory.
        device: `cpu`, `cuda`, `cuda:1`, ... (default: cuda if available).
        dtype: The dtype of the whole model at load (default: bf16 on GPU, float32 on CPU).
        weights: The LLM's weight format, one of `omniola.weights.WEIGHT_FORMATS` (`fp32`, `bf16`, `int8`, `int4`).
            Default: `default_weight_format(device)` (fp32 on a CPU, bf16 on a GPU) when `dtype` is not given
            either; with `dtype` alone the LLM stays in `dtype`. The encoders keep `dtype`.

    Raises:
        InputError: `path` is not a model directory.
        WeightFormatError: `weights` is unknown or cannot run on this machine with the installed packages.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not an omniola model directory (no config.json); build one with omniola build")
    dev = pick_device(device)
    if weights is None and dtype is None:
        weights = default_weight_format(dev)
    if weights is not None:
        check_weight_format(weights, dev)  # before the load: a format that cannot run fails fast
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = OlaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(dev).eval()
    processor = OlaProcessor.from_pretrained(path)
    if weights is not None:
        gguf = gguf_cache_path(path, weights.removeprefix("gguf-")) if weights in GGUF_FORMATS else None
        apply_weight_format(model, weights, gguf_path=gguf, tokenizer=processor.tokenizer)
    model.weight_format = weights or weight_format_of(model)
    return model, processor


def gguf_cache_path(model_dir: Path, quant: str) -> Path:
    """Where the `gguf-*` formats keep a checkpoint's exported LLM: `<omniola home>/gguf/<name>-<digest>.<quant>.gguf`,
    the digest covering the checkpoint's path, size and modification time (a retrained checkpoint gets a new file)."""
    import hashlib

    weights = sorted(model_dir.glob("*.safetensors"))
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in weights) or str(model_dir)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = omniola_home() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{model_dir.resolve().name}-{digest}.{quant}.gguf"
