"""The tiny task's modality-removal control: each video + audio question also asked without its audio and without its
frames, scored apart. A hand-made world whose answers are the length of a tone, and a fake generate whose answer is
a known function of the inputs it receives (audio and/or video placeholders), fix what the control must report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from omniola.data.tiny_world import write_video, write_wav
from omniola.errors import ConfigError
from omniola.evaluation import evaluate, load_task, runner
from omniola.evaluation.tasks import remove_modality

RATE, FPS = 16000, 4
CLIPS = {  # split -> [(tone seconds = the answer, template)]; oot has the audio kind only
    "test": [(1, "short"), (2, "long"), (3, "long"), (1, "short")],
    "oot": [(2, "short"), (1, "short")],
}
QUESTIONS = {  # kind -> question; the fake model needs the sound for the first two, the frames for the last two
    "video_audio_qa": "How many seconds does the tone last?",
    "video_cross_qa": "How many seconds does the tone last while the square shows?",
    "video_visual_qa": "What color is the square?",
}
SPLIT_KINDS = {"test": ("video_visual_qa", "video_audio_qa", "video_cross_qa"), "oot": ("video_audio_qa",)}


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def _world(root: Path) -> Path:
    """Clips of 1-3 s (a red square, a tone as long as the clip) as MP4 with the tone as sound track, the tone also
    as WAV; records of the video kinds in the tiny world's layout, and a manifest listing test and oot."""
    (root / "media").mkdir(parents=True)
    files: dict[str, dict[str, str]] = {}
    for split, clips in CLIPS.items():
        records: dict[str, list[dict]] = {kind: [] for kind in SPLIT_KINDS[split]}
        for n, (seconds, template) in enumerate(clips):
            frames = np.zeros((FPS * seconds, 32, 32, 3), np.uint8)
            frames[:, 8:24, 8:24] = (255, 0, 0)
            write_video(root / "media" / f"{split}{n}.mp4", frames, FPS, audio=_tone(seconds))
            write_wav(root / "media" / f"{split}{n}.wav", _tone(seconds))
            for kind in records:
                sound = {} if kind == "video_visual_qa" else {"audio": f"media/{split}{n}.wav"}
                marker = "<image>" if kind == "video_visual_qa" else "<speech><image>"
                answer = "red" if kind == "video_visual_qa" else str(seconds)
                records[kind].append({
                    "id": f"{split}_{kind}_{n}", "video": f"media/{split}{n}.mp4", **sound, "conversations": [
                        {"from": "human", "value": f"{marker}\n{QUESTIONS[kind]}"}, {"from": "gpt", "value": answer}],
                    "meta": {"kind": kind, "split": split, "template": template}})
        files[split] = {}
        for kind, kind_records in records.items():
            (root / f"{split}_{kind}.json").write_text(json.dumps(kind_records))
            files[split][kind] = f"{split}_{kind}.json"
    (root / "manifest.json").write_text(json.dumps({"files": files}))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return _world(tmp_path_factory.mktemp("removal") / "world")


def _flat(text: str) -> str:
    return re.sub(r"\s", "", text)


def _fake_model(proc):
    """A `generate_texts` stand-in whose answer is a function of what it receives: the tone's length (read from the
    number of audio placeholders) when it hears the audio -- and, for the cross question, sees the frames too;
    "red" to the colour question when it sees the frames; "0" / "none" otherwise."""
    seconds_of = {proc.num_audio_tokens(s * RATE): str(s) for s in (1, 2, 3)}

    def generate(engine, inputs, options):
        answers = []
        for row in (x["input_ids"][0] for x in inputs):
            prompt = engine.processor.decode(row, skip_special_tokens=True)
            audio, video = int((row == proc.audio_token_id).sum()), int((row == proc.video_token_id).sum())
            heard = seconds_of[min(seconds_of, key=lambda n: abs(n - audio))] if audio else "0"
            if _flat(QUESTIONS["video_visual_qa"]) in prompt:
                answers.append("red" if video else "none")
            elif _flat(QUESTIONS["video_cross_qa"]) in prompt:
                answers.append(heard if video else "0")
            else:
                answers.append(heard)
        return answers

    return generate


# ------------------------------------------------------------------------------------------------ the samples
@pytest.mark.parametrize("video_audio", ["markers", "sound_track"])
def test_removed_modalities_are_gone_after_the_processor(micro, world, video_audio):
    _, proc = micro
    task = load_task("tiny", world, split="test", video_audio=video_audio)
    plain = load_task("tiny", world, split="test", video_audio=video_audio, modality_removal=False)
    assert task.settings["modality_removal"] is True and plain.settings["modality_removal"] is False
    normal = [s for s in task.samples if s.removed is None]
    assert [(s.id, s.messages, s.use_audio_in_video) for s in normal] == [
        (s.id, s.messages, s.use_audio_in_video) for s in plain.samples]  # the normal questions are unchanged
    assert all(s.use_audio_in_video == (video_audio == "sound_track") for s in normal if s.kind == "video_cross_qa")

    def inputs(sample):
        batch = proc.apply_chat_template([sample.messages], use_audio_in_video=sample.use_audio_in_video)
        return batch, proc.modality_token_counts(batch["input_ids"])

    by_id = {s.id: s for s in task.samples}
    for kind in ("video_audio_qa", "video_cross_qa"):
        both, counts = inputs(by_id[f"test_{kind}_1"])
        assert counts["audio"] > 0 and counts["video"] > 0
        assert "input_features" in both and "pixel_values_videos" in both

        no_audio, without = inputs(by_id[f"test_{kind}_1/no_audio"])
        assert without["audio"] == 0 and "input_features" not in no_audio
        assert without["video"] == counts["video"]
        assert torch_equal(no_audio["pixel_values_videos"], both["pixel_values_videos"])  # the same frames

        no_video, without = inputs(by_id[f"test_{kind}_1/no_video"])
        assert without["video"] == 0 and "pixel_values_videos" not in no_video
        assert without["audio"] == counts["audio"]  # the very sound it hears with the frames
        assert torch_equal(no_video["input_features"], both["input_features"])
    # the frames-only kind is not part of the control
    assert not any(s.removed for s in task.samples if s.kind == "video_visual_qa")


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_samples_follow_the_questions_kept_and_limit_counts_only_those(world):
    task = load_task("tiny", world, limit=2)
    test = [(s.kind, s.id, s.removed) for s in task.samples if s.split == "test"]
    assert test == [
        ("video_visual_qa", "test_video_visual_qa_0", None), ("video_visual_qa", "test_video_visual_qa_1", None),
        ("video_audio_qa", "test_video_audio_qa_0", None), ("video_audio_qa", "test_video_audio_qa_1", None),
        ("video_cross_qa", "test_video_cross_qa_0", None), ("video_cross_qa", "test_video_cross_qa_1", None),
        *[(kind, f"test_{kind}_{n}/no_{m}", m) for m in ("audio", "video")
          for kind in ("video_audio_qa", "video_cross_qa") for n in (0, 1)]]
    assert [s.id for s in task.samples if s.split == "oot"] == [
        "oot_video_audio_qa_0", "oot_video_audio_qa_1", "oot_video_audio_qa_0/no_audio",
        "oot_video_audio_qa_1/no_audio", "oot_video_audio_qa_0/no_video", "oot_video_audio_qa_1/no_video"]
    # no video + audio kind: off by default, an error when asked for
    assert load_task("tiny", world, kinds=["video_visual_qa"]).settings["modality_removal"] is False
    with pytest.raises(ConfigError, match="modality_removal asks video \\+ audio questions"):
        load_task("tiny", world, kinds=["video_visual_qa"], modality_removal=True)


def test_remove_modality_needs_the_modality(world):
    sample = load_task("tiny", world, split="test", kinds=["video_visual_qa"]).samples[0]
    copy = remove_modality(sample, "audio")  # a frames-only question has no audio to remove: invalid, not asked
    assert copy.error is not None and "no audio to remove" in copy.error and copy.removed == "audio"
    with pytest.raises(ConfigError, match="removed must be one of"):
        remove_modality(sample, "frames")


# ------------------------------------------------------------------------------------------------ the scores
@pytest.mark.parametrize("video_audio", ["markers", "sound_track"])
def test_the_control_reports_what_the_model_needs(micro, world, tmp_path, monkeypatch, video_audio):
    model, proc = micro
    monkeypatch.setattr(runner, "generate_texts", _fake_model(proc))
    result = evaluate(model, proc, "tiny", data=world, video_audio=video_audio, batch_size=3, out=tmp_path,
                      progress=False)
    test, oot = result["splits"]["test"], result["splits"]["oot"]
    # the normal scores hold the normal questions only, and the control is no extra kind
    assert list(test["scores"]) == ["overall", "video_visual_qa", "video_audio_qa", "video_cross_qa"]
    assert all(e["score"] == 1.0 and e["questions"] == (12 if kind == "overall" else 4)
               for kind, e in test["scores"].items())
    assert list(oot["scores"]) == ["video_audio_qa"] and oot["scores"]["video_audio_qa"]["questions"] == 2

    control = test["modality_removal"]
    assert list(control) == ["video_audio_qa", "video_cross_qa"] and result["modality_removal"] == control
    scores = {kind: {k: v if k == "chance" else v["score"] for k, v in c.items()} for kind, c in control.items()}
    # the audio question: right whenever it hears the tone; the cross question: only with the frames too
    assert scores["video_audio_qa"] == {"both": 1.0, "no_audio": 0.0, "no_video": 1.0, "chance": 0.75}
    assert scores["video_cross_qa"] == {"both": 1.0, "no_audio": 0.0, "no_video": 0.0, "chance": 0.75}
    assert control["video_cross_qa"]["both"] == test["scores"]["video_cross_qa"]
    assert control["video_cross_qa"]["no_audio"]["questions"] == 4  # templates: short "1", "1"; long "2", "3"
    assert oot["modality_removal"]["video_audio_qa"]["no_audio"]["score"] == 0.0
    assert oot["modality_removal"]["video_audio_qa"]["chance"] == 0.5
    assert test["counts"]["samples"] == 12 + 2 * 8 and result["counts"]["failed"] == 0  # the control is generated
    templates = test["by_template"]  # per question template, the control's copies left out
    assert result["by_template"] == templates and list(templates) == list(test["scores"])[1:]
    assert {t: e["questions"] for t, e in templates["video_audio_qa"].items()} == {"short": 2, "long": 2}
    assert templates["video_audio_qa"]["short"]["top_answer"] == {"answer": "1", "share": 1.0}
    assert templates["video_audio_qa"]["long"]["top_answer"]["share"] == 0.5  # "2" and "3"
    assert oot["by_template"]["video_audio_qa"]["short"]["questions"] == 2

    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["splits"]["test"]["modality_removal"] == control and saved["scores"] == result["scores"]
    predictions = [json.loads(line) for line in (tmp_path / "tiny.predictions.jsonl").read_text().splitlines()]
    removed = {p["id"]: (p["removed"], p["prediction"]) for p in predictions if "removed" in p}
    assert removed["test_video_cross_qa_1/no_audio"] == ("audio", "0")
    assert removed["test_video_audio_qa_2/no_video"] == ("video", "3")
    table = (tmp_path / "tiny.md").read_text()
    print(table)
    assert "| video_cross_qa | exact_match | 100.0 | - | 4 / 4 | - |" in table
    assert "| video_cross_qa: no audio | exact_match | 0.0 | - | 4 / 4 | - |" in table
    assert "| video_cross_qa: no video | exact_match | 0.0 | - | 4 / 4 | - |" in table
    assert "| video_audio_qa: no video | exact_match | 100.0 | 100.0 | 4 / 4 | 2 / 2 |" in table
    assert "| video_audio_qa: chance | exact_match | 75.0 | 50.0 |" in table
    assert "video_visual_qa: no" not in table and "modality-removal control" in table
    assert "| video_audio_qa | short | 100.0 | 100.0 | 1 (100%) | " in table
    assert "| video_visual_qa | long | 100.0 | - | red (100%) | - |" in table

    # without the control: the same normal scores, nothing removed
    plain = evaluate(model, proc, "tiny", data=world, video_audio=video_audio, modality_removal=False,
                     progress=False)
    assert plain["splits"]["test"]["scores"] == test["scores"] and plain["splits"]["oot"]["scores"] == oot["scores"]
    assert "modality_removal" not in plain and not any("removed" in p for p in plain["predictions"])

    one = evaluate(model, proc, "tiny", data=world, split="test", limit=2, video_audio=video_audio, progress=False)
    assert one["modality_removal"]["video_cross_qa"]["no_video"]["questions"] == 2  # follows the questions kept
    text = runner.markdown_table([one])
    assert "| tiny | video_cross_qa | exact_match | 100.0 | 2 / 2 | 0 | 0 | 0 |" in text
    assert "| tiny | video_cross_qa: no audio | exact_match | 0.0 | 2 / 2 | 0 | 0 | 0 |" in text
    assert "| tiny | video_audio_qa: no video | exact_match | 100.0 | 2 / 2 | 0 | 0 | 0 |" in text
    assert "| tiny | video_cross_qa: chance | exact_match | 100.0 |" in text  # one clip of each template


def test_a_micro_model_runs_the_ablated_inputs(micro, world):
    model, proc = micro
    result = evaluate(model, proc, "tiny", data=world, split="test", video_audio="sound_track", limit=2,
                      max_new_tokens=2, batch_size=4, progress=False)
    counts = result["counts"]
    assert (counts["samples"], counts["generated"], counts["failed"]) == (6 + 8, 6 + 8, 0)
    assert all(e["evaluated"] == e["questions"] == 2 for c in result["modality_removal"].values()
               for e in (c["both"], c["no_audio"], c["no_video"]))


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_flag(micro, micro_dir, world, tmp_path, monkeypatch):
    from omniola.cli import app

    _, proc = micro
    monkeypatch.setattr(runner, "generate_texts", _fake_model(proc))
    base = ["eval", "--model", str(micro_dir), "--task", "tiny", "--data", str(world), "--quiet", "--device", "cpu",
            "--no-anchor"]
    cli = CliRunner().invoke(app, base + ["--out", str(tmp_path / "on")])
    assert cli.exit_code == 0, cli.output
    assert "| video_cross_qa: no audio | exact_match | 0.0 | - | 4 / 4 | - |" in cli.stdout  # on by default
    cli = CliRunner().invoke(app, base + ["--no-modality-removal", "--out", str(tmp_path / "off")])
    assert cli.exit_code == 0, cli.output
    assert "no audio" not in cli.stdout and "| video_cross_qa | exact_match | 100.0 | - |" in cli.stdout
    assert json.loads((tmp_path / "off" / "tiny.json").read_text())["settings"]["modality_removal"] is False

    cli = CliRunner().invoke(app, base + ["--kinds", "video_visual_qa", "--modality-removal"])
    assert cli.exit_code == 2 and "modality_removal asks video + audio questions" in cli.output
    cli = CliRunner().invoke(app, ["eval", "--task", "mmbench", "--data", str(tmp_path / "mm.tsv"),
                                   "--no-modality-removal"])
    assert cli.exit_code == 2 and "does not take option(s) ['modality_removal']" in cli.output
    cli = CliRunner().invoke(app, ["eval", "--lmms-eval", "mme", "--modality-removal"])
    assert cli.exit_code == 2 and "--modality-removal: not used with --lmms-eval" in cli.output


def test_other_tasks_refuse_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"task 'videomme' does not take option\(s\) \['modality_removal'\]"):
        load_task("videomme", tmp_path / "v.jsonl", modality_removal=True)
