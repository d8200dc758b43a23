"""Generation over a task's samples, scoring, and the result files.

`evaluate(model, processor, task)` asks every valid sample through the generation engine (`omniola.generation`,
`batch_size` questions decoded together), decodes greedily by default (sampling with a fixed seed), scores
each answer and writes, when `out` is given, `<task>.json` (scores, counts, settings, timing),
`<task>.predictions.jsonl` (one line per sample) and `<task>.md` (a Markdown table).

A task whose samples carry a `split` (the tiny world: in-template `test` and out-of-template `oot`) is scored per
split: `splits` holds each split's scores and counts, `scores` the first split's (what a single-split run
returns), and the Markdown table puts the splits side by side, one row per kind.

The tiny world's modality-removal control (samples with `removed` set: a video + audio question asked without its
audio or without its frames) is scored apart: `modality_removal` holds, per video + audio kind, the score with both
modalities (the kind's own score), `no_audio`, `no_video` and `chance`; those samples never count in `scores`, and
the Markdown tables add a row for each below the kind's row.

Samples that carry a `template` (the tiny world's question templates: a clip's `name` / `move_beeps` /
`change_tone`, a sound's `count` / `pitch` / `kind`) are also scored per template (`by_template`, and a second
Markdown table with each template's most common answer): a kind's score can hide a template the model answers with
one constant, as it did for counting beeps.

With an `anchor` (a specialist recogniser, :mod:`omniola.evaluation.anchor`), every ASR sample is also transcribed
by it; each WER group then reports `anchor_wer` (same normaliser, same corpus WER, same clips) and
`wer_ratio` = model WER / anchor WER, and the anchor's transcript goes into the predictions.

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

from ..errors import ConfigError, InputError, OmniolaError
from ..generation import Engine, GenerationOptions
from .anchor import SpeechAnchor, model_device, resolve_anchor
from .metrics import (
    circular_outcome,
    english_normalizer,
    exact_match,
    extract_choice,
    normalize_answer,
    word_error_rate,
)
from .tasks import REMOVABLE, Sample, Task, load_task

__all__ = ["evaluate", "generate_texts", "markdown_table", "write_results"]


# Errors that make one sample fail (bad media, a sample too long for the model) rather than the run.
SAMPLE_ERRORS = (OmniolaError, OSError, ValueError, RuntimeError)
IN_FLIGHT = 4  # batches of requests handed to the engine at once: it decodes `batch_size` of them together
MAX_LISTED_ISSUES = 20


def generate_texts(engine: Engine, inputs: list, options: GenerationOptions) -> list[str | Exception]:
    """Answers prepared conversations (one `OlaProcessor` output each) through the generation engine, decoded
    together in its batch.

    Returns:
        Per conversation, the new text (special tokens removed, stripped), or the error its request raised.
    """
    requests = [engine.submit(x, options) for x in inputs]
    answers: list[str | Exception] = []
    for request in requests:
        try:
            answers.append(request.result().text.strip())
        except SAMPLE_ERRORS as err:
            answers.append(err)
    return answers


def _answer(engine: Engine, processor, items: list[tuple[Sample, list[dict]]], options: GenerationOptions
            ) -> list[tuple[str | None, str | None]]:
    """`(prediction, error)` per item; an item whose media cannot be prepared fails alone."""
    prepared: list = []
    for sample, messages in items:
        try:
            prepared.append(processor.apply_chat_template([messages], add_generation_prompt=True,
                                                          use_audio_in_video=sample.use_audio_in_video))
        except SAMPLE_ERRORS as err:
            prepared.append(err)
    texts = iter(generate_texts(engine, [x for x in prepared if not isinstance(x, Exception)], options))
    results = []
    for x in prepared:
        answer = x if isinstance(x, Exception) else next(texts)
        results.append((None, f"{type(answer).__name__}: {answer}") if isinstance(answer, Exception)
                       else (answer, None))
    return results


def _score(sample: Sample, prediction: str | None, error: str | None, normalizer,
           anchored: tuple[str | None, str | None] | None = None) -> dict:
    record: dict[str, Any] = {"id": sample.id}
    if sample.split is not None:
        record["split"] = sample.split
    record["kind"] = sample.kind
    if sample.removed is not None:
        record["removed"] = sample.removed
    if sample.group is not None:
        record.update(group=sample.group, rotation=sample.rotation)
    record.update(sample.info)
    record.update(reference=sample.reference, prediction=prediction)
    if sample.options is not None:
        record["options"] = sample.options
    if anchored is not None:  # the anchor's transcript of the same clip
        text, anchor_error = anchored
        if anchor_error is None:
            record.update(anchor_prediction=text, anchor_normalized_prediction=normalizer(text))
        else:
            record.update(anchor_prediction=None, anchor_error=anchor_error)
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


WER_COUNTS = ("reference_words", "substitutions", "deletions", "insertions", "hits")


def _wer(records: list[dict], anchor: dict | None = None) -> dict:
    done = [r for r in records if r["outcome"] == "transcribed"]
    stats = word_error_rate([r["normalized_reference"] for r in done], [r["normalized_prediction"] for r in done])
    outcomes = Counter(r["outcome"] for r in records)
    entry = {"metric": "wer", "score": stats["wer"], "questions": len(records), "evaluated": len(done),
             "failed": outcomes["failed"], "invalid": outcomes["invalid"], **{k: stats[k] for k in WER_COUNTS}}
    if anchor is not None:
        entry.update(_anchor_wer(done, anchor))
    return entry


def _anchor_wer(done: list[dict], anchor: dict) -> dict:
    """The anchor's corpus WER on the clips the model transcribed (those it transcribed too), and the ratio.

    `wer_ratio` = model WER / anchor WER on the same clips: `None` when the anchor's WER is 0 and the model's is
    not (1.0 when both are 0). When the anchor failed on some clips, the ratio uses the model's WER on the others,
    given as `matched_wer`.
    """
    both = [r for r in done if r.get("anchor_normalized_prediction") is not None]
    refs = [r["normalized_reference"] for r in both]
    theirs = word_error_rate(refs, [r["anchor_normalized_prediction"] for r in both])
    ours = word_error_rate(refs, [r["normalized_prediction"] for r in both])
    if ours["wer"] is None or theirs["wer"] is None:
        ratio = None
    elif theirs["wer"] == 0:
        ratio = 1.0 if ours["wer"] == 0 else None
    else:
        ratio = ours["wer"] / theirs["wer"]
    entry = {"anchor": anchor, "anchor_wer": theirs["wer"], "wer_ratio": ratio, "anchor_evaluated": len(both),
             "anchor_failed": len(done) - len(both), "anchor_counts": {k: theirs[k] for k in WER_COUNTS}}
    if len(both) < len(done):
        entry["matched_wer"] = ours["wer"]
    return entry


def _scores(task: Task, samples: Sequence[Sample], records: list[dict], anchor: dict | None = None
            ) -> dict[str, dict]:
    """Scores per kind, plus `overall` when the kinds share a metric (and the vanilla accuracy when circular).
    Modality-removal copies (`removed`) are left out: :func:`_modality_removal` scores them."""
    metric_of = {s.kind: s.metric for s in samples}
    records = [r for r in records if "removed" not in r]
    kinds = list(dict.fromkeys(r["kind"] for r in records))

    def score(rs: list[dict], circular: bool) -> dict:
        metric = metric_of[rs[0]["kind"]]
        return _wer(rs, anchor) if metric == "wer" else _accuracy(rs, metric, circular)

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


def _chance(records: list[dict]) -> float | None:
    """The score of always giving the most common reference answer of each question's template (the tiny world's
    `meta.template`: `name`, `move_beeps`, `change_tone`; the whole group without one), over the questions
    answered: what the answer prior alone gets, with neither modality. Measured on these very questions, so a
    little optimistic for a handful of them."""
    answered = [r for r in records if r["outcome"] in ("correct", "wrong", "unparsable")]
    if not answered:
        return None
    answers: dict[Any, Counter] = {}
    for r in answered:
        answers.setdefault(r.get("template"), Counter())[normalize_answer(str(r["reference"]))] += 1
    return sum(c.most_common(1)[0][1] for c in answers.values()) / len(answered)


def _modality_removal(records: list[dict]) -> dict[str, dict]:
    """The modality-removal control of each kind that has one: `both` (the kind's own score), `no_audio`,
    `no_video` (exact-match accuracy entries, like the tiny world's video kinds) and `chance` (:func:`_chance`)."""
    control: dict[str, dict] = {}
    for kind in dict.fromkeys(r["kind"] for r in records if "removed" in r):
        of_kind = [r for r in records if r["kind"] == kind]
        normal = [r for r in of_kind if "removed" not in r]
        control[kind] = {"both": _accuracy(normal, "exact_match", False),
                         **{f"no_{m}": _accuracy([r for r in of_kind if r.get("removed") == m], "exact_match", False)
                            for m in REMOVABLE},
                         "chance": _chance(normal)}
    return control


def _by_template(records: list[dict]) -> dict[str, dict[str, dict]]:
    """Exact-match accuracy per kind and question template (records with a `template`; the modality-removal copies
    left out), each with `top_answer`: the most common prediction and its share of the answers."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        if "template" in r and "removed" not in r and r["outcome"] != "transcribed":
            groups.setdefault(r["kind"], {}).setdefault(r["template"], []).append(r)
    result: dict[str, dict[str, dict]] = {}
    for kind, templates in groups.items():
        for template, rs in templates.items():
            entry = _accuracy(rs, "exact_match", False)
            answers = Counter(r["prediction"] for r in rs if r["outcome"] in ("correct", "wrong"))
            if answers:
                top, n = answers.most_common(1)[0]
                entry["top_answer"] = {"answer": top, "share": n / sum(answers.values())}
            result.setdefault(kind, {})[template] = entry
    return result


def _counts(records: list[dict]) -> dict[str, int]:
    outcomes = Counter(r["outcome"] for r in records)
    return {"samples": len(records), "generated": len(records) - outcomes["failed"] - outcomes["invalid"],
            "unparsable": outcomes["unparsable"], "failed": outcomes["failed"], "invalid": outcomes["invalid"]}


def _clip(sample: Sample) -> Any:
    """The one audio clip of an ASR sample (what the anchor transcribes)."""
    clips = [part["audio"] for message in sample.get_messages() if message["role"] == "user"
             for part in message["content"] if part.get("type") == "audio"]
    if len(clips) != 1:
        raise InputError(f"the anchor transcribes samples with one audio clip; {sample.id} has {len(clips)}")
    return clips[0]


def _transcribe(anchor: SpeechAnchor, items: list[tuple[Sample, Any]]) -> list[tuple[str | None, str | None]]:
    """`(transcript, error)` per item: the batch at once, or, if that raises, each item alone."""
    try:
        texts = anchor.transcribe([clip for _, clip in items])
        if len(texts) != len(items):
            raise RuntimeError(f"the anchor returned {len(texts)} transcripts for {len(items)} clips")
        return [(text, None) for text in texts]
    except SAMPLE_ERRORS as err:
        if len(items) == 1:
            return [(None, f"{type(err).__name__}: {err}")]
        return [result for item in items for result in _transcribe(anchor, [item])]


def _run_anchor(anchor: SpeechAnchor, samples: Sequence[Sample], batch_size: int, desc: str, progress: bool
                ) -> dict[int, tuple[str | None, str | None]]:
    """The anchor's `(transcript, error)` for each ASR sample, keyed by `id(sample)`."""
    results: dict[int, tuple[str | None, str | None]] = {}
    with tqdm(total=len(samples), desc=desc, unit="clip", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            items = []
            for sample in samples[start : start + batch_size]:
                try:
                    items.append((sample, _clip(sample)))
                except SAMPLE_ERRORS as err:
                    results[id(sample)] = (None, f"{type(err).__name__}: {err}")
            if items:
                for (sample, _), result in zip(items, _transcribe(anchor, items)):
                    results[id(sample)] = result
            bar.update(len(samples[start : start + batch_size]))
    return results


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
    anchor: SpeechAnchor | str | Path | bool | None = None,
    **task_options,
) -> dict:
    """Evaluates `model` on a task and returns its results (and writes them to `out` when given).

    Args:
        model: An `OlaForConditionalGeneration` in eval mode.
        processor: Its `OlaProcessor`.
        task: A task name (`tiny`, `mmbench`, `videomme`, `librispeech`, `audio_qa`) or a loaded `Task`.
        data: The task's file or folder (see `omniola.evaluation.tasks`).
        batch_size: Questions decoded together (the engine's batch; also the anchor's clips per call).
        max_new_tokens: Answer length limit (default: the task's: 32, or 256 for LibriSpeech).
        seed: Seeds torch, numpy and random before generating.
        temperature: 0 (default) decodes greedily.
        out: Folder for `<task>.json`, `<task>.predictions.jsonl` and `<task>.md`.
        progress: Show a tqdm progress bar.
        anchor: A specialist recogniser to score ASR samples against (`omniola.evaluation.anchor`): `True` for
            Whisper tiny.en through CTranslate2, a Whisper checkpoint name or directory, or a
            :class:`~omniola.evaluation.anchor.SpeechAnchor`; `None` (default): none. Used only when the task has
            ASR samples.
        **task_options: The loader's options (`split`, `kinds`, `limit`, `circular`, `media`, `multi_turn`, ...).

    Returns:
        `{"task", "source", "model", "settings", "scores": {group: {...}}, "counts", "issues", "timing",
        "predictions": [...]}`; `files` too when written. When the samples carry splits (tiny: `test` and `oot`),
        also `"splits": {split: {"scores", "counts"}}`, and `scores` is the first split's. With an anchor, every
        WER group also has `anchor`, `anchor_wer`, `wer_ratio`, `anchor_evaluated` and `anchor_failed`. With the
        modality-removal control (tiny), `"modality_removal": {kind: {"both", "no_audio", "no_video", "chance"}}`
        (the first split's; each split's in `splits` too); `counts` and the predictions include its samples
        (marked `removed`), `scores` does not. Samples with a question template (tiny) give
        `"by_template": {kind: {template: {..., "top_answer": {"answer", "share"}}}}` (likewise).

    Raises:
        ConfigError: unknown task or option, bad `batch_size`.
        ComponentNotFoundError: the anchor asked for cannot be loaded (ctranslate2 or the checkpoint missing).
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
    asr = [s for s in valid if s.metric == "wer"]
    anchor = resolve_anchor(anchor, device=model_device(model), batch_size=batch_size) if asr else None

    answers: dict[int, tuple[str | None, str | None]] = {}
    engine = Engine(model, processor, max_batch=batch_size)
    options = GenerationOptions(max_new_tokens=gen["max_new_tokens"], temperature=temperature, seed=seed)
    start = time.perf_counter()
    with tqdm(total=len(valid), desc=task.name, unit="sample", disable=not progress) as bar:
        for at in range(0, len(valid), IN_FLIGHT * batch_size):  # a few batches' media prepared at a time
            batch = valid[at:at + IN_FLIGHT * batch_size]
            items, results = [], {}
            for sample in batch:
                try:
                    items.append((sample, sample.get_messages()))
                except SAMPLE_ERRORS as err:  # embedded media that does not decode
                    results[id(sample)] = (None, f"{type(err).__name__}: {err}")
            if items:
                for (sample, _), result in zip(items, _answer(engine, processor, items, options)):
                    results[id(sample)] = result
            answers.update(results)
            bar.update(len(batch))
    generate_s = time.perf_counter() - start
    engine.close()
    anchored: dict[int, tuple[str | None, str | None]] = {}
    anchor_info = anchor_s = None
    if anchor is not None:
        anchor_info = anchor.describe()
        start = time.perf_counter()
        anchored = _run_anchor(anchor, asr, batch_size, f"{task.name} anchor {anchor_info.get('name', '')}",
                               progress)
        anchor_s = round(time.perf_counter() - start, 3)

    records = [_score(s, *answers.get(id(s), (None, None)), normalizer, anchored.get(id(s))) for s in task.samples]
    problems = Counter(r["error"] for r in records if r.get("error"))
    problems.update(f"anchor: {r['anchor_error']}" for r in records if r.get("anchor_error"))
    issues = list(task.issues) + [reason for reason, _ in problems.most_common(MAX_LISTED_ISSUES)]
    if len(problems) > MAX_LISTED_ISSUES:
        issues.append(f"... and {len(problems) - MAX_LISTED_ISSUES} more distinct problems (see the predictions)")
    splits = list(dict.fromkeys(s.split for s in task.samples if s.split is not None))
    per_split = {}
    for name in splits:
        in_split = [r for r in records if r.get("split") == name]
        per_split[name] = {"scores": _scores(task, [s for s in task.samples if s.split == name], in_split,
                                             anchor_info),
                           "counts": _counts(in_split)}
        control = _modality_removal(in_split)
        if control:
            per_split[name]["modality_removal"] = control
        templates = _by_template(in_split)
        if templates:
            per_split[name]["by_template"] = templates
    control = per_split[splits[0]].get("modality_removal") if splits else _modality_removal(records)
    templates = per_split[splits[0]].get("by_template") if splits else _by_template(records)
    result = {
        "task": task.name,
        "source": task.source,
        "model": model_dir,
        "settings": {**task.settings, "batch_size": batch_size, **gen, "seed": seed,
                     "decoding": "greedy" if temperature <= 0 else "sampling",
                     **({"wer_normalizer": "whisper_english" + ("" if spelling else " (no spelling map)")}
                        if normalizer else {}),
                     **({"anchor": anchor_info} if anchor_info is not None else {})},
        "scores": per_split[splits[0]]["scores"] if splits else _scores(task, task.samples, records, anchor_info),
        **({"modality_removal": control} if control else {}),
        **({"by_template": templates} if templates else {}),
        **({"splits": per_split} if splits else {}),
        "counts": _counts(records),
        "issues": issues,
        "timing": {"generate_s": round(generate_s, 3),
                   "seconds_per_sample": round(generate_s / len(valid), 4) if valid else None,
                   **({"anchor_s": anchor_s} if anchor_s is not None else {})},
        "predictions": records,
    }
    if out is not None:
        result["files"] = write_results(result, out)
    return result


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


SPLIT_TITLES = {"test": "in-template (test)", "oot": "out-of-template (oot)"}
CONTROL_NOTE = ("no audio / no video: the same questions asked with that modality removed (modality-removal "
                "control); chance: always the template's most common answer")


def _anchor_label(group: str, entry: dict) -> str:
    info = entry["anchor"]
    beam = info.get("beam_size")
    return f"{group}: anchor {info.get('name', '?')}" + (f" (beam {beam})" if beam else "")


def _classic_rows(result: dict) -> list[str]:
    rows = []
    for group, s in result["scores"].items():
        rows.append(f"| {result['task']} | {group} | {s['metric']} | {_percent(s['score'])} | "
                    f"{s['evaluated']} / {s['questions']} | {s.get('unparsable', 0)} | {s['failed']} | "
                    f"{s['invalid']} |")
        if "anchor_wer" in s:
            rows.append(f"| {result['task']} | {_anchor_label(group, s)} | wer | {_percent(s['anchor_wer'])} | "
                        f"{s['anchor_evaluated']} / {s['evaluated']} | 0 | {s['anchor_failed']} | 0 |")
            rows.append(f"| {result['task']} | {group}: model / anchor | wer_ratio | {_ratio(s['wer_ratio'])} | "
                        f"{s['anchor_evaluated']} / {s['evaluated']} | | | |")
        control = result.get("modality_removal", {}).get(group)
        if control:
            for m in REMOVABLE:
                c = control[f"no_{m}"]
                rows.append(f"| {result['task']} | {group}: no {m} | {c['metric']} | {_percent(c['score'])} | "
                            f"{c['evaluated']} / {c['questions']} | {c['unparsable']} | {c['failed']} | "
                            f"{c['invalid']} |")
            rows.append(f"| {result['task']} | {group}: chance | {s['metric']} | {_percent(control['chance'])} | "
                        f"| | | |")
    return rows


def _side_by_side(result: dict) -> str:
    """One row per kind, one score column per split, then each split's `evaluated / questions`; a WER kind with an
    anchor gets an anchor row and a ratio row; then a small table of each split's counts."""
    splits = result["splits"]
    names = list(splits)
    titles = [SPLIT_TITLES.get(n, n) for n in names]
    anchored = any("anchor_wer" in e for split in splits.values() for e in split["scores"].values())
    controlled = any("modality_removal" in split for split in splits.values())
    note = ("Scores in % (WER: lower is better)" + ("; wer_ratio = model WER / anchor WER on the same clips"
                                                    if anchored else "")
            + (f"; {CONTROL_NOTE}" if controlled else ""))
    lines = [note + ".", "",
             f"| kind | metric | {' | '.join(titles)} | {' | '.join(f'evaluated / questions ({n})' for n in names)} |",
             "|---|---|" + "---:|" * (2 * len(names))]
    groups = list(dict.fromkeys(g for n in names for g in splits[n]["scores"]))
    for group in groups:
        entries = [splits[n]["scores"].get(group) for n in names]
        metric = next(e["metric"] for e in entries if e is not None)
        scores = [_percent(e["score"]) if e else "-" for e in entries]
        counts = [f"{e['evaluated']} / {e['questions']}" if e else "-" for e in entries]
        lines.append(f"| {group} | {metric} | {' | '.join(scores)} | {' | '.join(counts)} |")
        with_anchor = [e if e and "anchor_wer" in e else None for e in entries]
        if any(with_anchor):
            first = next(e for e in with_anchor if e)
            scores = [_percent(e["anchor_wer"]) if e else "-" for e in with_anchor]
            counts = [f"{e['anchor_evaluated']} / {e['evaluated']}" if e else "-" for e in with_anchor]
            lines.append(f"| {_anchor_label(group, first)} | wer | {' | '.join(scores)} | {' | '.join(counts)} |")
            ratios = [_ratio(e["wer_ratio"]) if e else "-" for e in with_anchor]
            lines.append(f"| {group}: model / anchor | wer_ratio | {' | '.join(ratios)} | {' | '.join(counts)} |")
        controls = [splits[n].get("modality_removal", {}).get(group) for n in names]
        if any(controls):
            for m in REMOVABLE:
                entries = [c[f"no_{m}"] if c else None for c in controls]
                scores = [_percent(e["score"]) if e else "-" for e in entries]
                counts = [f"{e['evaluated']} / {e['questions']}" if e else "-" for e in entries]
                lines.append(f"| {group}: no {m} | {metric} | {' | '.join(scores)} | {' | '.join(counts)} |")
            chances = [_percent(c["chance"]) if c else "-" for c in controls]
            lines.append(f"| {group}: chance | {metric} | {' | '.join(chances)} | {' | '.join('' for _ in names)} |")
    templated = [(kind, template) for kind in dict.fromkeys(k for n in names for k in splits[n].get("by_template", {}))
                 for template in dict.fromkeys(t for n in names for t in splits[n].get("by_template", {}).get(kind, {}))]
    if templated:
        lines += ["", "By question template (exact match in %; most common answer and its share of the answers):", "",
                  f"| kind | template | {' | '.join(titles)} | {' | '.join(f'most common answer ({n})' for n in names)} |",
                  "|---|---|" + "---:|" * len(names) + "---|" * len(names)]
        for kind, template in templated:
            entries = [splits[n].get("by_template", {}).get(kind, {}).get(template) for n in names]
            scores = [_percent(e["score"]) if e else "-" for e in entries]
            tops = [f"{e['top_answer']['answer']} ({100 * e['top_answer']['share']:.0f}%)"
                    if e and "top_answer" in e else "-" for e in entries]
            lines.append(f"| {kind} | {template} | {' | '.join(scores)} | {' | '.join(tops)} |")
    lines += ["", "| split | samples | generated | unparsable | failed | invalid |", "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        c = splits[name]["counts"]
        lines.append(f"| {name} | {c['samples']} | {c['generated']} | {c['unparsable']} | {c['failed']} | "
                     f"{c['invalid']} |")
    return "\n".join(lines) + "\n"


def markdown_table(results: Sequence[dict]) -> str:
    """Markdown tables of results.

    Single-split results share one table: one row per task and score group, with the score (in %), how many were
    evaluated, and what went wrong. A result scored on several splits (the tiny world's in-template `test` and
    out-of-template `oot`) gets its own table with the splits side by side, one row per kind, then each split's
    counts. An anchored WER group adds a row with the anchor's WER and one with `wer_ratio` (model / anchor); a kind
    with the modality-removal control adds its `no audio`, `no video` and `chance` rows.
    """
    classic = [r for r in results if len(r.get("splits", ())) <= 1]
    tables = []
    if classic or not results:
        lines = ["| task | group | metric | score (%) | evaluated / questions | unparsable | failed | invalid |",
                 "|---|---|---|---:|---:|---:|---:|---:|"]
        for result in classic:
            lines += _classic_rows(result)
        tables.append("\n".join(lines) + "\n")
    for result in results:
        if len(result.get("splits", ())) > 1:
            tables.append((f"**{result['task']}**\n\n" if len(results) > 1 else "") + _side_by_side(result))
    return "\n".join(tables)


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
