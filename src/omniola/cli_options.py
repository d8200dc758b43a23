"""Command-line options shared by several `omniola` commands, defined once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .weights import WEIGHT_FORMATS

WeightsOption = Annotated[
    Optional[str],
    typer.Option(
        "--weights",
        help=f"The LLM's weight format: {' | '.join(WEIGHT_FORMATS)} (default: bf16 on a CPU with native bfloat16 "
             "kernels and on GPUs, else fp32; int8/int4 need torchao: pip install 'omniola[quant]'). "
             "See benchmarks/README.md (bench_decode.py).",
    ),
]
