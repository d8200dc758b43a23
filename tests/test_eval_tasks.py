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
    """A `generate_texts` stand-in: `answer(prompt_text, input_ids_row)` for each conversation. The micro
    tokenizer is byte-level, so the decoded prompt is the question as the model saw it, less its whitespace
    (which that vocabulary lacks): compare with :func:`_flat` text."""

    def generate(engine, inputs, options):
        rows = [x["input_ids"][0] for x in inputs]
        return [answer(engine.processor.decode(row, skip_special_tokens=True), row) for row in rows]

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
    with pytest.raises(ConfigError, match="video_audio must be one of"):
        load_task("tiny", tmp_path, video_audio="both")


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
    assert result["scores"] == result["splits"]["test"]["scores"]  # test, and oot beside it when the world has it
    for split in result["splits"].values():
        for entry in split["scores"].values():
            assert entry["evaluated"] == entry["questions"] and entry["failed"] == entry["invalid"] == 0
    predictions = _lines(tmp_path / "tiny.predictions.jsonl")
    assert len(predictions) == result["counts"]["samples"] == sum(
        split["counts"]["samples"] for split in result["splits"].values())
    # 8 questions, and the modality-removal control: the 2 video + audio ones without audio and without frames
    assert result["splits"]["test"]["counts"]["samples"] == 8 + 4
    control = result["modality_removal"]
    assert list(control) == ["video_audio_qa", "video_cross_qa"] and control == result["splits"]["test"][
        "modality_removal"]
    for kind, entry in control.items():
        assert entry["both"] == scores[kind] and entry["no_audio"]["evaluated"] == entry["no_video"]["evaluated"] == 1
    assert sorted(p["id"] for p in predictions if "removed" in p) == [
        f"{r}/no_{m}" for r in sorted(p["id"] for p in predictions if p["kind"] in control and "removed" not in p)
        for m in ("audio", "video")]
    assert {p["id"].split("#")[-1] for p in predictions if p["kind"] == "image_qa" and p["split"] == "test"} == {
        "0", "1"}
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
    for kind, entry in result["scores"].items():  # the test split's
        samples = [s for s in task.samples if s.kind == kind and s.split == "test" and s.error is None]
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


# ------------------------------------------------------------------- in-template and out-of-template side by side
# A hand-made world: clips of distinct lengths (so a fake generate can tell them apart by their number of audio
# placeholders), one transcript each; test has asr, image_qa and audio_qa, oot has asr and image_qa.
MICRO_ASR = {  # split -> [(clip, seconds, reference, model's transcript, anchor's transcript)]
    "test": [("t0.wav", 1.0, "the red circle is big", "the red circle is big", "the red circle is bag"),
             ("t1.wav", 2.0, "a blue square moves left", "a blue square moves right", "a blue square moves")],
    "oot": [("o0.wav", 3.0, "lists hold any python objects", "lists hold many python objects",
             "lists hold any python object"),
            ("o1.wav", 1.5, "green triangles spin", "green triangle spin", "green triangles spin")],
}
MICRO_QA = {  # split -> kind -> [(question, reference, model's answer)]
    "test": {"image_qa": [("What shape is in the image?", "circle", "circle"),
                          ("What color is the shape?", "red", "Red.")],
             "audio_qa": [("How many beeps are there?", "3", "three")]},
    "oot": {"image_qa": [("Name the figure drawn here.", "triangle", "triangle"),
                         ("Which colour has the figure?", "green", "red")]},
}


def _micro_world(root: Path, splits=("test", "oot")) -> Path:
    """Record files in the tiny world's layout for `splits`, their WAV and PNG media, and a manifest listing them."""
    (root / "media").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(root / "media" / "red.png")
    files: dict[str, dict[str, str]] = {}
    for split in splits:
        kinds: dict[str, list[dict]] = {"asr": []}
        for n, (clip, seconds, reference, _, _) in enumerate(MICRO_ASR[split]):
            soundfile.write(root / "media" / clip, _tone(seconds), RATE)
            kinds["asr"].append({"id": f"{split}_asr_{n}", "audio": f"media/{clip}", "conversations": [
                {"from": "human", "value": "<speech>\nTranscribe the audio."}, {"from": "gpt", "value": reference}],
                "meta": {"kind": "asr", "split": split}})
        for kind, questions in MICRO_QA[split].items():
            media = {"image": "media/red.png"} if kind == "image_qa" else {"audio": "media/t0.wav"}
            marker = "<image>" if kind == "image_qa" else "<speech>"
            kinds[kind] = [{"id": f"{split}_{kind}_{n}", **media, "conversations": [
                {"from": "human", "value": f"{marker}\n{question}"}, {"from": "gpt", "value": answer}],
                "meta": {"kind": kind, "split": split}} for n, (question, answer, _) in enumerate(questions)]
        files[split] = {}
        for kind, records in kinds.items():
            (root / f"{split}_{kind}.json").write_text(json.dumps(records))
            files[split][kind] = f"{split}_{kind}.json"
    (root / "manifest.json").write_text(json.dumps({"files": files}))
    return root


def _micro_answers(proc):
    """A fake generate answering MICRO_ASR / MICRO_QA with the model's answers."""
    by_tokens = {proc.num_audio_tokens(int(seconds * RATE)): said
                 for clips in MICRO_ASR.values() for _, seconds, _, said, _ in clips}
    questions = {_flat(q): said for kinds in MICRO_QA.values() for qs in kinds.values() for q, _, said in qs}

    def answer(prompt, row):
        asked = [said for q, said in questions.items() if q in prompt]
        return asked[0] if asked else by_tokens[int((row == proc.audio_token_id).sum())]

    return _fake_generate(answer)


class FakeAnchor:
    """A specialist stand-in: MICRO_ASR's anchor transcripts by clip name; refuses the clips in `refuse`."""

    name = "fake-whisper"

    def __init__(self, refuse=()):
        self.said = {clip: text for clips in MICRO_ASR.values() for clip, _, _, _, text in clips}
        self.refuse, self.calls = set(refuse), []

    def describe(self) -> dict:
        return {"name": self.name, "beam_size": 5}

    def transcribe(self, clips):
        self.calls.append(len(clips))
        names = [Path(c).name for c in clips]
        refused = [n for n in names if n in self.refuse]
        if refused:
            raise InputError(f"the clip {refused[0]} is 31.0 s long")
        return [self.said[n] for n in names]


def test_tiny_loads_test_and_oot(tmp_path):
    world = _micro_world(tmp_path / "world")
    task = load_task("tiny", world)
    assert task.settings["splits"] == ["test", "oot"] and task.settings["split"] == "test"
    assert [(s.split, s.kind) for s in task.samples] == [
        ("test", "asr"), ("test", "asr"), ("test", "image_qa"), ("test", "image_qa"), ("test", "audio_qa"),
        ("oot", "asr"), ("oot", "asr"), ("oot", "image_qa"), ("oot", "image_qa")]
    assert [s.split for s in load_task("tiny", world, limit=1).samples] == ["test"] * 3 + ["oot"] * 2  # per split
    assert {s.split for s in load_task("tiny", world, split="oot").samples} == {"oot"}
    assert {s.split for s in load_task("tiny", world, split="test").samples} == {"test"}

    only_test = _micro_world(tmp_path / "old", splits=("test",))  # a world built before the oot split
    assert load_task("tiny", only_test).settings["splits"] == ["test"]
    with pytest.raises(ConfigError, match="unknown split 'oot'"):
        load_task("tiny", only_test, split="oot")
    with pytest.raises(ConfigError, match="split must be test, val or oot"):
        load_task("tiny", world, split="dev")
    (world / "manifest.json").unlink()  # no manifest: found by file name
    assert load_task("tiny", world).settings["splits"] == ["test", "oot"]


def test_tiny_scores_splits_side_by_side_with_an_anchor(micro, tmp_path, monkeypatch):
    world = _micro_world(tmp_path / "world")
    model, proc = micro
    monkeypatch.setattr(runner, "generate_texts", _micro_answers(proc))
    anchor = FakeAnchor()
    result = evaluate(model, proc, "tiny", data=world, anchor=anchor, batch_size=3, out=tmp_path / "out",
                      progress=False)
    test, oot = result["splits"]["test"], result["splits"]["oot"]
    assert result["scores"] == test["scores"]  # the in-template scores, where single-split runs put them
    assert list(test["scores"]) == ["asr", "image_qa", "audio_qa"] and list(oot["scores"]) == ["asr", "image_qa"]
    # test: model 1 error (left/right) in 10 words, anchor 2 (bag, a deletion); oot: model 2 in 8, anchor 1 in 8
    asr = test["scores"]["asr"]
    assert (asr["score"], asr["anchor_wer"], asr["wer_ratio"]) == (pytest.approx(0.1), pytest.approx(0.2),
                                                                   pytest.approx(0.5))
    assert asr["anchor_counts"]["deletions"] == 1 and asr["anchor"] == anchor.describe()
    asr = oot["scores"]["asr"]
    assert (asr["score"], asr["anchor_wer"], asr["wer_ratio"]) == (0.25, 0.125, 2.0)
    assert (asr["anchor_evaluated"], asr["anchor_failed"]) == (2, 0) and "matched_wer" not in asr
    assert test["scores"]["image_qa"]["score"] == 1.0 and oot["scores"]["image_qa"]["score"] == 0.5
    assert test["counts"] == {"samples": 5, "generated": 5, "unparsable": 0, "failed": 0, "invalid": 0}
    assert oot["counts"]["samples"] == 4 and result["counts"]["samples"] == 9
    assert result["settings"]["anchor"] == anchor.describe() and anchor.calls == [3, 1]  # batches of batch_size

    out = tmp_path / "out"
    saved = json.loads((out / "tiny.json").read_text())
    assert saved["splits"]["oot"]["scores"]["asr"]["wer_ratio"] == 2.0 and saved["scores"] == result["scores"]
    predictions = _lines(out / "tiny.predictions.jsonl")
    assert [p["split"] for p in predictions] == ["test"] * 5 + ["oot"] * 4
    o0 = next(p for p in predictions if p["id"] == "oot_asr_0")
    assert (o0["prediction"], o0["anchor_prediction"]) == ("lists hold many python objects",
                                                           "lists hold any python object")
    assert o0["anchor_normalized_prediction"] == "lists hold any python object"
    table = (out / "tiny.md").read_text()
    print(table)
    assert "| kind | metric | in-template (test) | out-of-template (oot) |" in table
    assert "| asr | wer | 10.0 | 25.0 | 2 / 2 | 2 / 2 |" in table
    assert "| asr: anchor fake-whisper (beam 5) | wer | 20.0 | 12.5 | 2 / 2 | 2 / 2 |" in table
    assert "| asr: model / anchor | wer_ratio | 0.50x | 2.00x |" in table
    assert "| audio_qa | exact_match | 100.0 | - | 1 / 1 | - |" in table
    assert "| oot | 4 | 4 | 0 | 0 | 0 |" in table

    # one split only: the classic table, its scores in `scores`
    only = evaluate(model, proc, "tiny", data=world, split="oot", anchor=FakeAnchor(), progress=False)
    assert list(only["splits"]) == ["oot"] and only["scores"]["asr"]["wer_ratio"] == 2.0
    text = runner.markdown_table([only])
    assert "| tiny | asr | wer | 25.0 | 2 / 2 | 0 | 0 | 0 |" in text
    assert "| tiny | asr: anchor fake-whisper (beam 5) | wer | 12.5 | 2 / 2 | 0 | 0 | 0 |" in text
    assert "| tiny | asr: model / anchor | wer_ratio | 2.00x |" in text


def test_anchor_failures_and_ratio_on_the_same_clips(micro, tmp_path, monkeypatch):
    world = _micro_world(tmp_path / "world")
    model, proc = micro
    monkeypatch.setattr(runner, "generate_texts", _micro_answers(proc))
    result = evaluate(model, proc, "tiny", data=world, split="test", kinds=["asr"], anchor=FakeAnchor({"t1.wav"}),
                      progress=False)
    asr = result["scores"]["asr"]
    # t1 is refused: the anchor's WER (1 in 5) and the ratio use t0 alone, where the model makes no error
    assert (asr["anchor_evaluated"], asr["anchor_failed"]) == (1, 1)
    assert (asr["anchor_wer"], asr["matched_wer"], asr["wer_ratio"]) == (0.2, 0.0, 0.0)
    assert asr["score"] == pytest.approx(0.1)  # the model's own score is unchanged
    t1 = next(p for p in result["predictions"] if p["id"] == "test_asr_1")
    assert t1["anchor_prediction"] is None and "31.0 s" in t1["anchor_error"]
    assert any(i.startswith("anchor: InputError") for i in result["issues"])
    # no ASR: the anchor is not used
    assert "anchor" not in evaluate(model, proc, "tiny", data=world, kinds=["image_qa"], anchor=FakeAnchor(),
                                    progress=False)["settings"]


def test_tiny_side_by_side_cli(micro_dir, tmp_path, monkeypatch):
    from omniola.cli import app
    from omniola.errors import ComponentNotFoundError
    from omniola.evaluation import anchor as anchor_module

    world = _micro_world(tmp_path / "world")
    made = []

    def fake_whisper(model="whisper-tiny.en", **kwargs):
        made.append((model, kwargs))
        if model == "missing":
            raise ComponentNotFoundError("the Whisper anchor 'missing' is neither an offline name nor a directory")
        return FakeAnchor()

    monkeypatch.setattr(anchor_module, "WhisperAnchor", fake_whisper)
    base = ["eval", "--model", str(micro_dir), "--task", "tiny", "--data", str(world), "--quiet",
            "--max-new-tokens", "3", "--device", "cpu"]
    cli = CliRunner().invoke(app, base + ["--out", str(tmp_path / "r")])
    assert cli.exit_code == 0, cli.output
    assert "| kind | metric | in-template (test) | out-of-template (oot) |" in cli.stdout
    assert "| asr: anchor fake-whisper (beam 5) | wer | 20.0 | 12.5 |" in cli.stdout  # on by default
    assert made == [("whisper-tiny.en", {"device": "cpu", "batch_size": 8})]
    saved = json.loads((tmp_path / "r" / "tiny.json").read_text())
    assert set(saved["splits"]) == {"test", "oot"} and "anchor_wer" in saved["splits"]["oot"]["scores"]["asr"]

    cli = CliRunner().invoke(app, base + ["--split", "oot", "--no-anchor", "--out", str(tmp_path / "o")])
    assert cli.exit_code == 0, cli.output
    assert "| tiny | asr | wer |" in cli.stdout and "anchor" not in cli.stdout and "image_qa" in cli.stdout
    assert len(made) == 1

    cli = CliRunner().invoke(app, base + ["--anchor-model", "missing", "--out", str(tmp_path / "m")])
    assert cli.exit_code == 2 and "'missing' is neither" in cli.output  # asked for by name: an error

    monkeypatch.setattr(anchor_module, "WhisperAnchor", lambda *a, **k: fake_whisper("missing"))
    cli = CliRunner().invoke(app, base + ["--out", str(tmp_path / "w")])
    assert cli.exit_code == 0 and "warning: no Whisper anchor" in cli.output  # default on: a warning
    cli = CliRunner().invoke(app, base + ["--anchor", "--out", str(tmp_path / "a")])
    assert cli.exit_code == 2
