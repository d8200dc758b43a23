"""The video ladder's synthetic rungs (benchmarks/video_ladder.py): every answer agrees with the rendered pixels,
and bad arguments fail before any work."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniola.data.pictures import COLORS

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("video_ladder", ROOT / "benchmarks" / "video_ladder.py")
ladder = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ladder)


def _where(frame: np.ndarray, color: str) -> tuple[float, float] | None:
    """Centroid (x, y) of the pixels of a palette colour, or None."""
    ys, xs = np.nonzero((np.abs(frame.astype(int) - COLORS[color]).max(-1) <= 16)
                        & (np.abs(frame.astype(int) - 255).max(-1) > 0))
    return (xs.mean(), ys.mean()) if len(xs) > 20 else None


def _colors(frame: np.ndarray) -> list[str]:
    return [c for c in COLORS if _where(frame, c) is not None]


@pytest.mark.parametrize("rung", [r for r in ladder.RUNGS if r != "world"])
def test_answers_agree_with_the_pixels(rung):
    for k in range(12):
        frames, questions, shapes = ladder._questions(rung, random.Random(k))
        assert frames.shape[1:] == (64, 64, 3) and frames.dtype == np.uint8
        for qtype, question, answer in questions:
            if qtype == "color":
                assert _colors(frames[0]) == [answer]
            elif qtype in ("side", "place"):
                color = _colors(frames[0])[0] if qtype == "side" else question.split(" the ")[1].split()[0]
                assert ("left" if _where(frames[0], color)[0] < 32 else "right") == answer
            elif qtype in ("bind", "hear"):
                assert answer in _colors(frames[0]) and len(_colors(frames[0])) == 2
                if qtype == "hear":  # the named shape (listed first) is the one whose colour is asked
                    assert answer == shapes[0]["color"]
            elif qtype == "spoken_shape":
                assert answer == shapes[0]["shape"] and len({s["shape"] for s in shapes}) == 2
            elif qtype in ("motion2", "direction"):
                (x0, y0), (x1, y1) = (_where(f, _colors(f)[0]) for f in (frames[0], frames[-1]))
                moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
                assert max(moved, key=moved.get) == answer and moved[answer] > 15
            else:
                assert _colors(frames[0 if qtype == "first_color" else -1]) == [answer]


def test_word_grid_says_each_shape_where_it_is():
    for k in range(8):
        frames, [(_, question, answer)], _ = ladder._questions("place", random.Random(k))
        color = question.split(" the ")[1].split()[0]
        rows = [row.split() for row in ladder.word_grid(frames[0]).splitlines()]
        assert len(rows) == 4 and all(len(row) == 4 for row in rows)
        columns = {c for row in rows for c, word in enumerate(row) if word == color}
        assert columns and all((c < 2) == (answer == "left") for c in columns)


def test_picture_rungs_write_grounding_records_with_every_shape_boxed(tmp_path):
    import json

    from omniola.data.boxes import parse_boxes

    root = ladder.build_rung("place", tmp_path / "place", train=6, test=2, seed=0)
    records = json.loads((root / "ground.json").read_text())
    assert len(records) == 6
    for record in records:
        frame = np.asarray(Image.open(root / record["image"]).convert("RGB"))
        for words, (x0, y0, x1, y1) in parse_boxes(record["conversations"][-1]["value"]):
            x, y = _where(frame, words.split()[0])  # the named colour's pixels sit in the box
            assert x0 * 64 <= x <= x1 * 64 and y0 * 64 <= y <= y1 * 64
    assert not (ladder.build_rung("motion2", tmp_path / "motion2", train=2, test=1, seed=0) / "ground.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--rungs", "place,sides"], "--rungs: unknown ['sides']"),
    (["--arms", "ola,rope"], "--arms: unknown ['rope']"),
    (["--rungs", "world"], "the world and hear rungs need --world DIR"),
    (["--rungs", "hear", "--world", str(ROOT)], "the world and hear rungs need --world DIR"),
    (["--arms", "ola", "--rungs", "hear", "--world", "WORLD"], "the hear rungs need --audio-from"),
    (["--arms", "words", "--rungs", "bind"], "the words arm gives pictures and frames as their colour words"),
    (["--arms", "oracle", "--rungs", "motion2"], "the oracle arm replaces picture tokens"),
    (["--rungs", "hear-clips", "--world", "WORLD", "--question-first"], "the world and hear-clips rungs use"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    start, world = tmp_path / "model", tmp_path / "world"
    start.mkdir()
    world.mkdir()
    (start / "config.json").write_text("{}")
    (world / "manifest.json").write_text("{}")
    args = [str(world) if a == "WORLD" else a for a in args]
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "video_ladder.py"), "--start", str(start),
                          "--out", str(tmp_path / "out"), *args], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "out").exists()


def test_hear_rung_speaks_the_named_shape(tmp_path):
    """The hear rung's records: the world's cross-modal prompt, a picture and a narration naming one of its shapes
    (the narration is transcribed back by Whisper's own decoder, so a silent or wrong clip fails)."""
    import json
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from omniola.evaluation.anchor import WhisperAnchor

    voices = {"train": [{"voice": "espeak:en-us", "rate": 160, "pitch": 50, "speed": 1.0}],
              "test": [{"voice": "espeak:en-gb", "rate": 140, "pitch": 40, "speed": 1.0}]}
    root = ladder.build_rung("hear", tmp_path / "hear", train=3, test=2, seed=0, voices=voices)
    test = json.loads((root / "test.json").read_text())
    assert len(test) == 4 and {r["meta"]["question"] for r in test} == {"spoken_shape", "hear"}
    assert {r["meta"]["voice"] for r in test} == {"espeak:en-gb"}  # held-out narrators, as in the world
    anchor = WhisperAnchor()
    for record in test:
        assert record["conversations"][0]["value"].startswith("<speech><image>\n")
        frame = np.asarray(Image.open(root / record["image"]).convert("RGB"))
        if record["meta"]["question"] == "hear":
            assert record["conversations"][1]["value"] in _colors(frame)
        else:
            assert record["conversations"][1]["value"] in anchor.transcribe([str(root / record["audio"])])[0].lower()
    train = json.loads((root / "train.json").read_text())
    assert len(train) == 3 and {r["meta"]["voice"] for r in train} == {"espeak:en-us"}


def test_hear_clips_rung_asks_the_worlds_name_clips(tmp_path):
    """The hear-clips rung takes the world's `name` clips: one of its two questions per training clip, both per test
    clip; the other templates' clips stay out."""
    import json

    world = tmp_path / "world"
    (world / "media").mkdir(parents=True)
    for split, clips in (("train", range(6)), ("test", range(6, 9))):
        for kind, question, answer in (("video_audio_qa", "Which shape does the speaker name?", "circle"),
                                       ("video_cross_qa", "What color is the shape the speaker names?", "red")):
            records = [{"id": f"{split}-{kind}-{k}", "video": f"media/{k}.mp4", "audio": f"media/{k}.wav",
                        "conversations": [{"from": "human", "value": f"<speech><image>\n{question}"},
                                          {"from": "gpt", "value": answer}],
                        "meta": {"template": "move_beeps" if k % 3 == 2 else "name", "clip": k, "voice": "v"}}
                       for k in clips]
            (world / f"{split}_{kind}.json").write_text(json.dumps(records))
    root = ladder.build_hear_clips(tmp_path / "rung", world, seed=0)
    train = json.loads((root / "train.json").read_text())
    test = json.loads((root / "test.json").read_text())
    assert [r["video"] for r in train] == ["media/0.mp4", "media/1.mp4", "media/3.mp4", "media/4.mp4"]
    assert {r["meta"]["question"] for r in train} == {"spoken_shape", "hear"}  # drawn, not always the same one
    assert [(r["video"], r["meta"]["question"]) for r in test] == [
        ("media/6.mp4", "spoken_shape"), ("media/6.mp4", "hear"), ("media/7.mp4", "spoken_shape"),
        ("media/7.mp4", "hear")]
    assert (root / "media").resolve() == (world / "media").resolve()


@pytest.mark.parametrize("count", [10, 13, 16])
def test_words_arm_writes_the_frames_the_model_sees(tmp_path, count):
    """`kept_frames` (the frames the words arm writes out as text) are those `load_video` gives the processor."""
    from omniola.data.tiny_world import write_video
    from omniola.media import load_video

    frames = np.zeros((count, 64, 64, 3), np.uint8)
    for k in range(count):
        frames[k, :, : 4 * (k + 1)] = 255  # a white band whose width is the frame's index
    write_video(tmp_path / "clip.mp4", frames, ladder.FPS)
    seen = load_video(tmp_path / "clip.mp4", num_frames=ladder.VIDEO_FRAMES, with_audio=False).frames
    widths = [int((np.asarray(f)[32, :, 0] > 128).sum()) // 4 - 1 for f in seen]
    assert widths == ladder.kept_frames(count, "video")
