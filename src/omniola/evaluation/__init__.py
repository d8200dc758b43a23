"""Evaluation harness: benchmarks in their communities' layouts, scored as those communities score them.

`evaluate(model, processor, "tiny")` or `omniola eval --model DIR --task tiny`; see `docs/evaluation.md`.
"""

from .anchor import SpeechAnchor, WhisperAnchor
from .metrics import (
    circular_outcome,
    english_normalizer,
    exact_match,
    extract_choice,
    normalize_answer,
    rotate_options,
    word_error_rate,
)
from .runner import evaluate, generate_texts, markdown_table, write_results
from .tasks import TASKS, Sample, Task, load_task

__all__ = [
    "TASKS",
    "Sample",
    "SpeechAnchor",
    "Task",
    "WhisperAnchor",
    "circular_outcome",
    "english_normalizer",
    "evaluate",
    "exact_match",
    "extract_choice",
    "generate_texts",
    "load_task",
    "markdown_table",
    "normalize_answer",
    "rotate_options",
    "word_error_rate",
    "write_results",
]
