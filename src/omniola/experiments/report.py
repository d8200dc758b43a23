"""The report of an experiment, built from its result files only (`--report-only` rebuilds it).

`OUT/report.md` states when, where and how the runs were made (date, machine, command line, budgets, seeds,
evaluation settings), the runs asked for (`OUT/plan.json`) that have no result and why, generated Findings, and,
for each split (in template `test`, out of template `oot`): tables of mean +- standard deviation across seeds per
arm and kind and the Figure-3 normalisation when the experiment has a reference arm. Then the modality-removal
control (per kind, and per question template where the questions have one), the budget sweep (when the results
span several scales), the connector measures, and one row per run. The tables and findings are those of the
largest budget; the sweep section compares the budgets.

Figures (matplotlib, Agg): `OUT/scores.png` / `scores-oot.png` (raw scores), `OUT/normalised.png` /
`normalised-oot.png` (normalised to the reference arm), `OUT/sweep.png` (score against optimizer steps),
`OUT/connectors.png` (parameters, LLM tokens per image, training time).

Spread across seeds: `std` is the sample standard deviation (n - 1); the Findings compare the per-seed ranges
(min..max) of the best and second-best arm: overlapping ranges mean the seeds do not separate them.

Spread across questions: every run answers the same questions, so two arms are compared question by question. The
differences to the reference arm (else the first arm), and the modality-removal control's audio effect, get a 95%
confidence interval from a paired bootstrap over the questions (:func:`paired_bootstrap`, from the result files'
`outcomes`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, OutputInUseError
from ..files import FolderLock
from ..training.trainer import LOCK_FILE, save_figure
from .definitions import KIND_LABELS, Experiment

BOOTSTRAP_SAMPLES = 4000
FIGURE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# ------------------------------------------------------------------------------------------------ the numbers
def load_results(out: Path, experiment: Experiment) -> list[dict]:
    """The experiment's result files in `out/results`, in arm order (the experiment's, then others) and seed order."""
    folder = Path(out) / "results"
    results = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not a valid result file ({err}); delete it to redo its run") from err
        if result.get("experiment") == experiment.name:
            results.append(result)
    order = {a.name: i for i, a in enumerate(experiment.arms)}
    return sorted(results, key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["seed"]))


def spread(values: Sequence[float]) -> dict:
    """n, mean, sample standard deviation (None for one value), min and max of per-seed values."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values), "values": list(values)}


def split_scores(result: dict) -> dict[str, dict[str, dict]]:
    """A result's scores per split and kind (format 1 results hold the test split's kinds only)."""
    return result["scores"] if result.get("format", 1) >= 2 else {"test": result["scores"]}


def aggregate(results: Sequence[dict], split: str = "test") -> tuple[dict[str, dict[str, dict]], dict[str, str]]:
    """Per arm and kind: the spread of the per-seed scores on `split`; and each kind's metric (`exact_match`,
    `wer`)."""
    table: dict[str, dict[str, list[float]]] = {}
    metrics: dict[str, str] = {}
    for r in results:
        row = table.setdefault(r["arm"], {})
        for kind, s in split_scores(r).get(split, {}).items():
            metrics[kind] = s["metric"]
            if s["score"] is not None:
                row.setdefault(kind, []).append(s["score"])
    return {arm: {kind: spread(v) for kind, v in row.items()} for arm, row in table.items()}, metrics


def lower_is_better(metric: str) -> bool:
    return metric == "wer"


def normalise(values: dict[str, Sequence[float]], reference: str, metric: str) -> dict[str, dict]:
    """Ola Figure 3's normalisation of one metric: every arm relative to the reference arm's mean (above 1: better).

    Accuracy: `mean(arm) / mean(reference)`, per seed `score / mean(reference)`. WER (lower is better), inverted:
    `mean(reference) / mean(arm)`, per seed `mean(reference) / wer`. The spread is that of the per-seed points.

    Args:
        values: Per arm, its per-seed scores of this metric.
        reference: The arm normalised to 1.
        metric: `"wer"` (inverted) or an accuracy.

    Returns:
        Per arm: `{"mean", "std", "points"}` (`mean` None when a division by zero makes it undefined).
    """
    ref_values = values.get(reference) or []
    ref = sum(ref_values) / len(ref_values) if ref_values else None
    out = {}
    for arm, vs in values.items():
        vs = list(vs)
        mean = sum(vs) / len(vs) if vs else None
        if lower_is_better(metric):
            ratio = (lambda v: ref / v if ref is not None and v else None)
        else:
            ratio = (lambda v: v / ref if ref else None)
        points = [p for p in (ratio(v) for v in vs) if p is not None]
        out[arm] = {"mean": ratio(mean) if mean is not None else None, "std": spread(points)["std"],
                    "points": points}
    return out


def normalised_table(agg: dict, metrics: dict[str, str], reference: str, kinds: Sequence[str]) -> dict:
    """Per arm and kind, the normalisation of `normalise` (empty when the reference arm has no results)."""
    if reference not in agg:
        return {}
    table: dict[str, dict] = {arm: {} for arm in agg}
    for kind in kinds:
        values = {arm: row[kind]["values"] for arm, row in agg.items() if kind in row}
        if reference not in values:
            continue
        for arm, entry in normalise(values, reference, metrics[kind]).items():
            table[arm][kind] = entry
    return table


def question_values(results: Sequence[dict], split: str, key: str) -> list[list[str]] | None:
    """Per run, the outcome tokens of one split and kind (see `runner.question_outcomes`); None unless every run has
    them, for the same questions."""
    columns = [(r.get("outcomes") or {}).get(split, {}).get(key) for r in results]
    if not columns or None in columns or len({c["ids"] for c in columns}) > 1:
        return None
    return [c["values"].split() for c in columns]


def question_templates(results: Sequence[dict], split: str, kind: str) -> list[str] | None:
    """The template of each question of a kind (`runner.question_outcomes`' `templates`), from any result that kept
    them for these questions (the same ids digest): a template belongs to the question, not to the run, so results
    made before templates were kept borrow them. None when no result has them."""
    columns = [c for r in results if (c := (r.get("outcomes") or {}).get(split, {}).get(kind))]
    if len({c["ids"] for c in columns}) != 1:
        return None
    return next((c["templates"].split() for c in columns if "templates" in c), None)


def _subset(runs: Sequence[Sequence[str]], keep: Sequence[int]) -> list[list[str]]:
    return [[run[i] for i in keep] for run in runs]


def _mean_score(runs: Sequence[Sequence[str]]) -> float | None:
    """The seeds' mean of each run's score over these questions (as `paired_bootstrap` scores an arm)."""
    if not runs:
        return None
    num, den = _counts(runs)
    totals = den.sum(1)
    return float((num.sum(1) / totals).mean()) if totals.all() else None


def _counts(runs: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per run and question, the score's numerator and denominator: exact match 1 or 0 over 1, WER errors over
    reference words, 0 over 0 for a question left out."""
    num = np.zeros((len(runs), len(runs[0])))
    den = np.zeros_like(num)
    for i, tokens in enumerate(runs):
        for j, token in enumerate(tokens):
            if token != "-":
                n, _, d = token.partition("/")
                num[i, j], den[i, j] = float(n), float(d or 1)
    return num, den


def paired_bootstrap(a: Sequence[Sequence[str]], b: Sequence[Sequence[str]], *, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> dict | None:
    """Arm b's score minus arm a's, with a 95% confidence interval from a paired bootstrap over the questions.

    An arm's score is the mean over its runs (seeds) of each run's score: the sum of the numerators over the sum of
    the denominators of `_counts` (accuracy, or WER pooled over utterances, as the evaluation scores them). Each
    bootstrap sample draws the questions with replacement and scores both arms on the same draw, so what a question
    does to every arm (an easy one, a hard one) cancels out. The interval covers the sampling of the questions
    given these seeds; the spread across seeds is reported apart.

    Args:
        a, b: Per run, one outcome token per question, the same questions in the same order.

    Returns:
        `{"difference", "low", "high"}` as fractions, or None when the arms were not asked the same number of
        questions or a score is undefined.
    """
    if not a or not b or len({len(run) for run in (*a, *b)}) != 1:
        return None
    (num_a, den_a), (num_b, den_b) = _counts(a), _counts(b)
    n = num_a.shape[1]
    draws = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    weights = np.zeros((samples + 1, n))
    np.add.at(weights, (np.repeat(np.arange(samples), n), draws.ravel()), 1.0)
    weights[samples] = 1.0  # the last row: the questions as asked, the point estimate
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = ((num_b @ weights.T) / (den_b @ weights.T)).mean(0) - ((num_a @ weights.T) / (den_a @ weights.T)).mean(0)
    if not np.isfinite(diff[samples]):
        return None
    low, high = np.nanpercentile(diff[:samples], [2.5, 97.5])
    return {"difference": float(diff[samples]), "low": float(low), "high": float(high)}


def differences(by_arm: dict[str, list[dict]], reference: str, split: str, kinds: Sequence[str]) -> dict[str, dict]:
    """Per arm other than `reference` and kind: `paired_bootstrap` of the arm's results against the reference
    arm's."""
    table: dict[str, dict] = {}
    for kind in kinds:
        ref = question_values(by_arm.get(reference, []), split, kind)
        for arm, runs in by_arm.items():
            values = question_values(runs, split, kind)
            if arm != reference and ref and values:
                diff = paired_bootstrap(ref, values)
                if diff:
                    table.setdefault(arm, {})[kind] = diff
    return table


# -------------------------------------------------------------------------------------------------- the words
def _interval(d: dict | None) -> str:
    """A difference in points with its interval, bold when the interval excludes 0."""
    if not d:
        return "n/a"
    point, low, high = (round(100 * d[k], 1) + 0.0 for k in ("difference", "low", "high"))  # no "-0.0"
    text = f"{point:+.1f} [{low:+.1f}, {high:+.1f}]"
    return f"**{text}**" if d["low"] > 0 or d["high"] < 0 else text


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _mean_std(s: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    text = f"{scale * s['mean']:.{digits}f}"
    if s.get("std") is not None:
        text += f" ± {scale * s['std']:.{digits}f}"
    return text


def kind_header(kind: str, metric: str) -> str:
    label = KIND_LABELS.get(kind, kind)
    return f"{label} (WER %, lower is better)" if lower_is_better(metric) else f"{label} (exact match %)"


def findings(experiment: Experiment, agg: dict, metrics: dict[str, str], titles: dict[str, str],
             norm: dict | None) -> str:
    """One sentence per compared kind: who won, by how much, and whether the seeds' ranges overlap."""
    sentences = []
    for kind in experiment.compared_kinds:
        if kind not in metrics:
            continue
        metric = metrics[kind]
        rows = [(arm, row[kind]) for arm, row in agg.items() if kind in row and row[kind]["mean"] is not None]
        if len(rows) < 2:
            continue
        low = lower_is_better(metric)
        rows.sort(key=lambda item: item[1]["mean"], reverse=not low)
        (best, b), (second, s) = rows[0], rows[1]
        name = f"{KIND_LABELS.get(kind, kind)} ({'WER, lower is better' if low else 'exact match'})"
        gap = abs(b["mean"] - s["mean"]) * 100
        if gap < 1e-9:
            text = f"{name}: {titles[best]} and {titles[second]} tie at {_pct(b['mean'])}%"
        else:
            text = (f"{name}: **{titles[best]}** is best with {_pct(b['mean'])}%, {gap:.1f} points "
                    f"{'lower' if low else 'higher'} than {titles[second]} ({_pct(s['mean'])}%)")
            if norm and kind in norm.get(best, {}) and norm[best][kind]["mean"] is not None:
                text += f"; normalised to {titles[experiment.reference]}: " + ", ".join(
                    f"{titles[arm]} {norm[arm][kind]['mean']:.2f}" for arm, _ in rows
                    if kind in norm.get(arm, {}) and norm[arm][kind]["mean"] is not None)
            if len(rows) > 2:
                text += "; then " + ", ".join(f"{titles[arm]} ({_pct(r['mean'])}%)" for arm, r in rows[2:])
        if b["n"] > 1 and s["n"] > 1:
            overlap = b["min"] <= s["max"] and s["min"] <= b["max"]
            ranges = (f"{_pct(b['min'])}-{_pct(b['max'])}% vs {_pct(s['min'])}-{_pct(s['max'])}% over "
                      f"{b['n']} and {s['n']} seeds")
            text += (f". Their per-seed ranges overlap ({ranges}): the seeds do not separate them" if overlap else
                     f". Their per-seed ranges do not overlap ({ranges})")
        elif b["n"] == 1 and s["n"] == 1:
            text += ". One seed per arm: the spread across seeds is not measured"
        else:
            text += ". One of the two has a single seed: the seeds cannot separate them"
        sentences.append(text + ".")
    if not sentences:
        return "Not enough results to compare arms yet."
    return "\n".join(f"- {s}" for s in sentences)


def _machine(m: dict) -> str:
    text = (f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')} "
            f"({m.get('torch_threads', '?')} threads)")
    return text + (f", GPU {m['gpu']}" if m.get("gpu") else "")


def _unique(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


# ------------------------------------------------------------------------------------------------ the figures
def _bars(ax, kinds: Sequence[str], arms: Sequence[str], titles: dict, means: dict, stds: dict, points: dict,
          colors: dict) -> None:
    """Grouped bars (one group per kind, one bar per arm) with std error bars and per-seed points."""
    import numpy as np

    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        xs = np.arange(len(kinds)) + (j - (len(arms) - 1) / 2) * width
        heights = [means.get(arm, {}).get(k) for k in kinds]
        errs = [stds.get(arm, {}).get(k) or 0.0 for k in kinds]
        ax.bar(xs, [h if h is not None else 0.0 for h in heights], width * 0.9, yerr=errs, capsize=3,
               color=colors[arm], alpha=0.8, label=titles[arm], error_kw={"elinewidth": 1})
        for x, k in zip(xs, kinds):
            pts = points.get(arm, {}).get(k) or []
            if pts:
                jitter = np.linspace(-width * 0.2, width * 0.2, len(pts)) if len(pts) > 1 else [0.0]
                ax.scatter(x + np.asarray(jitter), pts, s=12, color="black", zorder=3)
    ax.set_xticks(range(len(kinds)))


def plot_scores(path: Path, kinds, arms, titles, agg, metrics, colors, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = {a: {k: 100 * agg[a][k]["mean"] for k in kinds if k in agg[a] and agg[a][k]["mean"] is not None}
             for a in arms}
    stds = {a: {k: 100 * (agg[a][k]["std"] or 0) for k in kinds if k in agg[a]} for a in arms}
    points = {a: {k: [100 * v for v in agg[a][k]["values"]] for k in kinds if k in agg[a]} for a in arms}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(kinds) + 2), 4.4))
    _bars(ax, kinds, arms, titles, means, stds, points, colors)
    ax.set_xticklabels([KIND_LABELS.get(k, k) + ("\n(WER %, lower is better)" if lower_is_better(metrics[k]) else
                                                 "\n(exact match %)") for k in kinds], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title(f"{title}\nmean ± std over seeds, dots: single seeds", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_normalised(path: Path, kinds, arms, titles, norm, colors, reference_title: str, split_title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = {a: {k: norm[a][k]["mean"] for k in kinds if k in norm.get(a, {})} for a in arms}
    stds = {a: {k: norm[a][k]["std"] for k in kinds if k in norm.get(a, {})} for a in arms}
    points = {a: {k: norm[a][k]["points"] for k in kinds if k in norm.get(a, {})} for a in arms}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(kinds) + 2), 4.4))
    _bars(ax, kinds, arms, titles, means, stds, points, colors)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticklabels([KIND_LABELS.get(k, k) for k in kinds], fontsize=8)
    ax.set_ylabel(f"relative to {reference_title} (above 1: better)")
    ax.set_title(f"{split_title}: normalised to {reference_title}'s mean (WER inverted)\n"
                 "mean ± std over seeds, dots: seeds", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_connectors(path: Path, arms, titles, per_arm: dict, colors) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("parameters", "vision connector parameters (millions)", 1e-6),
              ("image_tokens", "LLM tokens per test image", 1.0),
              ("time_s", "training time (minutes, stages)", 1 / 60))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, label, factor) in zip(axes, panels):
        values = [per_arm[a].get(key) for a in arms]
        ax.bar(range(len(arms)), [v * factor if v is not None else 0 for v in values],
               color=[colors[a] for a in arms])
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([titles[a] for a in arms], rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- the report
SPLIT_TITLES = {"test": "In template (test split)", "oot": "Out of template (oot split)"}


def _split_file(stem: str, split: str) -> str:
    return f"{stem}.png" if split == "test" else f"{stem}-{split}.png"


def missing_runs(out: Path, results: Sequence[dict]) -> list[dict]:
    """The runs in `out/plan.json` (every run asked for) without a result file, each with why."""
    path = out / "plan.json"
    if not path.is_file():
        return []
    done = {r["run"] for r in results}
    missing = []
    for run, entry in json.loads(path.read_text(encoding="utf-8"))["runs"].items():
        if run not in done:
            missing.append({"run": run, **entry, "why": why_missing(out, run)})
    return missing


def why_missing(out: Path, run: str) -> str:
    """Why a planned run has no result: it failed (the recorded error), a trainer is at work on it, it is trained
    but not evaluated, its training stopped at some step (resumable), or it never started."""
    failure = out / "failed" / f"{run}.json"
    if failure.is_file():
        return "failed: " + json.loads(failure.read_text(encoding="utf-8"))["error"]
    run_dir = out / "runs" / run
    if (run_dir / LOCK_FILE).is_file():
        try:
            FolderLock(run_dir, LOCK_FILE, holder="trainer").acquire().release()
        except OutputInUseError:
            return "being trained now"
    if (run_dir / "final" / "config.json").is_file():
        return "trained, not evaluated yet"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        last = None
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                last = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed run
                break
        if last is not None:
            return (f"training stopped at step {last['step']} of stage {last['stage']!r} (step {last['global_step']} "
                    "of the run); the same command resumes it")
    started = run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    return "training started, no step finished" if started else "not started"


def removal_table(results: Sequence[dict], split: str) -> dict[str, dict[str, dict]]:
    """Per arm and video + audio kind: the modality-removal control's scores over seeds (`both`, `no_audio`,
    `no_video`, `chance`, and `audio_effect` = both - no_audio, each a `spread`)."""
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        for kind, control in ((r.get("modality_removal") or {}).get(split) or {}).items():
            row = values.setdefault(r["arm"], {}).setdefault(kind, {})
            scores = {k: control[k]["score"] for k in ("both", "no_audio", "no_video") if control.get(k)}
            scores["chance"] = control.get("chance")
            if scores.get("both") is not None and scores.get("no_audio") is not None:
                scores["audio_effect"] = scores["both"] - scores["no_audio"]
            for k, v in scores.items():
                if v is not None:
                    row.setdefault(k, []).append(v)
    return {arm: {kind: {k: spread(v) for k, v in row.items()} for kind, row in kinds.items()}
            for arm, kinds in values.items()}


def removal_columns(runs: Sequence[dict], split: str, kind: str) -> dict[str, list[list[str]] | None]:
    """The runs' outcome tokens (`question_values`) of a kind's questions as asked (`both`), without their audio
    (`no_audio`) and without their frames (`no_video`)."""
    return {c: question_values(runs, split, kind + suffix)
            for c, suffix in (("both", ""), ("no_audio", "/no_audio"), ("no_video", "/no_video"))}


def audio_effect(columns: dict[str, list[list[str]] | None]) -> dict | None:
    """Both - no audio over the same questions, with its `paired_bootstrap` interval; None without both columns."""
    return paired_bootstrap(columns["no_audio"], columns["both"]) if columns["both"] and columns["no_audio"] else None


def removal_by_template(by_arm: dict[str, list[dict]], arms: Sequence[str], split: str) -> list[tuple]:
    """The modality-removal control per question template: rows `(arm, kind, template, {"n", "both", "no_audio",
    "no_video", "audio_effect"})`, the scores the seeds' mean over the template's questions, the audio effect a
    `paired_bootstrap` of the questions with against without their audio. Kinds whose questions have no
    templates, or whose runs lack an outcome column, give no rows."""
    rows = []
    every = [r for arm in arms for r in by_arm.get(arm, [])]
    kinds = dict.fromkeys(k for r in every for k in ((r.get("modality_removal") or {}).get(split) or {}))
    for kind in kinds:
        templates = question_templates(every, split, kind)
        if not templates:
            continue
        for arm in arms:
            columns = removal_columns(by_arm.get(arm, []), split, kind)
            if not columns["both"] or len(columns["both"][0]) != len(templates):
                continue
            for template in dict.fromkeys(templates):
                keep = [i for i, t in enumerate(templates) if t == template]
                picked = {c: _subset(v, keep) if v else None for c, v in columns.items()}
                row = {"n": len(keep), **{c: _mean_score(v) if v else None for c, v in picked.items()},
                       "audio_effect": audio_effect(picked)}
                rows.append((arm, kind, template, row))
    return rows


def sweep_order(experiment: Experiment, per_scale: dict[float, tuple[dict, dict]], steps: dict[float, int],
                titles: dict[str, str]) -> list[str]:
    """Per compared kind: the arms' order by mean score at each budget, and whether it changes with the budget.

    Args:
        per_scale: Per scale, `aggregate` of its results on one split.
        steps: Per scale, its optimizer steps per run.
    """
    sentences = []
    for kind in experiment.compared_kinds:
        orders = []
        for scale in sorted(per_scale):
            agg, metrics = per_scale[scale]
            rows = [(arm, row[kind]) for arm, row in agg.items() if kind in row and row[kind]["mean"] is not None]
            if len(rows) < 2:
                continue
            rows.sort(key=lambda item: item[1]["mean"], reverse=not lower_is_better(metrics[kind]))
            orders.append((steps[scale], [arm for arm, _ in rows],
                           ", ".join(f"{titles[arm]} {_pct(r['mean'])}" for arm, r in rows)))
        if len(orders) < 2:
            continue
        same = len({tuple(order) for _, order, _ in orders}) == 1
        text = "; ".join(f"{steps} steps: {shown}" for steps, _, shown in orders)
        sentences.append(f"{KIND_LABELS.get(kind, kind)}: {text}. "
                         + ("The order of the arms is the same at every budget." if same else
                            "**The order of the arms changes with the budget.**"))
    return sentences


def plot_sweep(path: Path, kinds, arms, titles, sweep: dict[str, dict[float, tuple[dict, dict]]],
               steps: dict[float, int], colors) -> Path:
    """Score against optimizer steps: one panel per split and kind, one line per arm (means, std bars, seeds).
    `sweep`: per split and scale, `aggregate` of that scale's results; `steps`: per scale, its steps per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sweep), len(kinds), figsize=(3.6 * len(kinds) + 0.6, 3.2 * len(sweep)),
                             squeeze=False)
    for row, (split, per_scale) in enumerate(sweep.items()):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            metric = "exact_match"
            for arm in arms:
                xs, means, stds = [], [], []
                for scale in sorted(per_scale):
                    agg, metrics = per_scale[scale]
                    entry = agg.get(arm, {}).get(kind)
                    if not entry or entry["mean"] is None:
                        continue
                    metric = metrics[kind]
                    xs.append(steps[scale])
                    means.append(100 * entry["mean"])
                    stds.append(100 * (entry["std"] or 0.0))
                    ax.scatter([steps[scale]] * len(entry["values"]), [100 * v for v in entry["values"]], s=8,
                               color=colors[arm], alpha=0.6)
                if xs:
                    ax.errorbar(xs, means, yerr=stds, color=colors[arm], marker="o", capsize=3, label=titles[arm])
            ax.set_title(f"{KIND_LABELS.get(kind, kind)}, {split}" + (" (WER %, lower is better)"
                                                                       if lower_is_better(metric) else " (%)"),
                         fontsize=8)
            ax.set_xlabel("optimizer steps (LLM stages)", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _seeds_cell(arm: str, found: int, asked: dict[str, int]) -> str:
    return f"{found} of {asked[arm]}" if arm in asked else str(found)


def write_report(experiment: Experiment, out: str | os.PathLike, *, command: str | None = None) -> Path:
    """Builds `out/report.md` and its figures from `out/results/*.json` (and `out/plan.json`, for what is missing).

    Raises:
        ConfigError: `out` has no results of this experiment, or a result file is not valid JSON.
    """
    out = Path(out)
    every = load_results(out, experiment)
    if not every:
        raise ConfigError(f"{out / 'results'} holds no results of experiment {experiment.name!r}: nothing to report")
    by_scale: dict[float, list[dict]] = {}
    for r in every:
        by_scale.setdefault(r["scale"], []).append(r)
    main_scale = max(by_scale)
    results = by_scale[main_scale]  # the tables and findings: the largest budget
    splits = [s for s in SPLIT_TITLES if any(s in split_scores(r) for r in results)]
    split_aggs = {split: aggregate(results, split) for split in splits}
    arms = list(dict.fromkeys(r["arm"] for r in results))  # experiment order, then arms not in the definition
    titles = {a.name: a.title for a in experiment.arms}
    titles.update({r["arm"]: r.get("label") or r["arm"] for r in every if r["arm"] not in titles})
    colors = {arm: FIGURE_COLORS[i % len(FIGURE_COLORS)] for i, arm in enumerate(titles)}
    metrics = {k: m for _, ms in split_aggs.values() for k, m in ms.items()}
    kinds = [k for k in experiment.kinds if k in metrics] + [k for k in metrics if k not in experiment.kinds]
    compared = [k for k in experiment.compared_kinds if k in metrics]
    reference = experiment.reference
    missing = missing_runs(out, every)
    scales = sorted(by_scale)
    steps = {scale: by_scale[scale][0]["total_steps"] for scale in scales}
    # the budget sweep, when the results span several budgets: per split and scale, the arms' scores
    sweep = {split: {scale: aggregate(by_scale[scale], split) for scale in scales} for split in splits} \
        if len(scales) > 1 else {}
    by_arm = {arm: [r for r in results if r["arm"] == arm] for arm in arms}
    # seeds asked for at this budget, for the arms with one missing
    asked = {arm: n + len(by_arm.get(arm, []))
             for arm, n in Counter(m["arm"] for m in missing if m["scale"] == main_scale).items()}

    dates = sorted(r["date"] for r in every)
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    lines = [f"# {experiment.title}", "", experiment.description, ""]
    lines.append(f"- **Date:** report built {now}; runs made {dates[0]} .. {dates[-1]}")
    for m in _unique(_machine(r["machine"]) for r in every):
        lines.append(f"- **Machine:** {m}")
    lines.append(f"- **Command:** `{command or '(not recorded)'}`")
    for c in _unique(r.get("command") for r in every):
        if c and c != command:
            lines.append(f"- **Runs made by:** `{c}`")
    totals = _unique(r["total_steps"] for r in results)
    lines.append(f"- **Budget:** {', '.join(str(t) for t in totals)} optimizer steps per run (scale {main_scale:g}), "
                 "equal for every arm" + ("" if len(totals) == 1 else " (**mixed budgets: compare with care**)"))
    if sweep:
        lines.append("- **Budget sweep:** " + ", ".join(f"scale {s:g} = {steps[s]} steps ({len(by_scale[s])} run"
                                                         f"{'s' * (len(by_scale[s]) != 1)})"
                                                         for s in scales))
    lines.append("- **Seeds:** " + "; ".join(f"{titles[a]}: {', '.join(str(r['seed']) for r in by_arm[a])}"
                                              for a in arms))
    ev = results[0]["evaluation"]
    limits = _unique(r["evaluation"]["limit"] for r in every)
    lines.append(f"- **Evaluation:** the tiny world ({ev['data']}): " + " and ".join(
        f"`{s}` ({SPLIT_TITLES[s].split(' (')[0].lower()})" for s in splits)
        + f", the first {' / '.join(str(x or 'all') for x in limits)} questions of each kind and split, greedy "
        f"decoding, seed {ev['seed']}; exact match after normalisation, WER (Whisper's English normaliser) for ASR")
    absent = [a.name for a in experiment.arms if a.name not in by_arm]
    if absent:
        lines.append(f"- **Arms without results at this budget:** {', '.join(absent)}")
    if missing:
        lines.append(f"- **Missing runs: {len(missing)}** (listed below). The means are over the seeds that have "
                     "results; the seeds columns say how many of those asked for")

    norms = {}
    lines += ["", "## Findings", ""]
    for split in splits:
        agg, ms = split_aggs[split]
        norms[split] = normalised_table(agg, ms, reference, compared) if reference else None
        lines += [f"### {SPLIT_TITLES[split]}", "", findings(experiment, agg, ms, titles, norms[split]), ""]
    short = [f"{titles[arm]} {len(by_arm.get(arm, []))} of {asked[arm]}" for arm in titles if arm in asked]
    if short:
        lines += [f"Seeds with results, of those asked for: {'; '.join(short)}. The means above are over those.", ""]
    if sweep:
        for split in splits:
            sentences = sweep_order(experiment, sweep[split], steps, titles)
            if sentences:
                lines += [f"### Budget sweep, {SPLIT_TITLES[split].lower()}", ""] + [f"- {s}" for s in sentences]
                lines.append("")

    if missing:
        lines += ["## Missing runs", "", "| run | arm | seed | steps | why |", "|---|---|---:|---:|---|"]
        for m in missing:
            lines.append(f"| {m['run']} | {titles.get(m['arm'], m['arm'])} | {m['seed']} | {m['total_steps']} | "
                         f"{m['why']} |")
        lines.append("")

    lines += ["## Scores", "", "Mean ± sample standard deviation over seeds (one seed: the mean alone).", ""]
    for split in splits:
        agg, ms = split_aggs[split]
        lines += [f"### {SPLIT_TITLES[split]}", ""]
        shown = [k for k in kinds if k in ms]
        lines.append("| arm | seeds | " + " | ".join(kind_header(k, ms[k]) for k in shown) + " |")
        lines.append("|---|---:|" + "---:|" * len(shown))
        for arm in arms:
            lines.append(f"| {titles[arm]} | {_seeds_cell(arm, len(by_arm[arm]), asked)} | "
                         + " | ".join(_mean_std(agg.get(arm, {}).get(k)) for k in shown) + " |")
        in_split = [k for k in compared if k in ms]
        if in_split:
            name = _split_file("scores", split)
            plot_scores(out / name, in_split, arms, titles, agg, ms, colors,
                        f"{experiment.title}, {SPLIT_TITLES[split].lower()}")
            lines += ["", f"![scores, {split}]({name})"]
        lines.append("")

    if reference and any(norms.values()):
        ref_title = titles[reference]
        lines += [f"## Normalised to {ref_title} (Ola Figure 3)", "",
                  f"Each score relative to {ref_title}'s mean: accuracy as arm / {ref_title}, WER inverted as "
                  f"{ref_title} / arm, so above 1 is better for every metric. ± is the standard deviation of the "
                  "per-seed normalised values.", ""]
        for split in splits:
            norm = norms[split]
            if not norm:
                continue
            in_split = [k for k in compared if any(k in norm.get(a, {}) for a in arms)]
            lines += [f"### {SPLIT_TITLES[split]}", ""]
            lines.append("| arm | " + " | ".join(KIND_LABELS.get(k, k) for k in in_split) + " |")
            lines.append("|---|" + "---:|" * len(in_split))
            for arm in arms:
                cells = [_mean_std(norm.get(arm, {}).get(k), scale=1.0, digits=2) for k in in_split]
                lines.append(f"| {titles[arm]} | " + " | ".join(cells) + " |")
            name = _split_file("normalised", split)
            plot_normalised(out / name, in_split, arms, titles, norm, colors, ref_title, SPLIT_TITLES[split])
            lines += ["", f"![normalised, {split}]({name})", ""]

    # the differences are to the reference arm, or else to the first (the shipped recipe: `with-cross`, Ola pooling)
    baseline = reference or experiment.arms[0].name
    diffs = {split: differences(by_arm, baseline, split, compared) for split in splits}
    if any(diffs.values()):
        ref_title = titles[baseline]
        lines += [f"## Differences to {ref_title}, with 95% confidence intervals", "",
                  f"Each arm's mean score minus {ref_title}'s, in points, and in brackets a 95% interval from a paired "
                  f"bootstrap over the questions ({BOOTSTRAP_SAMPLES} draws): every arm is scored on the same "
                  "resampled questions. **Bold**: the interval excludes 0. For WER a positive difference means more "
                  "errors. The interval covers which questions were asked, given these seeds; the seeds' own "
                  "spread is in the Scores tables.", ""]
        for split in splits:
            in_split = [k for k in compared if any(k in row for row in diffs[split].values())]
            if not in_split:
                continue
            ms = split_aggs[split][1]
            lines += [f"### {SPLIT_TITLES[split]}", "",
                      "| arm | " + " | ".join(kind_header(k, ms[k]) for k in in_split) + " |",
                      "|---|" + "---:|" * len(in_split)]
            for arm in arms:
                if arm in diffs[split]:
                    lines.append(f"| {titles[arm]} | "
                                 + " | ".join(_interval(diffs[split][arm].get(k)) for k in in_split) + " |")
            lines.append("")

    removal = {split: removal_table(results, split) for split in splits}
    if any(removal.values()):
        lines += ["## Modality-removal control", "",
                  "Every video + audio question asked three times: as made (both), with its sound track silenced "
                  "(no audio) and with its frames blanked (no video). Exact match %, mean ± std over seeds. "
                  "**Audio effect** = both - no audio, in points: how much the arm's right answers depend on the "
                  "audio. Chance: always the most common answer of each question template. The last column: the "
                  "audio effect of the seeds' mean with a 95% interval from a paired bootstrap over the questions "
                  "(each question asked with and without its audio).", ""]
        for split in splits:
            if not removal[split]:
                continue
            lines += [f"### {SPLIT_TITLES[split]}", "",
                      "| arm | kind | both | no audio | no video | chance | audio effect (points) | 95% interval |",
                      "|---|---|---:|---:|---:|---:|---:|---:|"]
            for arm in arms:
                for kind, row in removal[split].get(arm, {}).items():
                    effect = audio_effect(removal_columns(by_arm[arm], split, kind))
                    lines.append(f"| {titles[arm]} | {KIND_LABELS.get(kind, kind)} | "
                                 + " | ".join(_mean_std(row.get(k)) for k in
                                              ("both", "no_audio", "no_video", "chance", "audio_effect"))
                                 + f" | {_interval(effect)} |")
            lines.append("")

    by_template = {split: removal_by_template(by_arm, arms, split) for split in splits}
    if any(by_template.values()):
        lines += ["### By question template", "",
                  "The same control per question template (the tiny world's `meta.template`), exact match %, the "
                  "seeds' mean: a kind's audio effect can hide a template that uses the audio and one that does "
                  "not. n: questions of the template. The audio effect with its paired 95% interval.", ""]
        for split in splits:
            if not by_template[split]:
                continue
            lines += [f"#### {SPLIT_TITLES[split]}", "",
                      "| arm | kind | template | n | both | no audio | no video | audio effect, 95% interval |",
                      "|---|---|---|---:|---:|---:|---:|---:|"]
            for arm, kind, template, row in by_template[split]:
                lines.append(f"| {titles[arm]} | {KIND_LABELS.get(kind, kind)} | `{template}` | {row['n']} | "
                             + " | ".join(_pct(row[k]) for k in ("both", "no_audio", "no_video"))
                             + f" | {_interval(row['audio_effect'])} |")
            lines.append("")

    if sweep:
        lines += ["## Budget sweep", "",
                  "Every arm at each budget (the stages' steps scaled alike, equal totals per arm). Mean ± std over "
                  "seeds (n), per split and compared kind.", ""]
        for split in splits:
            lines += [f"### {SPLIT_TITLES[split]}", ""]
            lines.append("| arm | kind | " + " | ".join(f"{steps[s]} steps" for s in scales) + " |")
            lines.append("|---|---|" + "---:|" * len(scales))
            for kind in compared:
                for arm in arms:
                    cells = []
                    for s in scales:
                        entry = sweep[split][s][0].get(arm, {}).get(kind)
                        cells.append("n/a" if not entry else f"{_mean_std(entry)} ({entry['n']})")
                    lines.append(f"| {titles[arm]} | {KIND_LABELS.get(kind, kind)} | " + " | ".join(cells) + " |")
            lines.append("")
        plot_sweep(out / "sweep.png", compared, arms, titles, sweep, steps, colors)
        lines += ["![budget sweep](sweep.png)", ""]

    if experiment.measure_connector:
        per_arm = {}
        for arm in arms:
            first = next((r["connector"] for r in by_arm[arm] if r.get("connector")), None) or {}
            times = [r["training"]["time_s"] for r in by_arm[arm]]
            per_arm[arm] = {"type": first.get("type"), "parameters": first.get("parameters"),
                            "image_tokens": first.get("image_tokens"), "time_s": sum(times) / len(times)}
        lines += ["## Connectors", "",
                  "Parameters of the model's vision connector module; LLM tokens the processor gives the first "
                  "test image (its placeholder expansion); training time: the stages' time from `summary.json` "
                  "(mean over seeds; model builds and feature-cache fills not included).", "",
                  "| connector | type | parameters | LLM tokens per image | training time (min) |",
                  "|---|---|---:|---:|---:|"]
        for arm in arms:
            p = per_arm[arm]
            params = f"{p['parameters']:,}" if p["parameters"] is not None else "n/a"
            tokens = p["image_tokens"] if p["image_tokens"] is not None else "n/a"
            lines.append(f"| {titles[arm]} | `{p['type']}` | {params} | {tokens} | {p['time_s'] / 60:.1f} |")
        plot_connectors(out / "connectors.png", arms, titles, per_arm, colors)
        lines += ["", "![connectors](connectors.png)", ""]

    lines += ["## Runs", "", "Scores as " + " / ".join(f"`{s}`" for s in splits) + " (%).", "",
              "| run | recipe | stage steps | " + " | ".join(KIND_LABELS.get(k, k) for k in kinds)
              + " | final loss | training (s) | evaluation (s) | date |",
              "|---|---|---|" + "---:|" * (len(kinds) + 3) + "---|"]
    for r in every:
        steps = " + ".join(str(n) for n in r["overrides"]["stage_steps"].values())
        per_split = split_scores(r)
        scores = [" / ".join(_pct(per_split.get(s, {}).get(k, {}).get("score")) for s in splits) for k in kinds]
        loss = r["training"].get("final_loss_smoothed")
        lines.append(f"| [{r['run']}](results/{r['run']}.json) | {r['recipe']} | {steps} | " + " | ".join(scores)
                     + f" | {'n/a' if loss is None else f'{loss:.3f}'} | {r['training']['time_s']:.0f}"
                     + (" (resumed)" if r["training"].get("resumed") else "") + " | "
                     f"{r['evaluation']['wall_s']:.0f} | {r['date']} |")
    if any(r["training"].get("resumed") for r in every):
        lines += ["", "(resumed): the training was interrupted and resumed; its time counts the resumed part of the "
                  "interrupted stage only."]
    lines += ["", "Overrides applied to the loaded recipes (besides `seed` and `stage_steps`):", ""]
    for arm in arms:
        extra = {k: v for k, v in by_arm[arm][0]["overrides"].items() if k not in ("seed", "stage_steps")}
        shown = ", ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in extra.items()) or "none"
        lines.append(f"- {titles[arm]} (`{by_arm[arm][0]['recipe']}`): {shown}")
    lines.append("")
    path = out / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
