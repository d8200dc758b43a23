"""Experiments: equal step budgets after scaling, Figure-3 normalisation, the report, and end-to-end two-arm
experiments on a micro random model and the small tiny world (interrupted, resumed, skipped, report rebuilt; a
budget sweep reusing finished runs; a failed run recorded while the others go on)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from conftest import micro_model_and_world
from typer.testing import CliRunner

from omniola import OlaForConditionalGeneration
from omniola.errors import ConfigError
from omniola.experiments import (
    EXPERIMENTS,
    Arm,
    Experiment,
    apply_overrides,
    budget_stages,
    distribute_steps,
    get_experiment,
    normalise,
    plan,
    run_experiment,
    runner,
    scaled_total,
    write_report,
)
from omniola.evaluation import word_error_rate
from omniola.experiments.report import paired_bootstrap, why_missing
from omniola.files import FolderLock
from omniola.training.trainer import LOCK_FILE
from omniola.experiments.runner import ExperimentIncomplete, question_outcomes
from omniola.training import load_recipe
from omniola.training.recipe import packaged_recipe

SHIPPED = ("tiny", "tiny-direct-mix", "tiny-balanced")


# ------------------------------------------------------------------------------------------------ step budgets
def test_largest_remainder_on_hand_checked_cases():
    assert distribute_steps([3, 5, 2], 4) == [1, 2, 1]  # quotas 1.2, 2.0, 0.8: whole parts 1, 2, 0 -> min 1
    assert distribute_steps([2, 3, 5], 7) == [1, 2, 4]  # quotas 1.4, 2.1, 3.5: the spare step to the .5
    assert distribute_steps([1, 1, 8], 3) == [1, 1, 1]  # minimum of one step: the big stage gives one back
    assert distribute_steps([150, 150, 100, 120, 240], 114) == [23, 22, 15, 18, 36]  # tie .5/.5: earlier stage
    assert distribute_steps([150, 150, 100, 120, 240], 760) == [150, 150, 100, 120, 240]
    assert distribute_steps([7], 3) == [3]
    assert scaled_total(760, 0.15) == 114 and scaled_total(5, 0.5) == 3  # halves round up (round(2.5) == 2)
    with pytest.raises(ConfigError, match="larger --scale"):
        distribute_steps([1, 1, 1], 2)
    with pytest.raises(ConfigError, match="positive"):
        scaled_total(760, 0.0)


@pytest.mark.parametrize("scale", [0.02, 0.05, 0.1, 0.15, 0.2, 0.33, 0.5, 0.77, 1.0, 1.7])
def test_scaled_shipped_recipes_keep_equal_totals(scale):
    recipes = {name: load_recipe(packaged_recipe(name)) for name in SHIPPED}
    totals = {sum(s.steps for s in budget_stages(r)) for r in recipes.values()}
    assert totals == {340}
    total = scaled_total(340, scale)
    for name, recipe in recipes.items():
        scaled, effective = apply_overrides(recipe, Arm(name, name), seed=2, total_steps=total)
        steps = [s.steps for s in budget_stages(scaled)]
        assert sum(steps) == total and min(steps) >= 1, (name, steps)
        assert list(effective["stage_steps"].values()) == steps and effective["seed"] == scaled.seed == 2
        # the tower pretraining every arm starts with is outside the budget: never scaled
        assert [(s.name, s.steps) for s in scaled.stages if s.objective == "siglip"] == [("tower", 500)]
        if scale == 1.0:
            assert steps == [s.steps for s in budget_stages(recipe)]
        quotas = [total * s.steps / 340 for s in budget_stages(recipe)]
        assert all(abs(n - q) < 1 for n, q in zip(steps, quotas)) or min(quotas) < 1
    assert [s.steps for s in recipes["tiny"].stages] == [500, 50, 90, 60, 500, 140]  # the loaded recipe: untouched


def test_overrides_change_the_loaded_recipe_only():
    tiny = load_recipe(packaged_recipe("tiny"))
    arm = get_experiment("connectors").arm("qformer")
    recipe, effective = apply_overrides(tiny, arm, seed=1, total_steps=340)
    assert recipe.model["build"]["vision_connector"] == {"type": "qformer"} == effective["vision_connector"]
    assert "vision_connector" not in tiny.model["build"]

    arm = get_experiment("cross-modal-data").arm("without-cross")
    recipe, effective = apply_overrides(tiny, arm, seed=0, total_steps=340, tiny_world=Path("/elsewhere"))
    assert all("video_cross_qa" not in s.data for s in recipe.stages)
    assert "video_cross_qa" in tiny.stages[-1].data
    assert [s.steps for s in recipe.stages] == [500, 50, 90, 60, 500, 140]
    assert effective["drop_sources"] == ["video_cross_qa"] and effective["tiny_world"] == "/elsewhere"
    assert {s.data_root for s in recipe.sources.values()} == {Path("/elsewhere")}

    with pytest.raises(ConfigError, match="registered"):
        apply_overrides(tiny, Arm("x", "tiny", {"vision_connector": {"type": "perceiver"}}), seed=0, total_steps=340)
    with pytest.raises(ConfigError, match="no stage uses"):
        apply_overrides(tiny, Arm("x", "tiny", {"drop_sources": ["speech"]}), seed=0, total_steps=340)
    with pytest.raises(ConfigError, match="unknown override"):
        Arm("x", "tiny", {"lr": 1.0})


# ------------------------------------------------------------------------------------------- normalisation, report
def test_figure3_normalisation_on_hand_computed_numbers():
    acc = normalise({"progressive": [0.8, 0.6], "mix": [0.35, 0.35]}, "progressive", "exact_match")
    assert acc["progressive"]["mean"] == pytest.approx(1.0)
    assert acc["progressive"]["points"] == pytest.approx([0.8 / 0.7, 0.6 / 0.7])
    assert acc["progressive"]["std"] == pytest.approx((0.2 / 0.7) / 2 ** 0.5)  # sample std of two points
    assert acc["mix"]["mean"] == pytest.approx(0.5) and acc["mix"]["std"] == pytest.approx(0.0)
    # WER: lower is better, so inverted: reference mean / arm
    wer = normalise({"progressive": [0.1, 0.3], "mix": [0.4]}, "progressive", "wer")
    assert wer["mix"]["mean"] == pytest.approx(0.2 / 0.4) and wer["mix"]["std"] is None
    assert wer["progressive"]["mean"] == pytest.approx(1.0)
    assert wer["progressive"]["points"] == pytest.approx([2.0, 2 / 3])
    assert normalise({"p": [0.0], "m": [0.5]}, "p", "exact_match")["m"]["mean"] is None  # undefined, not inf


def test_question_outcomes_and_the_paired_bootstrap_on_hand_checked_cases():
    def asr(i, ref, hyp):
        return {"id": f"a{i}", "split": "oot", "kind": "asr", "outcome": "transcribed", "normalized_reference": ref,
                "normalized_prediction": hyp}

    said = [("the cat sat", "the cat sat"), ("a red ball", "a bed"), ("go", "go now please")]
    records = [{"id": "q0", "split": "test", "kind": "qa", "template": "how many", "outcome": "correct"},
               {"id": "q1", "split": "test", "kind": "qa", "template": "name", "outcome": "unparsable"},
               {"id": "q2", "split": "test", "kind": "qa", "outcome": "failed"},
               {"id": "q0/no_audio", "split": "test", "kind": "qa", "removed": "audio", "outcome": "wrong"},
               {"id": "q1/no_audio", "split": "test", "kind": "qa", "removed": "audio", "outcome": "correct"},
               {"id": "q2/no_audio", "split": "test", "kind": "qa", "removed": "audio", "outcome": "correct"},
               *(asr(i, r, h) for i, (r, h) in enumerate(said))]
    out = question_outcomes(records)
    assert out["test"]["qa"]["values"] == "1 0 -" and out["test"]["qa/no_audio"]["values"] == "0 1 1"
    assert out["test"]["qa"]["ids"] == out["test"]["qa/no_audio"]["ids"]  # the same questions, paired
    assert out["test"]["qa"]["templates"] == "how_many name -"  # one token per question, for the per-template control
    assert "templates" not in out["test"]["qa/no_audio"] and "templates" not in out["oot"]["asr"]  # none had one
    assert out["oot"]["asr"]["values"] == "0/3 2/3 2/1"  # a red ball -> a bed: 1 substitution, 1 deletion
    pooled = word_error_rate([r for r, _ in said], [h for _, h in said])
    assert pooled["wer"] == pytest.approx(4 / 7)  # what the runs' scores are: errors pooled over utterances

    # the point estimate is the difference of the seeds' mean scores; the interval holds it
    a = [["1", "0", "0", "1"] * 25, ["1", "1", "0", "0"] * 25]  # two seeds at 50%
    b = [["1", "1", "0", "1"] * 25]  # 75%
    d = paired_bootstrap(a, b)
    assert d["difference"] == pytest.approx(0.25) and d["low"] < 0.25 < d["high"] and d["low"] > 0
    assert paired_bootstrap(b, b) == {"difference": 0.0, "low": 0.0, "high": 0.0}  # paired: no noise at all
    same_score = paired_bootstrap([["1", "0"] * 50], [["0", "1"] * 50])  # equal scores, other questions right
    assert same_score["difference"] == 0.0 and same_score["low"] < -0.1 and same_score["high"] > 0.1
    # WER, pooled per run; a question left out of a run ("-") counts in neither numerator nor denominator
    wer = paired_bootstrap([["1/4", "1/4"] * 50], [["2/4", "-"] * 50])
    assert wer["difference"] == pytest.approx(0.5 - 0.25) and wer["low"] > 0
    assert paired_bootstrap(a, [["1"] * 99]) is None  # not the same questions


def fake_result(arm: str, seed: int, scores: dict[str, float], label: str | None = None) -> dict:
    return {
        "format": 1, "experiment": "fake", "arm": arm, "label": label or arm, "seed": seed, "run": f"{arm}-seed{seed}",
        "recipe": "tiny", "overrides": {"seed": seed, "stage_steps": {"a": 2, "b": 2}}, "scale": 0.1,
        "total_steps": 4,
        "evaluation": {"split": "test", "data": "/w", "seed": 0, "limit": 5, "wall_s": 1.0, "kinds": list(scores)},
        "scores": {k: {"metric": "wer" if k == "asr" else "exact_match", "score": v} for k, v in scores.items()},
        "training": {"time_s": 60.0, "final_loss_smoothed": 1.5},
        "connector": {"type": arm, "parameters": 1000 * (seed + 1), "image_tokens": 34},
        "date": "2026-11-22T08:00:00+00:00", "machine": {"platform": "Linux", "torch": "2.13.0"},
        "command": "omniola experiment fake", "files": {"run": f"runs/{arm}-seed{seed}"},
    }


def test_report_from_result_files(tmp_path):
    experiment = Experiment("fake", "Fake", "A made-up comparison.", (Arm("prog", "tiny"), Arm("mix", "tiny")),
                            kinds=("image_qa", "asr"), reference="prog", measure_connector=True)
    results = [fake_result("prog", 0, {"image_qa": 0.8, "asr": 0.1}),
               fake_result("prog", 1, {"image_qa": 0.6, "asr": 0.3}),
               fake_result("mix", 0, {"image_qa": 0.35, "asr": 0.4}),
               fake_result("mix", 1, {"image_qa": 0.35, "asr": 0.4})]
    (tmp_path / "results").mkdir()
    for r in results:
        (tmp_path / "results" / f"{r['run']}.json").write_text(json.dumps(r))
    (tmp_path / "results" / "other.json").write_text(json.dumps({**results[0], "experiment": "another"}))
    text = write_report(experiment, tmp_path, command="omniola experiment fake --report-only").read_text()
    assert "| prog | 2 | 70.0 ± 14.1 | 20.0 ± 14.1 |" in text and "| mix | 2 | 35.0 ± 0.0 | 40.0 ± 0.0 |" in text
    assert "| mix | 0.50 ± 0.00 | 0.50 ± 0.00 |" in text  # image 0.35 / 0.7; ASR 0.2 / 0.4
    assert "**prog** is best with 70.0%, 35.0 points higher than mix (35.0%)" in text
    assert "ranges do not overlap (60.0-80.0% vs 35.0-35.0% over 2 and 2 seeds)" in text
    assert "**prog** is best with 20.0%, 20.0 points lower than mix" in text
    assert "ranges do not overlap (10.0-30.0% vs 40.0-40.0%" in text
    assert "| prog | `prog` | 1,000 | 34 | 1.0 |" in text
    assert "omniola experiment fake --report-only" in text and "**Seeds:** prog: 0, 1; mix: 0, 1" in text
    for png in ("scores.png", "normalised.png", "connectors.png"):
        assert (tmp_path / png).stat().st_size > 5000
    # overlapping seeds are called so
    overlapping = fake_result("mix", 1, {"image_qa": 0.7, "asr": 0.4})
    (tmp_path / "results" / "mix-seed1.json").write_text(json.dumps(overlapping))
    text = write_report(experiment, tmp_path).read_text()
    assert "ranges overlap (60.0-80.0% vs 35.0-70.0%" in text
    with pytest.raises(ConfigError, match="nothing to report"):
        write_report(experiment, tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- end to end
RECIPE = """
name: {name}
model: {{from: {model}}}
data: {{tiny_world: {world}}}
sources:
  caption: {{tiny_world: caption}}
  image_qa: {{tiny_world: image_qa}}
  asr: {{tiny_world: asr}}
defaults: {{batch_size: 2, precision: fp32, save_every: 100, max_length: 4096}}
stages:
{stages}
"""
PROGRESSIVE = """  - {name: image, data: {caption: 1, image_qa: 1}, train: [vision_connector], lr: 1.0e-3, steps: 2}
  - {name: audio, data: {asr: 1}, train: [audio_connector], lr: 1.0e-3, steps: 1}"""
MIXED = """  - {name: mixed, data: {caption: 1, image_qa: 1, asr: 1}, train: [vision_connector, audio_connector],
     lr: 1.0e-3, steps: 3}"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro random model, the small tiny world, and two micro recipes with equal budgets (2 + 1 vs 3 steps)
    whose tiny world path does not exist (the experiment's `data` points them at the real one)."""
    root = micro_model_and_world(tmp_path_factory.mktemp("experiments"))
    for name, stages in (("progressive", PROGRESSIVE), ("mixed", MIXED)):
        (root / f"{name}.yaml").write_text(RECIPE.format(name=name, model=root / "micro", world=root / "missing",
                                                         stages=stages))
    return root


def micro_experiment(root: Path) -> Experiment:
    return Experiment("micro", "Micro", "Two micro arms.", (Arm("prog", root / "progressive.yaml"),
                                                            Arm("mix", root / "mixed.yaml")),
                      kinds=("image_qa", "asr"), reference="prog", measure_connector=True)


def test_experiment_runs_resumes_skips_and_rebuilds_its_report(world, tmp_path, monkeypatch):
    experiment = micro_experiment(world)
    out = tmp_path / "exp"
    options = {"scale": 2.0, "limit": 1, "data": world / "world", "feature_cache": tmp_path / "cache",
               "progress": False}
    calls = {"train": [], "evaluate": 0}
    real_train, real_evaluate = runner.train_recipe, runner.evaluate

    def interrupted_train(recipe, run_dir, **kwargs):  # killed after 2 optimizer steps of the first run
        calls["train"].append((Path(run_dir).name, kwargs["resume"]))
        real_train(recipe, run_dir, max_steps=2, **kwargs)
        raise KeyboardInterrupt

    def counting_train(recipe, run_dir, **kwargs):
        calls["train"].append((Path(run_dir).name, kwargs["resume"]))
        return real_train(recipe, run_dir, **kwargs)

    def counting_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        return real_evaluate(*args, **kwargs)

    # the recipes' own tiny world is missing: the loader's message, before anything runs
    with pytest.raises(ConfigError, match="no manifest.json"):
        run_experiment(experiment, out, **{**options, "data": None})
    assert not (out / "runs").exists()

    monkeypatch.setattr(runner, "evaluate", counting_evaluate)
    monkeypatch.setattr(runner, "train_recipe", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, out, **options)
    assert (out / "runs" / "prog-seed0-x2" / "01-image" / "checkpoints" / "latest").is_file()
    assert why_missing(out, "prog-seed0-x2").startswith("training stopped at step 2 of stage 'image'")
    assert why_missing(out, "mix-seed0-x2") == "not started"

    monkeypatch.setattr(runner, "train_recipe", counting_train)
    lines = []
    report = run_experiment(experiment, out, log=lines.append, command="omniola experiment micro", **options)
    assert calls["train"] == [("prog-seed0-x2", True), ("prog-seed0-x2", True), ("mix-seed0-x2", True)]
    assert calls["evaluate"] == 2
    assert any("prog-seed0-x2: resuming" in line for line in lines)
    assert any("mix-seed0-x2: training" in line for line in lines)

    for run, stages in (("prog-seed0-x2", {"image": 4, "audio": 2}), ("mix-seed0-x2", {"mixed": 6})):
        result = json.loads((out / "results" / f"{run}.json").read_text())
        assert result["overrides"]["stage_steps"] == stages and result["total_steps"] == 6  # scale 2: 3 -> 6 steps
        assert result["overrides"]["tiny_world"] == str(world / "world")
        assert set(result["scores"]) == {"test", "oot"} and set(result["scores"]["oot"]) == {"image_qa", "asr"}
        test = result["scores"]["test"]
        assert test["asr"]["metric"] == "wer" and test["image_qa"]["evaluated"] == 1
        # each question's outcome, for the report's paired intervals: one per question, WER as errors/words
        assert result["outcomes"]["test"]["image_qa"]["values"] in ("0", "1")
        assert re.fullmatch(r"\d+/[1-9]\d*", result["outcomes"]["oot"]["asr"]["values"])
        assert result["connector"]["parameters"] > 0 and result["connector"]["image_tokens"] > 0
        assert result["machine"]["torch_threads"] >= 1 and result["command"] == "omniola experiment micro"
        assert result["training"]["resumed"] == (run == "prog-seed0-x2")
        metrics = (out / "runs" / run / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["global_step"] for line in metrics]
        assert steps == [1, 2, 3, 4, 5, 6]  # the interrupted run continued its curve, not restarted it
        assert (out / result["files"]["model"] / "config.json").is_file()
    model = OlaForConditionalGeneration.from_pretrained(out / "runs" / "prog-seed0-x2" / "final")
    result = json.loads((out / "results" / "prog-seed0-x2.json").read_text())
    assert result["connector"]["parameters"] == sum(p.numel() for p in model.model.vision_connector.parameters())
    assert not (out / "runs" / "prog-seed0-x2" / "01-image" / "model").exists()  # intermediate stage pruned
    assert any((tmp_path / "cache").iterdir())  # --feature-cache reached the trainer
    text = report.read_text()
    assert "## Findings" in text and "## Normalised to prog" in text and "## Differences to prog" in text
    assert "[prog-seed0-x2](results/prog-seed0-x2.json)" in text
    assert all((out / png).stat().st_size > 5000 for png in ("scores.png", "normalised.png", "connectors.png"))

    # again: nothing is trained or evaluated, the result files are untouched
    calls["train"].clear()
    calls["evaluate"] = 0
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    lines.clear()
    run_experiment(experiment, out, log=lines.append, **options)
    assert calls == {"train": [], "evaluate": 0}
    assert {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == stamps
    assert sum("done earlier" in line for line in lines) == 2
    with pytest.raises(ConfigError, match="other settings"):
        run_experiment(experiment, out, **{**options, "limit": 2})

    # another experiment with the same arm (same recipe file and overrides) shares the trained run: only evaluates
    other = Experiment("other", "Other", "", (Arm("same", world / "progressive.yaml"),), kinds=("image_qa",))
    run_experiment(other, tmp_path / "other", **options)
    assert calls == {"train": [], "evaluate": 1}
    assert (tmp_path / "other" / "runs" / "same-seed0-x2").resolve() == (out / "runs" / "prog-seed0-x2").resolve()
    assert json.loads((tmp_path / "other" / "results" / "same-seed0-x2.json").read_text())["scores"]["test"].keys() == {
        "image_qa"}
    calls["evaluate"] = 0

    # the CLI: --report-only rebuilds the report from the JSON files alone
    from omniola.cli import app

    monkeypatch.setitem(EXPERIMENTS, "micro", experiment)
    report.unlink()
    (out / "scores.png").unlink()
    made = json.loads((out / "results" / "mix-seed0-x2.json").read_text())
    older = {k: v for k, v in made.items() if k != "outcomes"}  # a result from before outcomes were kept
    (out / "results" / "mix-seed0-x2.json").write_text(json.dumps(older))
    cli = CliRunner().invoke(app, ["experiment", "micro", "--out", str(out), "--report-only"])
    assert cli.exit_code == 0, cli.output
    assert report.is_file() and (out / "scores.png").is_file() and calls == {"train": [], "evaluate": 0}
    # ... gets them back from its evaluation's predictions file
    assert json.loads((out / "results" / "mix-seed0-x2.json").read_text())["outcomes"] == made["outcomes"]


def test_budget_sweep_reuses_finished_runs_and_a_failed_run_does_not_stop_the_others(world, tmp_path, monkeypatch):
    experiment = micro_experiment(world)
    out = tmp_path / "exp"
    options = {"limit": 1, "data": world / "world", "feature_cache": tmp_path / "cache", "progress": False}
    runs = plan(experiment, scales=[0.5, 2, 1], data=world / "world")
    # the largest budget first, seed-major; every arm gets the same total at each scale
    assert [(r.run_id, r.total_steps) for r in runs] == [
        ("prog-seed0-x2", 6), ("mix-seed0-x2", 6), ("prog-seed0", 3), ("mix-seed0", 3),
        ("prog-seed0-x0.5", 2), ("mix-seed0-x0.5", 2)]
    for run in runs:
        assert sum(run.overrides["stage_steps"].values()) == run.total_steps

    trained = []
    real_train = runner.train_recipe

    def train(recipe, run_dir, **kwargs):
        trained.append(Path(run_dir).name)
        if Path(run_dir).name == "prog-seed0-x0.5" and failing:
            raise RuntimeError("boom")
        return real_train(recipe, run_dir, **kwargs)

    monkeypatch.setattr(runner, "train_recipe", train)
    failing = False
    run_experiment(experiment, out, scale=1.0, **options)
    assert trained == ["prog-seed0", "mix-seed0"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()}

    # the sweep: the scale-1 runs are reused (not trained, not evaluated again); the failed run is recorded and the
    # other run of its budget is still made; the command then fails, naming it
    trained.clear()
    failing = True
    with pytest.raises(ExperimentIncomplete, match=r"1 run\(s\) failed: prog-seed0-x0.5"):
        run_experiment(experiment, out, scales=[0.5, 1], **options)
    assert trained == ["prog-seed0-x0.5", "mix-seed0-x0.5"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((out / "failed" / "prog-seed0-x0.5.json").read_text())["error"] == "RuntimeError: boom"
    text = (out / "report.md").read_text()
    assert "**Missing runs: 1**" in text and "| prog-seed0-x0.5 | prog | 0 | 2 | failed: RuntimeError: boom |" in text
    assert "## Budget sweep" in text and "2 steps | 3 steps |" in text and (out / "sweep.png").stat().st_size > 5000
    assert json.loads((out / "results" / "mix-seed0-x0.5.json").read_text())["overrides"]["stage_steps"] == {
        "mixed": 2}

    # again: only the failed run is made, and the report no longer lists it
    trained.clear()
    failing = False
    run_experiment(experiment, out, scales=[0.5, 1], **options)
    assert trained == ["prog-seed0-x0.5"] and not (out / "failed" / "prog-seed0-x0.5.json").exists()
    assert "Missing runs" not in (out / "report.md").read_text()
    # shared runs: another experiment with the same arm at the same budget only evaluates it
    other = Experiment("other", "Other", "", (Arm("same", world / "mixed.yaml"),), kinds=("asr",))
    trained.clear()
    run_experiment(other, tmp_path / "other", scales=[0.5], **options)
    assert trained == [] and (tmp_path / "other" / "runs" / "same-seed0-x0.5").resolve() == (
        out / "runs" / "mix-seed0-x0.5").resolve()


def test_report_splits_modality_removal_and_sweep_from_result_files(tmp_path):
    experiment = Experiment("fake", "Fake", "", (Arm("prog", "tiny"), Arm("mix", "tiny"), Arm("bal", "tiny")),
                            kinds=("video_cross_qa",), reference="prog", modality_removal=True)

    def result(arm, seed, scale, test, oot, no_audio):
        r = fake_result(arm, seed, {})
        entry = {"metric": "exact_match"}
        r.update(format=2, scale=scale, total_steps=int(10 * scale), run=f"{arm}-seed{seed}-x{scale:g}",
                 scores={"test": {"video_cross_qa": {**entry, "score": test}},
                         "oot": {"video_cross_qa": {**entry, "score": oot}}},
                 modality_removal={"test": {"video_cross_qa": {
                     "both": {"score": test}, "no_audio": {"score": no_audio}, "no_video": {"score": 0.1},
                     "chance": 0.25}}})

        def asked(score):  # 10 questions, the first ones right
            return {"ids": "same", "values": " ".join("1" if i < round(10 * score) else "0" for i in range(10))}

        r["outcomes"] = {"test": {"video_cross_qa": asked(test), "video_cross_qa/no_audio": asked(no_audio)},
                         "oot": {"video_cross_qa": asked(oot)}}
        if (arm, seed, scale) == ("prog", 0, 1.0):  # the only result that kept the templates: the others borrow them
            r["outcomes"]["test"]["video_cross_qa"]["templates"] = "a a a a a b b b b b"
        return r

    (tmp_path / "results").mkdir()
    rows = [result("prog", 0, 1.0, 0.6, 0.4, 0.3), result("prog", 1, 1.0, 0.8, 0.2, 0.3),
            result("mix", 0, 1.0, 0.5, 0.5, 0.5), result("prog", 0, 0.5, 0.3, 0.3, 0.3),
            result("mix", 0, 0.5, 0.4, 0.1, 0.4)]
    for r in rows:
        (tmp_path / "results" / f"{r['run']}.json").write_text(json.dumps(r))
    (tmp_path / "plan.json").write_text(json.dumps({"limit": 5, "runs": {
        "mix-seed1": {"arm": "mix", "seed": 1, "scale": 1.0, "total_steps": 10},
        "bal-seed0": {"arm": "bal", "seed": 0, "scale": 1.0, "total_steps": 10}}}))
    text = write_report(experiment, tmp_path).read_text()
    # tables and findings at the largest budget, for each split; the missing seed is counted, never hidden
    assert "### In template (test split)" in text and "### Out of template (oot split)" in text
    assert "| prog | 2 | 70.0 ± 14.1 |" in text and "| mix | 1 of 2 | 50.0 |" in text
    assert "| mix-seed1 | mix | 1 | 10 | not started |" in text and "| bal-seed0 | bal | 0 | 10 | not started |" in text
    assert "**Arms without results at this budget:** bal" in text and "Seeds with results, of those asked for: mix 1 " \
        "of 2; bal 0 of 1." in text
    assert "| prog | 1.00 ± 0.20 |" in text  # test: 0.6 and 0.8 over 0.7
    assert "| mix | 1.67 |" in text  # oot: 0.5 over 0.3
    # the control: audio effect = both - no audio, per seed
    assert ("| prog | video QA (cross-modal) | 70.0 ± 14.1 | 30.0 ± 0.0 | 10.0 ± 0.0 | 25.0 ± 0.0 | 40.0 ± 14.1 |"
            in text)
    # differences to prog, paired over the questions: the seeds' mean difference inside its interval
    diffs = text.split("## Differences to prog")[1].split("## Modality-removal")[0]
    for split, point in (("In template", -20.0), ("Out of template", 20.0)):
        row = rf"{split}.*?\| mix \| {re.escape(f'{point:+.1f}')} \[(\S+), (\S+)\] \|"
        low, high = map(float, re.search(row, diffs, re.S).groups())
        assert low < point < high
    # the audio effect's interval: each question with and without its audio, per seed, averaged over the seeds
    low, high = map(float, re.search(r"\| 40.0 ± 14.1 \| \*\*\+40.0 \[(\S+), (\S+)\]\*\* \|", text).groups())
    assert 0 < low < 40 < high
    # per template: prog's right answers on `a` (q0-4) drop from 5 of 5 to 3 of 5 without the audio (q3, q4 lost in
    # both seeds: a draw of only q0-2 has no effect, so the interval reaches 0), on `b` (q5-9) from 1 and 3 of 5 to
    # none (q5 lost in both seeds); mix answers alike with and without it (no interval at all)
    by_template = text.split("### By question template")[1]
    assert "#### Out of template" not in by_template.split("## Budget sweep")[0]  # no control asked there
    row = r"\| prog \| video QA \(cross-modal\) \| `{}` \| 5 \| {} \| n/a \| (\**)\+40.0 \[(\S+), (\S+)\]\**"
    bold, low, high = re.search(row.format("a", r"100.0 \| 60.0"), by_template).groups()
    assert not bold and float(low) == 0.0 and 40 < float(high)
    bold, low, high = re.search(row.format("b", r"40.0 \| 0.0"), by_template).groups()
    assert bold and 0 < float(low) < 40 < float(high)
    assert "| mix | video QA (cross-modal) | `a` | 5 | 100.0 | 100.0 | n/a | +0.0 [+0.0, +0.0] |" in by_template
    # the sweep: the order flips on the test split between 5 and 10 steps
    assert "5 steps: mix 40.0, prog 30.0; 10 steps: prog 70.0, mix 50.0. **The order of the arms changes" in text
    assert "| prog | video QA (cross-modal) | 30.0 (1) | 70.0 ± 14.1 (2) |" in text
    for png in ("scores.png", "scores-oot.png", "normalised.png", "normalised-oot.png", "sweep.png"):
        assert (tmp_path / png).stat().st_size > 5000
    # a run whose trainer is at work (it holds the run folder's lock) is said to be so, not "stopped"
    with FolderLock(tmp_path / "runs" / "bal-seed0", LOCK_FILE, holder="trainer"):
        assert why_missing(tmp_path, "bal-seed0") == "being trained now"
    assert why_missing(tmp_path, "bal-seed0") == "not started"
    # without a reference arm (cross-modal-data, connectors): no Figure-3 normalisation, differences to the first arm
    text = write_report(dataclasses.replace(experiment, reference=None), tmp_path).read_text()
    assert "## Normalised" not in text and "## Differences to prog, with 95% confidence intervals" in text


def test_arms_must_share_a_budget(world, tmp_path):
    (tmp_path / "long.yaml").write_text((world / "mixed.yaml").read_text().replace("steps: 3", "steps: 4"))
    experiment = Experiment("uneven", "Uneven", "", (Arm("prog", world / "progressive.yaml"),
                                                     Arm("long", tmp_path / "long.yaml")), kinds=("asr",))
    with pytest.raises(ConfigError, match="different step budgets"):
        plan(experiment, data=world / "world")
    with pytest.raises(ConfigError, match="no arm 'nope'"):
        plan(micro_experiment(world), arms=["nope"])
    # a connector needs a recipe that builds its model
    arm = Arm("q", world / "mixed.yaml", {"vision_connector": {"type": "qformer"}})
    with pytest.raises(ConfigError, match="model.build"):
        plan(Experiment("c", "C", "", (arm,), kinds=("asr",)), data=world / "world")


def test_cli_lists_the_experiments():
    from omniola.cli import app

    result = CliRunner().invoke(app, ["experiment", "--list"])
    assert result.exit_code == 0, result.output
    for name in ("progressive-vs-mixing", "connectors", "cross-modal-data"):
        assert name in result.output
    result = CliRunner().invoke(app, ["experiment", "nope"])
    assert result.exit_code == 2 and "unknown experiment 'nope'" in result.output


def test_the_plain_tiny_arm_of_every_experiment_is_one_shared_run(tmp_path):
    from omniola.experiments.definitions import apply_overrides, get_experiment, load_arm_recipe
    from omniola.experiments.runner import PlannedRun, shared_run_dir

    dirs = set()
    for name, arm_name in (("progressive-vs-mixing", "progressive"), ("connectors", "ola_pooling"),
                           ("cross-modal-data", "with-cross")):
        arm = get_experiment(name).arm(arm_name)
        recipe, overrides = apply_overrides(load_arm_recipe(arm), arm, seed=0, total_steps=114)
        dirs.add(shared_run_dir(tmp_path / name, PlannedRun(arm, 0, recipe, overrides, tmp_path)))
    assert len(dirs) == 1
    arm = get_experiment("connectors").arm("qformer")  # a real override is another run
    recipe, overrides = apply_overrides(load_arm_recipe(arm), arm, seed=0, total_steps=114)
    assert shared_run_dir(tmp_path / "connectors", PlannedRun(arm, 0, recipe, overrides, tmp_path)) not in dirs
