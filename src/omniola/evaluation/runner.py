"""Batched greedy generation over a task's samples, scoring, and the result files.

`evaluate(model, processor, task)` asks every valid sample in batches (left padding; a batch holds samples that
agree on `use_audio_in_video`), decodes greedily by default with a fixed seed, scores each answer and writes, when
`out` is given, `<task>.json` (scores, counts, settings, timing), `<task>.predictions.jsonl` (one line per
sample) and `<task>.md` (a Markdown table).

Outcomes per sample: `correct` / `wrong`; `unparsable` (a choice answer naming no option or several, or an empty
answer to an open question -- counted as not right in the score, and reported); `failed` (its media could not be
loaded or generation raised: excluded from the score, reported); `invalid` (the task file's row is malformed:
excluded, reported); `transcribed` for ASR. A batch that fails is retried sample by sample, so one bad file costs
only its own sample.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, OmniolaError
from .metrics import (
    circular_outcome,
    english_normalizer,
    exact_match,
    extract_choice,
    normalize_answer,
    word_error_rate,
)
from .tasks import Sample, Task, load_task

__all__ = ["evaluate", "generate_texts", "markdown_table", "write_results"]


# Errors that make one sample fail (bad media, a sample too long for the model) rather than the run.
SAMPLE_ERRORS = (OmniolaError, OSError, ValueError, RuntimeError)
MAX_LISTED_ISSUES = 20


def generate_texts(model, processor, inputs, *, max_new_tokens: int, temperature: float = 0.0) -> list[str]:
    """Generates answers for a prepared (left-padded) batch; greedy unless `temperature > 0`.

    Returns:
        The new text of each row, special tokens removed, stripped.
    """
    inputs = inputs.to(model.device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=1.0, top_k=None)
    else:  # drop sampling defaults a generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)  # (B, prompt + new)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]


def _answer(model, processor, items: list[tuple[Sample, list[dict]]], gen: dict) -> list[tuple[str | None, str | None]]:
    """`(prediction, error)` per item: the batch at once, or, if that raises, each item alone."""
    try:
        inputs = processor.apply_chat_template(
            [messages for _, messages in items], add_generation_prompt=True, padding_side="left",
            use_audio_in_video=items[0][0].use_audio_in_video,
        )
        return [(text, None) for text in generate_texts(model, processor, inputs, **gen)]
    except SAMPLE_ERRORS as err:
        if len(items) == 1:
            return [(None, f"{type(err).__name__}: {err}")]
        return [result for item in items for result in _answer(model, processor, [item], gen)]


def _batches(samples: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
    """Consecutive samples, at most `batch_size` each, that agree on `use_audio_in_video`."""
    batches: list[list[Sample]] = []
    for sample in samples:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].use_audio_in_video == sample.use_audio_in_video:
            last.append(sample)
        else:
            batches.append([sample])
    return batches


def _score(sample: Sample, prediction: str | None, error: str | None, normalizer) -> dict:
    record: dict[str, Any] = {"id": sample.id, "kind": sample.kind}
    if sample.group is not None:
        record.update(group=sample.group, rotation=sample.rotation)
    record.update(sample.info)
    record.update(reference=sample.reference, prediction=prediction)
    if sample.options is not None:
        record["options"] = sample.options
    if sample.error is not None:
        return {**record, "outcome": "invalid", "error": sample.error}
    if error is not None:
        return {**record, "outcome": "failed", "error": error}
    if sample.metric == "choice":
        parsed = extract_choice(prediction, sample.options)
        outcome = "unparsable" if parsed is None else "correct" if parsed == sample.reference else "wrong"
        return {**record, "parsed": parsed, "outcome": outcome}
    if sample.metric == "wer":
        return {**record, "outcome": "transcribed", "normalized_reference": normalizer(sample.reference),
                "normalized_prediction": normalizer(prediction)}
    if not normalize_answer(prediction):
        return {**record, "outcome": "unparsable"}
    return {**record, "outcome": "correct" if exact_match(prediction, sample.reference) else "wrong"}


def _accuracy(records: list[dict], metric: str, circular: bool) -> dict:
    if circular:  # one outcome per question, from all its rotations
        groups: dict[str, list[str]] = {}
        for r in records:
            groups.setdefault(r["group"], []).append(r["outcome"])
        outcomes = Counter(circular_outcome(g) for g in groups.values())
        unparsable_answers = sum(r["outcome"] == "unparsable" for r in records)
    else:
        outcomes = Counter(r["outcome"] for r in records)
        unparsable_answers = outcomes["unparsable"]
    total = sum(outcomes.values())
    evaluated = total - outcomes["failed"] - outcomes["invalid"]
    entry = {
        "metric": ("circular_accuracy" if circular else "accuracy") if metric == "choice" else metric,
        "score": outcomes["correct"] / evaluated if evaluated else None,
        "questions": total, "evaluated": evaluated, "correct": outcomes["correct"], "wrong": outcomes["wrong"],
        "unparsable": outcomes["unparsable"], "failed": outcomes["failed"], "invalid": outcomes["invalid"],
    }
    if circular:
        entry.update(answers=len(records), unparsable_answers=unparsable_answers)
    return entry


def _wer(records: list[dict]) -> dict:
    done = [r for r in records if r["outcome"] == "transcribed"]
    stats = word_error_rate([r["normalized_reference"] for r in done], [r["normalized_prediction"] for r in done])
    outcomes = Counter(r["outcome"] for r in records)
    return {"metric": "wer", "score": stats["wer"], "questions": len(records), "evaluated": len(done),
            "failed": outcomes["failed"], "invalid": outcomes["invalid"],
            **{k: stats[k] for k in ("reference_words", "substitutions", "deletions", "insertions", "hits")}}


def _scores(task: Task, samples: Sequence[Sample], records: list[dict]) -> dict[str, dict]:
    """Scores per kind, plus `overall` when the kinds share a metric (and the vanilla accuracy when circular)."""
    metric_of = {s.kind: s.metric for s in samples}
    kinds = list(dict.fromkeys(r["kind"] for r in records))

    def score(rs: list[dict], circular: bool) -> dict:
        metric = metric_of[rs[0]["kind"]]
        return _wer(rs) if metric == "wer" else _accuracy(rs, metric, circular)

    scores: dict[str, dict] = {}
    if not records:
        return scores
    same_metric = len({metric_of[k] for k in kinds}) == 1
    if same_metric and (len(kinds) > 1 or task.circular):
        scores["overall"] = score(records, task.circular)
        if task.circular:
            scores["overall (vanilla)"] = score([r for r in records if r.get("rotation", 0) == 0], False)
    if len(kinds) > 1 or "overall" not in scores:
        for kind in kinds:
            scores[kind] = score([r for r in records if r["kind"] == kind], task.circular)
    return scores


def evaluate(
    model,
    processor,
    task: str | Task,
    *,
    data: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    temperature: float = 0.0,
    out: str | Path | None = None,
    progress: bool = True,
    **task_options,
) -> dict:
    """Evaluates `model` on a task and returns its results (and writes them to `out` when given).

    Args:
        model: An `OlaForConditionalGeneration` in eval mode.
        processor: Its `OlaProcessor`.
        task: A task name (`tiny`, `mmbench`, `videomme`, `librispeech`, `audio_qa`) or a loaded `Task`.
        data: The task's file or folder (see `omniola.evaluation.tasks`).
        batch_size: Samples per generate call (left padding).
        max_new_tokens: Answer length limit (default: the task's: 32, or 256 for LibriSpeech).
        seed: Seeds torch, numpy and random before generating.
        temperature: 0 (default) decodes greedily.
        out: Folder for `<task>.json`, `<task>.predictions.jsonl` and `<task>.md`.
        progress: Show a tqdm progress bar.
        **task_options: The loader's options (`split`, `kinds`, `limit`, `circular`, `media`, `multi_turn`, ...).

    Returns:
        `{"task", "source", "model", "settings", "scores": {group: {...}}, "counts", "issues", "timing",
        "predictions": [...]}`; `files` too when written.

    Raises:
        ConfigError: unknown task or option, bad `batch_size`.
        InputError: the task's data file or folder is missing or unreadable as a whole (a bad row, a bad media
            file or a failed generation is counted in the results instead).
    """
    if isinstance(task, str):
        task = load_task(task, data, **task_options)
    elif task_options or data is not None:
        raise ConfigError("data and task options are for a task given by name, not a loaded Task")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    gen = {"max_new_tokens": max_new_tokens or task.max_new_tokens, "temperature": temperature}
    model_dir = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    normalizer, spelling = None, None
    if any(s.metric == "wer" for s in task.samples):
        normalizer = english_normalizer(model_dir)
        spelling = bool(getattr(getattr(normalizer, "standardize_spellings", None), "mapping", None))

    valid = [s for s in task.samples if s.error is None]
    answers: dict[int, tuple[str | None, str | None]] = {}
    start = time.perf_counter()
    with tqdm(total=len(valid), desc=task.name, unit="sample", disable=not progress) as bar:
        for batch in _batches(valid, batch_size):
            items, results = [], {}
            for sample in batch:
                try:
                    items.append((sample, sample.get_messages()))
                except SAMPLE_ERRORS as err:  # embedded media that does not decode
                    results[id(sample)] = (None, f"{type(err).__name__}: {err}")
            if items:
                for (sample, _), result in zip(items, _answer(model, processor, items, gen)):
                    results[id(sample)] = result
            answers.update(results)
            bar.update(len(batch))
    generate_s = time.perf_counter() - start

    records = [_score(s, *answers.get(id(s), (None, None)), normalizer) for s in task.samples]
    counts = Counter(r["outcome"] for r in records)
    problems = Counter(r["error"] for r in records if r.get("error"))
    issues = list(task.issues) + [reason for reason, _ in problems.most_common(MAX_LISTED_ISSUES)]
    if len(problems) > MAX_LISTED_ISSUES:
        issues.append(f"... and {len(problems) - MAX_LISTED_ISSUES} more distinct problems (see the predictions)")
    generated = len(valid) - counts["failed"]
    result = {
        "task": task.name,
        "source": task.source,
        "model": model_dir,
        "settings": {**task.settings, "batch_size": batch_size, **gen, "seed": seed,
                     "decoding": "greedy" if temperature <= 0 else "sampling",
                     **({"wer_normalizer": "whisper_english" + ("" if spelling else " (no spelling map)")}
                        if normalizer else {})},
        "scores": _scores(task, task.samples, records),
        "counts": {"samples": len(records), "generated": generated, "unparsable": counts["unparsable"],
                   "failed": counts["failed"], "invalid": counts["invalid"]},
        "issues": issues,
        "timing": {"generate_s": round(generate_s, 3),
                   "seconds_per_sample": round(generate_s / len(valid), 4) if valid else None},
        "predictions": records,
    }
    if out is not None:
        result["files"] = write_results(result, out)
    return result


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def markdown_table(results: Sequence[dict]) -> str:
    """One row per task and score group: the score (in %), how many were evaluated, and what went wrong."""
    lines = ["| task | group | metric | score (%) | evaluated / questions | unparsable | failed | invalid |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for result in results:
        for group, s in result["scores"].items():
            lines.append(f"| {result['task']} | {group} | {s['metric']} | {_percent(s['score'])} | "
                         f"{s['evaluated']} / {s['questions']} | {s.get('unparsable', 0)} | {s['failed']} | "
                         f"{s['invalid']} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out: str | Path) -> dict[str, str]:
    """Writes `<task>.json` (without the predictions), `<task>.predictions.jsonl` and `<task>.md` into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = result["task"]
    files = {"results": out / f"{name}.json", "predictions": out / f"{name}.predictions.jsonl",
             "table": out / f"{name}.md"}
    with open(files["predictions"], "w", encoding="utf-8") as f:
        for record in result["predictions"]:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("predictions", "files")}
    summary["files"] = {k: str(v) for k, v in files.items()}
    files["results"].write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    files["table"].write_text(f"# {name}\n\n{markdown_table([result])}", encoding="utf-8")
    return summary["files"]
