"""Command-line options shared by several `omniola` commands, defined once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .weights import WEIGHT_FORMATS

WeightsOption = Annotated[
    Optional[str],
    typer.Option(
        "--weights",
        help=f"The LLM's weight format: {' | '.join(WEIGHT_FORMATS)} (default: fp32 on a CPU, bf16 on a GPU; bf16 "
             "changes some answers; int8/int4 need torchao: pip install 'omniola[quant]'; gguf-* run the LLM in "
             "llama.cpp: pip install 'omniola[llamacpp]', gguf-f16 keeps the answers at ~2x fp32's speed; gguf-lora "
             "runs the GGUF the LLM was built from with the fine-tuning as a LoRA adapter). "
             "See benchmarks/README.md (bench_decode.py).",
    ),
]
