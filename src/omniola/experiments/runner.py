"""Running an experiment: every (arm, seed, scale) trained, evaluated on the tiny world's test and out-of-template
splits, and recorded.

Layout of `OUT` (default `<omniola home>/experiments/<name>`); a run is `<arm>-seed<k>` at scale 1 and
`<arm>-seed<k>-x<scale>` at another scale (a budget sweep, `scales=`):

    plan.json                      every run asked for so far (arm, seed, scale, steps): the report lists the missing
    runs/<run>/                    the trainer's run folder (metrics.jsonl, loss.png, summary.json, final -> ...),
                                   a link into `<OUT's parent>/shared-runs/`: experiments share identical runs
    runs/<run>/experiment.json     the recipe's digest and the effective overrides (a resumed run must match)
    eval/<run>/                    the evaluation harness's files (tiny.json, tiny.predictions.jsonl, tiny.md)
    results/<run>.json             scores per split (test, oot), each question's outcome (`outcomes`, for the
                                   report's paired confidence intervals), training and evaluation figures, date,
                                   machine
    failed/<run>.json              why a run failed (removed when a later attempt succeeds)
    report.md, *.png               the report (see `omniola.experiments.report`)

Resumable at every level: a run whose result file exists is skipped; a finished training (its `final` model) is
only evaluated; an interrupted training continues through the trainer's `resume=True`. A run that fails is
recorded in `failed/` and the others go on; the command then ends with an error naming them. Runs go scale by scale
(the largest first), and within a scale seed by seed (every arm with seed 0, then every arm with seed 1, ...), so
an interrupted experiment has whole comparisons first.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OmniolaError
from ..evaluation import evaluate, word_error_rate
from ..training import train as train_recipe
from ..training.trainer import check_record_files
from .budget import scaled_total
from .definitions import (
    Arm,
    Experiment,
    apply_overrides,
    get_experiment,
    load_arm_recipe,
    recipe_steps,
    tiny_world_root,
)


class ExperimentIncomplete(OmniolaError):
    """Some runs of an experiment failed; the rest were made and the report written (it lists what is missing)."""


RESULT_FORMAT = 2  # 2: `scores` per split ({"test": {...}, "oot": {...}}); 1: the test split's kinds only
EVAL_SEED = 0


@dataclass
class PlannedRun:
    """One (arm, seed): the recipe with its overrides applied, and where it goes."""

    arm: Arm
    seed: int
    recipe: Any
    overrides: dict
    world: Path
    scale: float = 1.0
    total_steps: int = 0

    @property
    def run_id(self) -> str:
        return run_name(self.arm.name, self.seed, self.scale)


def run_name(arm: str, seed: int, scale: float) -> str:
    """`<arm>-seed<k>` at scale 1 (the full budget), `<arm>-seed<k>-x<scale>` at any other."""
    return f"{arm}-seed{seed}" + ("" if scale == 1 else f"-x{scale:g}")


def default_out(name: str) -> Path:
    from ..inference import omniola_home

    return omniola_home() / "experiments" / name


def machine_info() -> dict:
    """Where a run ran: platform, CPU count, torch version and threads, GPU if any."""
    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(value))


def question_outcomes(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Each question's outcome per split and kind, in the evaluation's order: what the report's paired bootstrap
    resamples. Modality-removal copies go under `<kind>/no_audio` and `<kind>/no_video`.

    Per split and kind `{"ids": digest of the question ids, "values": "..."}`, the values space-separated, one per
    question: exact match `1` or `0` (unparsable counts as wrong, as in the score), WER `errors/reference words`,
    `-` for a question left out of the score (failed, invalid). The digest ignores the removal suffix, so a kind and
    its removal copies share it when asked of the same questions. Questions with a template (the tiny world's
    `meta.template`) add `"templates"`, likewise one per question (`-` for none), for the report's per-template
    control.
    """
    columns: dict[str, dict[str, tuple[list[str], list[str], list[str]]]] = {}
    for r in records:
        key = r["kind"] + (f"/no_{r['removed']}" if "removed" in r else "")
        ids, values, templates = columns.setdefault(r.get("split", "test"), {}).setdefault(key, ([], [], []))
        ids.append(r["id"].rsplit("/no_", 1)[0] if "removed" in r else r["id"])
        templates.append("_".join(str(r.get("template") or "-").split()))
        if r["outcome"] == "transcribed":
            wer = word_error_rate([r["normalized_reference"]], [r["normalized_prediction"]])
            errors = wer["substitutions"] + wer["deletions"] + wer["insertions"]
            values.append(f"{errors}/{wer['reference_words']}")
        else:
            values.append({"correct": "1", "wrong": "0", "unparsable": "0"}.get(r["outcome"], "-"))

    def column(ids: list[str], values: list[str], templates: list[str]) -> dict:
        entry = {"ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16], "values": " ".join(values)}
        return {**entry, "templates": " ".join(templates)} if set(templates) != {"-"} else entry

    return {split: {key: column(*lists) for key, lists in kinds.items()} for split, kinds in columns.items()}


def plan(experiment: Experiment, *, arms: Sequence[str] | None = None, seeds: int | None = None,
         scales: Sequence[float] = (1.0,), data: str | os.PathLike | None = None) -> list[PlannedRun]:
    """The runs of an experiment, the largest scale first and seed-major within a scale, each with its scale's
    common step budget (`total_steps`, equal for every arm); checks everything before any training.

    Raises:
        ConfigError: an unknown arm, arms with different step budgets, a scale too small for the stages, an
            override that does not fit, or missing data (the recipe loader's and trainer's messages).
    """
    chosen = [experiment.arm(a) for a in arms] if arms else list(experiment.arms)
    if not chosen:
        raise ConfigError("no arms chosen")
    n_seeds = experiment.default_seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n_seeds}")
    recipes = {arm.name: load_arm_recipe(arm) for arm in chosen}
    totals = {name: sum(recipe_steps(r, name)) for name, r in recipes.items()}
    if len(set(totals.values())) > 1:
        raise ConfigError(f"experiment {experiment.name!r}: its arms' recipes have different step budgets {totals}; "
                          "arms are compared at equal total steps")
    if not scales:
        raise ConfigError("no scale given")
    world_override = Path(data) if data is not None else None
    runs = []
    for scale in sorted(set(scales), reverse=True):
        total = scaled_total(next(iter(totals.values())), scale)
        for seed in range(n_seeds):
            for arm in chosen:
                recipe, overrides = apply_overrides(recipes[arm.name], arm, seed=seed, total_steps=total,
                                                    tiny_world=world_override)
                world = world_override or tiny_world_root(recipe)
                if world is None:
                    raise ConfigError(f"{recipe.path}: no tiny-world source to evaluate on; give --data (a tiny "
                                      "world)")
                runs.append(PlannedRun(arm, seed, recipe, overrides, world, scale, total))
    from ..data.tiny_world import tiny_world_files

    for run in runs[: len(chosen)]:  # the data does not depend on the seed
        check_record_files(run.recipe)
        try:
            tiny_world_files(run.world, "test", list(experiment.kinds))
        except ConfigError as err:
            raise ConfigError(f"evaluation data of arm {run.arm.name!r}: {err}") from err
    return runs


def image_tokens(processor, world: Path) -> int | None:
    """LLM tokens the processor gives the first image of the tiny world's test split (placeholders counted)."""
    from ..evaluation import load_task

    task = load_task("tiny", world, split="test", kinds=["image_qa"], limit=1)
    for sample in task.samples:
        if sample.error is not None:
            continue
        parts = [p for m in sample.get_messages() if isinstance(m["content"], list) for p in m["content"]]
        image = next((p for p in parts if p["type"] == "image"), None)
        if image is None:
            continue
        messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is shown?"}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        return processor.modality_token_counts(inputs["input_ids"])["image"]
    return None


def connector_measures(model, processor, world: Path) -> dict:
    connector = model.model.vision_connector
    return {
        "type": dict(model.config.vision_connector or {}).get("type"),
        "spec": _plain(model.config.vision_connector),
        "parameters": sum(p.numel() for p in connector.parameters()) if connector is not None else 0,
        "image_tokens": image_tokens(processor, world),
    }


def _prune_stages(run_dir: Path, final: Path) -> list[str]:
    """Removes the intermediate stages' full models (their LoRA adapters, metrics and the final model stay)."""
    removed = []
    keep = final.resolve()
    for model_dir in sorted(run_dir.glob("[0-9][0-9]-*/model")):
        if model_dir.resolve() != keep:
            shutil.rmtree(model_dir)
            removed.append(str(model_dir.relative_to(run_dir)))
    return removed


def recipe_digest(recipe) -> str:
    """sha256 of the recipe file's text (a run trained from an edited recipe is another run)."""
    return hashlib.sha256(Path(recipe.path).read_bytes()).hexdigest()


def shared_run_dir(out: Path, run: PlannedRun) -> Path:
    """Where a run trains: `<out's parent>/shared-runs/<recipe>-<key>`, keyed by the recipe file and the effective
    overrides, so that experiments with the same arm (e.g. `tiny` at seed 0 is in all three) train it once;
    `out/runs/<arm>-seed<k>` links there."""
    key = json.dumps({"recipe": recipe_digest(run.recipe), "overrides": _plain(run.overrides)}, sort_keys=True)
    return out.parent / "shared-runs" / f"{run.recipe.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _check_same(path: Path, recorded: dict, wanted: dict, what: str) -> None:
    diff = {k: (recorded.get(k), v) for k, v in _plain(wanted).items() if recorded.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ConfigError(f"{path} holds {what} made with other settings ({shown}); use another --out, or delete it "
                          "to redo the run")


def run_one(experiment: Experiment, run: PlannedRun, out: Path, *, limit: int | None, batch_size: int,
            feature_cache: Path | None, keep_stages: bool, progress: bool, log: Callable[[str], None], prefix: str,
            command: str | None) -> dict:
    """Trains (or resumes) one run, evaluates its final model, writes and returns its result."""
    from ..inference import load_model

    run_dir = out / "runs" / run.run_id
    shared = shared_run_dir(out, run)
    if not run_dir.exists() and not run_dir.is_symlink():
        shared.mkdir(parents=True, exist_ok=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.symlink_to(os.path.relpath(shared, run_dir.parent), target_is_directory=True)
    marker = run_dir / "experiment.json"
    identity = {"recipe": run.recipe.name, "recipe_sha256": recipe_digest(run.recipe), "overrides": run.overrides}
    if marker.is_file():
        _check_same(run_dir, json.loads(marker.read_text()), identity, "a run")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} holds files but no experiment.json; it is not a run of this experiment")
    else:
        _write_json(marker, identity)

    start = time.perf_counter()
    final = run_dir / "final"
    resumed = (run_dir / "metrics.jsonl").is_file()
    if (final / "config.json").is_file():
        log(f"{prefix} {run.run_id}: already trained, evaluating")
        train_wall = None
    else:
        steps = " + ".join(str(n) for n in run.overrides["stage_steps"].values())
        log(f"{prefix} {run.run_id}: {'resuming' if resumed else 'training'} {run.recipe.name} for "
            f"{run.total_steps} steps ({steps}) into {run_dir}")
        train_recipe(run.recipe, run_dir, resume=True, progress=progress, feature_cache_dir=feature_cache)
        train_wall = round(time.perf_counter() - start, 1)
    summary = json.loads((run_dir / "summary.json").read_text())

    kinds = list(experiment.kinds)
    log(f"{prefix} {run.run_id}: evaluating {', '.join(kinds)} ({limit or 'all'} questions each of the test and the "
        "out-of-template split" + (", with the modality-removal control" if experiment.modality_removal else "") + ")")
    eval_start = time.perf_counter()
    model, processor = load_model(final)  # the GPU when there is one, else the CPU
    ev = evaluate(model, processor, "tiny", data=run.world, split=None, kinds=kinds, limit=limit,
                  batch_size=batch_size, seed=EVAL_SEED, out=out / "eval" / run.run_id, progress=progress,
                  modality_removal=experiment.modality_removal)
    eval_wall = round(time.perf_counter() - eval_start, 1)
    connector = connector_measures(model, processor, run.world) if experiment.measure_connector else None
    del model, processor
    gc.collect()

    keys = ("metric", "score", "evaluated", "questions", "unparsable", "failed", "invalid")
    stages = summary.get("stages", [])
    result = {
        "format": RESULT_FORMAT,
        "experiment": experiment.name,
        "arm": run.arm.name,
        "label": run.arm.title,
        "seed": run.seed,
        "run": run.run_id,
        "recipe": run.recipe.name,
        "recipe_path": str(run.recipe.path),
        "overrides": _plain(run.overrides),
        "scale": run.scale,
        "total_steps": run.total_steps,
        "evaluation": {"task": "tiny", "splits": list(ev["splits"]), "data": str(run.world), "kinds": kinds,
                       "limit": limit, "batch_size": batch_size, "seed": EVAL_SEED, "decoding": "greedy",
                       "modality_removal": experiment.modality_removal, "counts": ev["counts"], "wall_s": eval_wall,
                       "seconds_per_sample": ev["timing"]["seconds_per_sample"]},
        "scores": {split: {kind: {k: s.get(k) for k in keys} for kind, s in entry["scores"].items() if kind in kinds}
                   for split, entry in ev["splits"].items()},
        "modality_removal": {split: entry["modality_removal"] for split, entry in ev["splits"].items()
                             if "modality_removal" in entry} or None,
        "outcomes": question_outcomes(ev["predictions"]),
        "training": {
            "time_s": round(sum(s["wall_s"] for s in stages), 1),  # the stages' own time, from summary.json
            "wall_s": train_wall,  # this invocation's whole train() call (model builds, cache fills); None: earlier
            # a stage interrupted and resumed: its wall_s covers only the part after the resume
            "resumed": any(s.get("trained_steps_this_run", s["steps"]) < s["steps"] for s in stages),
            "stages": stages,
            "final_loss_smoothed": stages[-1]["final_loss_smoothed"] if stages else None,
            "peak_rss_mib": summary.get("peak_rss_mib"),
        },
        "connector": connector,
        "wall_s": round(time.perf_counter() - start, 1),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": command,
        "files": {"run": str(run_dir.relative_to(out)), "model": str(final.relative_to(out)),
                  "eval": f"eval/{run.run_id}/tiny.json"},
    }
    if not keep_stages:
        result["pruned"] = _prune_stages(run_dir, final)
    _write_json(out / "results" / f"{run.run_id}.json", result)
    return result


def describe_scores(result: dict) -> str:
    from .report import split_scores

    parts = []
    for split, scores in split_scores(result).items():
        for kind, s in scores.items():
            value = "n/a" if s["score"] is None else f"{100 * s['score']:.1f}%"
            parts.append(f"{split} {kind} {'WER ' if s['metric'] == 'wer' else ''}{value}")
    return " | ".join(parts)


def run_experiment(
    experiment: Experiment | str,
    out: str | os.PathLike | None = None,
    *,
    seeds: int | None = None,
    scale: float = 1.0,
    scales: Sequence[float] | None = None,
    limit: int | None = 100,
    arms: Sequence[str] | None = None,
    data: str | os.PathLike | None = None,
    feature_cache: str | os.PathLike | None = None,
    batch_size: int = 16,
    keep_stages: bool = False,
    report_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> Path:
    """Runs an experiment's arms one after another (skipping finished runs), then writes its report.

    Args:
        experiment: An `Experiment` or the name of a registered one (`omniola experiment --list`).
        out: Output folder (default `<omniola home>/experiments/<name>`); layout in the module docstring.
        seeds: Seeds per arm (0 .. N-1; default: the experiment's).
        scale: Multiplies the common step budget (see `omniola.experiments.budget`).
        scales: A budget sweep: every arm and seed at each of these scales (equal steps per arm at each), the
            largest first; runs already made at a scale (by this experiment or, through the shared runs, by
            another) are reused. Replaces `scale`.
        limit: Test questions per evaluated kind (None: all).
        arms: Run only these arms (the report still shows every result found in `out`).
        data: A tiny world for training and evaluation instead of the recipes' own.
        feature_cache: The trainer's feature cache folder (default `<omniola home>/feature_cache`, shared by runs).
        batch_size: Evaluation batch size.
        keep_stages: Keep every stage's full model (default: only the final one; intermediate stages' LoRA
            adapters, metrics and summaries stay).
        report_only: Only rebuild the report from `out/results/*.json`.
        progress: Progress bars of training and evaluation.
        log: Receives one line per step of the experiment.
        command: The command line, recorded in the results and the report.

    Returns:
        The report's path (`out/report.md`).

    Raises:
        ConfigError: bad settings (before any training), or results in `out` made with other settings.
        ExperimentIncomplete: some runs failed; the others were made and the report (which lists the missing runs
            and why) written.
    """
    from .report import write_report

    if isinstance(experiment, str):
        experiment = get_experiment(experiment)
    out = Path(out) if out is not None else default_out(experiment.name)
    if not report_only:
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        runs = plan(experiment, arms=arms, seeds=seeds, scales=scales or (scale,), data=data)
        budgets = ", ".join(dict.fromkeys(f"{r.total_steps} steps (scale {r.scale:g})" for r in runs))
        log(f"experiment {experiment.name}: {len(runs)} runs ({len({r.arm.name for r in runs})} arms x "
            f"{len({r.seed for r in runs})} seeds x {len({r.scale for r in runs})} budgets: {budgets}), into {out}")
        done = {}  # the runs with a result already: every one is checked before anything is trained
        for run in runs:
            path = out / "results" / f"{run.run_id}.json"
            if path.is_file():
                recorded = json.loads(path.read_text())
                _check_same(path, {**recorded, **recorded["evaluation"]},
                            {"format": RESULT_FORMAT, "overrides": run.overrides, "limit": limit,
                             "kinds": list(experiment.kinds)}, "a result")
                done[run.run_id] = add_outcomes(path, recorded, out)
        record_plan(out, runs, limit)
        failed = []
        for i, run in enumerate(runs, 1):
            prefix = f"[{i}/{len(runs)}]"
            if run.run_id in done:
                log(f"{prefix} {run.run_id}: done earlier ({describe_scores(done[run.run_id])})")
                continue
            failure = out / "failed" / f"{run.run_id}.json"
            try:
                result = run_one(experiment, run, out, limit=limit, batch_size=batch_size,
                                 feature_cache=Path(feature_cache) if feature_cache else None, keep_stages=keep_stages,
                                 progress=progress, log=log, prefix=prefix, command=command)
            except ConfigError:
                raise  # the settings or the files are wrong: every other run would fail the same way
            except Exception as err:  # this run failed (a crash, out of memory): record it, go on with the others
                failed.append(run.run_id)
                _write_json(failure, {"run": run.run_id, "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc(),
                                      "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
                log(f"{prefix} {run.run_id}: FAILED ({type(err).__name__}: {err}); recorded in {failure}, going on")
                gc.collect()
                continue
            failure.unlink(missing_ok=True)
            log(f"{prefix} {run.run_id}: {describe_scores(result)} (train {result['training']['time_s']:.0f} s, "
                f"eval {result['evaluation']['wall_s']:.0f} s, all {result['wall_s']:.0f} s)")
    else:  # results made before they kept their questions' outcomes (or templates) get them, from their predictions
        for path in sorted((out / "results").glob("*.json")):
            add_outcomes(path, json.loads(path.read_text(encoding="utf-8")), out)
    report = write_report(experiment, out, command=command)
    log(f"report: {report}")
    if not report_only and failed:
        raise ExperimentIncomplete(f"{len(failed)} run(s) failed: {', '.join(failed)} (why: {out / 'failed'}); the "
                                   f"report lists them as missing. Run the same command again to retry them")
    return report


def add_outcomes(path: Path, result: dict, out: Path) -> dict:
    """A result made before results kept each question's outcome (or its template): adds them from its evaluation's
    predictions file when that is still there (rewriting the result file), so the report can pair it with newer
    runs."""
    predictions = out / "eval" / result["run"] / "tiny.predictions.jsonl"
    if not predictions.is_file():
        return result
    with open(predictions, encoding="utf-8") as f:
        outcomes = question_outcomes([json.loads(line) for line in f if line.strip()])
    if outcomes == result.get("outcomes"):
        return result
    result = {**result, "outcomes": outcomes}
    _write_json(path, result)
    return result


def record_plan(out: Path, runs: Sequence[PlannedRun], limit: int | None) -> None:
    """Adds the runs asked for to `out/plan.json` (kept across invocations), so the report can name what is
    missing; a new evaluation limit starts the plan over (the old results no longer fit it)."""
    path = out / "plan.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    planned = recorded.get("runs", {}) if recorded.get("limit") == limit else {}
    for run in runs:
        planned[run.run_id] = {"arm": run.arm.name, "seed": run.seed, "scale": run.scale,
                               "total_steps": run.total_steps}
    _write_json(path, {"limit": limit, "runs": planned})
