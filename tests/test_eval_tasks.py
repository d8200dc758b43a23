"""Evaluation end to end: each task layout written here, a micro random model (structure, counts, failures) and a
fake generate (scores checked against values computed by hand)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from typer.testing import CliRunner

from omniola.data.tiny_world import write_video, write_wav
from omniola.errors import ConfigError, InputError
from omniola.evaluation import evaluate, load_task, normalize_answer, runner

RATE = 16000


def _tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _fake_generate(answer):
    """A `generate_texts` stand-in: `answer(prompt_text, input_ids_row)` for each row of the batch. The micro
    tokenizer is byte-level, so the decoded prompt is the question as the model saw it, less its whitespace
    (which that vocabulary lacks): compare with :func:`_flat` text."""

    def generate(model, processor, inputs, *, max_new_tokens, temperature=0.0):
        prompts = processor.batch_decode(inputs["input_ids"], skip_special_tokens=True)
        return [answer(p, row) for p, row in zip(prompts, inputs["input_ids"])]

    return generate


def _flat(text: str) -> str:
    return re.sub(r"\s", "", text)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- MMBench
MMBENCH_ROWS = [  # index, question, A, B, C, D, answer, image, category
    ("0", "What animal?", "cat", "dog", "fox", "owl", "B", _png_b64("red"), "animals"),
    ("1", "What colour?", "red", "blue", "", "", "A", "0", "colours"),          # image: row 0's; 2 options
    ("2", "Which shape?", "circle", "square", "triangle", "star", "C", _png_b64("blue"), "shapes"),
    ("3", "Broken image?", "yes", "no", "", "", "A", base64.b64encode(b"not an image").decode(), "shapes"),
    ("4", "Bad answer?", "yes", "no", "", "", "E", _png_b64("white"), "shapes"),  # answer not an option
    ("5", "Unparsable?", "one", "two", "", "", "B", _png_b64("white"), "shapes"),
]


def _write_tsv(path: Path, rows, columns=("index", "question", "hint", "A", "B", "C", "D", "answer", "image",
                                          "category")) -> Path:
    lines = ["\t".join(columns)]
    for index, question, a, b, c, d, answer, image, category in rows:
        cells = dict(index=index, question=question, hint="", A=a, B=b, C=c, D=d, answer=answer, image=image,
                     category=category)
        lines.append("\t".join(cells[c] for c in columns))
    path.write_text("\n".join(lines) + "\n")
    return path


def _mmbench_answer(prompt: str, row) -> str:
    question = re.search(r"Question:(.*?)Options:", prompt).group(1)
    options = dict(re.findall(r"([A-D])\.(.*?)(?=[A-D]\.|Answer)", prompt.split("Options:")[1]))
    if question == "Whatanimal?":  # always right
        return f"The answer is {next(k for k, v in options.items() if v == 'dog')}."
    if question == "Whatcolour?":  # right only in the original order
        return "A"
    if question == "Whichshape?":  # names the option's text
        return "It is a triangle."
    return "no idea"


def test_mmbench_circular_scores(micro, tmp_path, monkeypatch):
    path = _write_tsv(tmp_path / "mmbench.tsv", MMBENCH_ROWS)
    task = load_task("mmbench", path)
    assert task.settings["circular"] == "generated"
    by_index = {}
    for s in task.samples:
        by_index.setdefault(s.group, []).append(s)
    assert [len(by_index[i]) for i in "012345"] == [4, 2, 4, 2, 1, 2]  # one rotation per option
    assert by_index["4"][0].error and "'E'" in by_index["4"][0].error
    assert [s.reference for s in by_index["0"]] == ["B", "A", "D", "C"]  # "dog" moves round the letters

    monkeypatch.setattr(runner, "generate_texts", _fake_generate(_mmbench_answer))
    model, proc = micro
    result = evaluate(model, proc, "mmbench", data=path, out=tmp_path / "out", progress=False, batch_size=3)
    s = result["scores"]
    # 6 questions: invalid 1 (row 4), failed 1 (row 3's image); of the 4 scored, animal and shape are right in
    # every rotation, colour only in the first (wrong), row 5 unparsable -> 2 / 4.
    assert s["overall"] == {
        "metric": "circular_accuracy", "score": 0.5, "questions": 6, "evaluated": 4, "correct": 2, "wrong": 1,
        "unparsable": 1, "failed": 1, "invalid": 1, "answers": 15, "unparsable_answers": 2,
    }
    assert s["overall (vanilla)"]["score"] == 0.75  # first rotations: animal, colour, shape right; row 5 not
    assert s["animals"]["score"] == 1.0 and s["colours"]["score"] == 0.0
    assert (s["shapes"]["score"], s["shapes"]["failed"], s["shapes"]["invalid"]) == (0.5, 1, 1)
    assert result["counts"] == {"samples": 15, "generated": 12, "unparsable": 2, "failed": 2, "invalid": 1}
    assert any("not a base64-encoded image" in i for i in result["issues"])

    out = tmp_path / "out"
    assert json.loads((out / "mmbench.json").read_text())["scores"] == s
    predictions = _lines(out / "mmbench.predictions.jsonl")
    assert len(predictions) == 15
    colour = [p for p in predictions if p.get("question") == "What colour?"]
    assert [(p["parsed"], p["reference"], p["outcome"]) for p in colour] == [("A", "A", "correct"),
                                                                            ("A", "B", "wrong")]
    assert "| mmbench | overall | circular_accuracy | 50.0 | 4 / 6 | 1 | 1 | 1 |" in (out / "mmbench.md").read_text()


def test_mmbench_given_rotations_and_missing_columns(micro, tmp_path, monkeypatch):
    dog = _png_b64("red")
    rows = [("7", "What animal?", "cat", "dog", "", "", "B", dog, "animals"),
            ("1000007", "What animal?", "dog", "cat", "", "", "A", dog, "animals")]
    task = load_task("mmbench", _write_tsv(tmp_path / "given.tsv", rows))
    assert task.settings["circular"] == "given"
    assert [(s.group, s.rotation) for s in task.samples] == [("7", 0), ("7", 1)]
    monkeypatch.setattr(runner, "generate_texts", _fake_generate(lambda p, row: "dog"))
    model, proc = micro
    assert evaluate(model, proc, task, progress=False)["scores"]["overall"]["score"] == 1.0

    no_answer = _write_tsv(tmp_path / "broken.tsv", MMBENCH_ROWS[:2],
                           columns=("index", "question", "A", "B", "C", "D", "image", "category"))
    result = evaluate(model, proc, "mmbench", data=no_answer, progress=False)
    assert result["counts"]["invalid"] == 2 and result["counts"]["generated"] == 0
    assert result["scores"]["overall"]["score"] is None
    assert "missing column(s) ['answer']" in result["issues"][0]


# --------------------------------------------------------------------------------------------------- VideoMME
def test_videomme_buckets_and_failures(micro, tmp_path, monkeypatch):
    (tmp_path / "videos").mkdir()
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    frames[:, 8:24, 8:24] = (255, 0, 0)
    write_video(tmp_path / "videos" / "vid1.mp4", frames, 4, _tone(1.0))
    options = ["A. a square", "B. a circle", "C. nothing", "D. a dog"]
    rows = [
        {"videoID": "vid1", "question_id": "q1", "duration": "short", "question": "What is shown?",
         "options": options, "answer": "A"},
        {"videoID": "vid2", "question_id": "q2", "duration": "medium", "question": "Missing video?",
         "options": options, "answer": "B"},                                 # no such file: failed
        {"videoID": "vid1", "question_id": "q3", "duration": "long", "question": "No answer?",
         "options": options},                                                 # invalid
        {"videoID": "vid1", "question_id": "q4", "duration": "long", "question": "What colour?",
         "options": options, "answer": "C"},
    ]
    path = tmp_path / "videomme.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(runner, "generate_texts", _fake_generate(lambda p, row: "A"))
    model, proc = micro
    result = evaluate(model, proc, "videomme", data=path, progress=False, batch_size=4)
    s = result["scores"]
    assert (s["overall"]["score"], s["overall"]["evaluated"], s["overall"]["questions"]) == (0.5, 2, 4)
    assert s["short"]["score"] == 1.0
    assert (s["medium"]["score"], s["medium"]["failed"]) == (None, 1)
    assert (s["long"]["score"], s["long"]["invalid"]) == (0.0, 1)
    failed = [p for p in result["predictions"] if p["outcome"] == "failed"]
    assert len(failed) == 1 and "vid2.mp4" in failed[0]["error"]


# ------------------------------------------------------------------------------------------------ LibriSpeech
def test_librispeech_corpus_wer(micro, tmp_path, monkeypatch):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text(
        "1-2-0000 HELLO WORLD\n1-2-0001 THE COLOUR IS RED\n1-2-0002 MISSING AUDIO FILE\nBADLINE\n")
    soundfile.write(chapter / "1-2-0000.flac", _tone(1.0), RATE, format="FLAC")
    soundfile.write(chapter / "1-2-0001.flac", _tone(2.0), RATE, format="FLAC")
    model, proc = micro
    # the utterances differ in length, so in their number of audio placeholders
    by_tokens = {proc.num_audio_tokens(RATE): "hello word",
                 proc.num_audio_tokens(2 * RATE): "the color is red and blue"}
    monkeypatch.setattr(runner, "generate_texts",
                        _fake_generate(lambda p, row: by_tokens[int((row == proc.audio_token_id).sum())]))
    result = evaluate(model, proc, "librispeech", data=tmp_path / "LibriSpeech", progress=False)
    wer = result["scores"]["test-clean"]
    # 1 substitution (world/word) + 2 insertions (and blue) over 2 + 4 words; colour == color after normalising
    assert wer["metric"] == "wer" and wer["score"] == pytest.approx(0.5)
    assert (wer["substitutions"], wer["insertions"], wer["reference_words"]) == (1, 2, 6)
    assert (wer["evaluated"], wer["failed"], wer["invalid"]) == (2, 1, 1)
    assert result["settings"]["wer_normalizer"] == "whisper_english"


# ------------------------------------------------------------------------------------------------- audio QA
def test_open_audio_qa_exact_match_and_cli(micro, micro_dir, tmp_path, monkeypatch):
    write_wav(tmp_path / "beeps.wav", _tone(0.5))
    write_wav(tmp_path / "tone.wav", _tone(0.7, 880.0))
    rows = [{"id": "b", "audio": "beeps.wav", "question": "How many beeps?", "answer": "3"},
            {"id": "t", "audio": "tone.wav", "question": "Is the tone high or low?", "answer": ["high", "high pitch"]},
            {"id": "x", "audio": "tone.wav", "question": "No answer?"}]
    path = tmp_path / "audio_qa.json"
    path.write_text(json.dumps(rows))
    answers = {"How many beeps?": "Three.", "Is the tone high or low?": "low"}
    fake = _fake_generate(lambda p, row: next(v for k, v in answers.items() if _flat(k) in p))
    with monkeypatch.context() as m:
        m.setattr(runner, "generate_texts", fake)
        model, proc = micro
        result = evaluate(model, proc, "audio_qa", data=path, progress=False)
    qa = result["scores"]["audio_qa"]
    assert (qa["metric"], qa["score"], qa["correct"], qa["evaluated"], qa["invalid"]) == ("exact_match", 0.5, 1, 2, 1)

    # the real command on the micro model (garbage answers): files and counts
    from omniola.cli import app

    out = tmp_path / "results"
    cli = CliRunner().invoke(app, ["eval", "--model", str(micro_dir), "--task", "audio_qa", "--data", str(path),
                                   "--out", str(out), "--quiet", "--max-new-tokens", "3", "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    assert "| audio_qa | audio_qa | exact_match |" in cli.stdout
    saved = json.loads((out / "audio_qa.json").read_text())
    assert saved["counts"]["samples"] == 3 and saved["counts"]["invalid"] == 1
    assert saved["settings"]["max_new_tokens"] == 3 and saved["settings"]["decoding"] == "greedy"
    assert len(_lines(out / "audio_qa.predictions.jsonl")) == 3 and (out / "audio_qa.md").is_file()

    bad = CliRunner().invoke(app, ["eval", "--model", str(micro_dir), "--task", "nope"])
    assert bad.exit_code == 2 and "unknown task 'nope'" in bad.output
    bad = CliRunner().invoke(app, ["eval", "--model", str(micro_dir), "--task", "audio_qa", "--data", str(path),
                                   "--split", "val"])
    assert bad.exit_code == 2 and "does not take option(s) ['split']" in bad.output


def test_load_task_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs --data"):
        load_task("videomme")
    with pytest.raises(InputError, match="does not exist"):
        load_task("librispeech", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown tiny-world kind"):
        load_task("tiny", tmp_path, kinds=["sing"])


# ------------------------------------------------------------------------------------------- the tiny world
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The small tiny world (one test record of each kind)."""
    pytest.importorskip("easy_vqa")
    pytest.importorskip("piper")
    from omniola.data.tiny_world import build_tiny_world

    out = tmp_path_factory.mktemp("tiny") / "world"
    build_tiny_world(out, seed=3, scale="small", progress=False)
    return out


def test_tiny_world_with_a_micro_model(micro, tiny, tmp_path):
    model, proc = micro
    result = evaluate(model, proc, "tiny", data=tiny, limit=2, max_new_tokens=3, batch_size=4, out=tmp_path,
                      progress=False)
    scores = result["scores"]
    assert list(scores) == ["image_qa", "image_speech_qa", "asr", "audio_qa", "video_visual_qa", "video_audio_qa",
                            "video_cross_qa"]
    assert scores["asr"]["metric"] == "wer" and scores["image_qa"]["metric"] == "exact_match"
    assert scores["image_qa"]["questions"] == 2  # two turns of its conversation, the second after the first
    for entry in scores.values():
        assert entry["evaluated"] == entry["questions"] and entry["failed"] == entry["invalid"] == 0
    predictions = _lines(tmp_path / "tiny.predictions.jsonl")
    assert len(predictions) == result["counts"]["samples"] == 8
    assert {p["id"].split("#")[-1] for p in predictions if p["kind"] == "image_qa"} == {"0", "1"}
    assert result["timing"]["seconds_per_sample"] > 0

    # batched generation (left padding, mixed kinds and lengths) gives what each sample gives alone
    kinds = ["image_qa", "image_speech_qa", "video_cross_qa"]
    batched = [p["prediction"] for p in result["predictions"] if p["kind"] in kinds]
    alone = evaluate(model, proc, "tiny", data=tiny, kinds=kinds, limit=2, max_new_tokens=3, batch_size=1,
                     progress=False)
    assert [p["prediction"] for p in alone["predictions"]] == batched


def test_tiny_world_scores_failures_and_invalid_records(micro, tiny, tmp_path, monkeypatch):
    world = tmp_path / "world"
    shutil.copytree(tiny, world)
    records = json.loads((world / "test_audio_qa.json").read_text())
    records.append({**records[0], "id": "bad", "surprise": 1})             # unknown key: invalid
    records.append({**records[0], "id": "gone", "audio": "media/none.wav"})  # missing file: failed
    (world / "test_audio_qa.json").write_text(json.dumps(records))

    def answer(prompt, row):
        return "" if _flat("Transcribe the audio.") in prompt else "yes"

    monkeypatch.setattr(runner, "generate_texts", _fake_generate(answer))
    model, proc = micro
    result = evaluate(model, proc, "tiny", data=world, progress=False)
    task = load_task("tiny", world)
    for kind, entry in result["scores"].items():
        samples = [s for s in task.samples if s.kind == kind and s.error is None]
        if kind == "asr":  # nothing said: every reference word is a deletion
            assert (entry["score"], entry["deletions"], entry["insertions"]) == (1.0, entry["reference_words"], 0)
            continue
        refs = [s.reference for s in samples if s.id != "gone"]
        assert entry["correct"] == sum(normalize_answer(r) == "yes" for r in refs)
        assert entry["score"] == pytest.approx(entry["correct"] / len(refs))
    audio = result["scores"]["audio_qa"]
    assert (audio["failed"], audio["invalid"], audio["evaluated"]) == (1, 1, len(records) - 2)
    assert any("unknown key(s) ['surprise']" in issue for issue in result["issues"])
    assert any("none.wav" in issue for issue in result["issues"])

    alone = load_task("tiny", world, kinds=["image_qa"], multi_turn="alone")
    second = next(s for s in alone.samples if s.id.endswith("#1"))
    assert len(second.messages) == 1 and [p["type"] for p in second.messages[0]["content"]] == ["image", "text"]
