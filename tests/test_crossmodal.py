"""Cross-modal QA construction (`omniola data crossmodal`): subtitles, prompt file, reply parsing, and the CLI end
to end against a fake OpenAI-compatible server over tiny MP4s with AAC sound."""

from __future__ import annotations

import json
import time
from pathlib import Path

import av
import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from fastapi import FastAPI, Request  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from omniola.data.cli import data_app  # noqa: E402
from omniola.data.crossmodal import (  # noqa: E402
    DEFAULT_PROMPTS,
    Cue,
    GenerationParseError,
    SubtitleError,
    clean_pairs,
    find_subtitles,
    load_prompts,
    parse_qa_pairs,
    parse_srt,
    parse_vtt,
)
from omniola.data.ola_format import convert_record  # noqa: E402
from omniola.errors import ConfigError  # noqa: E402
from conftest import LiveServer  # noqa: E402

SRT = """\ufeff1
00:00:00,000 --> 00:00:00,600
<i>A red square</i> appears.

2
00:00:00,600 --> 00:00:01,000
Then a beep
sounds.
"""

VTT = """WEBVTT - tiny clip

NOTE a comment block

intro
00:00.000 --> 00:00.500 align:start position:10%
Hello <b>there</b>.

01:00:01.250 --> 01:00:02.000
Goodbye.
"""


def test_parse_srt():
    assert parse_srt(SRT) == [Cue(0.0, 0.6, "A red square appears."), Cue(0.6, 1.0, "Then a beep sounds.")]
    with pytest.raises(SubtitleError, match="bad timestamp"):
        parse_srt("1\n00:00:xx,000 --> 00:00:01,000\nhi\n", source="broken.srt")


def test_parse_vtt():
    assert parse_vtt(VTT) == [Cue(0.0, 0.5, "Hello there."), Cue(3601.25, 3602.0, "Goodbye.")]
    with pytest.raises(SubtitleError, match="WEBVTT"):
        parse_vtt(SRT, source="x.vtt")


def test_prompt_file(tmp_path):
    prompts = load_prompts()
    assert DEFAULT_PROMPTS.is_file() and "JSON" in prompts.system
    text = prompts.render(video_name="a.mp4", duration="1.0", num_questions=3, transcript="[0.0 - 1.0] hi",
                          frames="frame 1 at 0.5 s")
    assert "[0.0 - 1.0] hi" in text and "frame 1 at 0.5 s" in text and '[{"question": "...",' in text
    bad = tmp_path / "p.txt"
    bad.write_text("### system\nbe nice\n")
    with pytest.raises(ConfigError, match="user"):
        load_prompts(bad)


def test_parse_and_clean_pairs():
    pairs = [{"question": "Q1?", "answer": "A"}]
    assert parse_qa_pairs(json.dumps(pairs)) == pairs
    assert parse_qa_pairs("Sure! Here you go:\n```json\n" + json.dumps(pairs) + "\n```\nEnjoy.") == pairs
    assert parse_qa_pairs('Note [1]: {"pairs": ' + json.dumps(pairs) + "}") == pairs
    with pytest.raises(GenerationParseError):
        parse_qa_pairs("I cannot help with [that].")
    kept, dropped = clean_pairs(
        [{"question": "What is red?", "answer": "the square"}, {"question": "what is RED", "answer": "x"},
         {"question": "Why?", "answer": "  "}, {"question": " ", "answer": "y"}, "nope", {"q": 1},
         {"question": "Extra?", "answer": "z"}], limit=1)
    assert kept == [("What is red?", "the square")]
    assert dropped == {"duplicate_question": 1, "empty_answer": 1, "empty_question": 1, "invalid_item": 2,
                       "over_limit": 1}


# ---------------------------------------------------------------------------------------------- end to end

FPS, FRAMES, RATE = 10, 10, 16000


def _write_mp4(path: Path, *, with_audio: bool = True) -> Path:
    """A 1 s 32x32 H.264 video (+ a 440 Hz AAC mono tone)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        video.options = {"preset": "ultrafast"}
        if with_audio:
            audio = container.add_stream("aac", rate=RATE)
            audio.layout = "mono"
        for k in range(FRAMES):
            rgb = np.full((32, 32, 3), k * 20, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if with_audio:
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)).astype(np.float32)[None]
            for start in range(0, tone.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts = RATE, start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path


VALID = [{"question": "What colour is the screen when the beep sounds?", "answer": "Light grey."},
         {"question": "What appears while the narrator says 'a red square'?", "answer": "A dark frame."}]
FENCED = "Here are the pairs:\n```json\n" + json.dumps(
    [{"question": "What is shown when the speaker says hello?", "answer": "A black frame."}]) + "\n```"
GARBAGE = "Sorry, I can't produce that {not json at all"
MIXED = json.dumps([{"question": "Is the screen bright when 'goodbye' is said?", "answer": "Yes."},
                    {"question": "What does the speaker say first?", "answer": ""},
                    {"question": "is the screen bright when goodbye is said", "answer": "Yes, very."}])
# One reply per video that reaches the generator, keyed by the video's file name (found in the prompt).
SCRIPT = {"a.mp4": json.dumps(VALID), "b.mp4": FENCED, "c.mp4": GARBAGE, "d.mp4": MIXED}


class FakeOpenAI:
    """A scripted OpenAI-compatible chat-completions server (FastAPI + uvicorn in a thread, free loopback port)."""

    def __init__(self):
        self.requests: list[dict] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            user = body["messages"][-1]["content"]
            name = next(n for n in SCRIPT if f"Video: {n} " in user)
            return {
                "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": SCRIPT[name]},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            }

        self.live = LiveServer(app, timeout_s=20)
        self.url = f"{self.live.url}/v1"

    def stop(self):
        self.live.stop()


@pytest.fixture
def fake_openai():
    server = FakeOpenAI()
    yield server
    server.stop()


def test_crossmodal_cli_end_to_end(tmp_path, fake_openai, monkeypatch):
    videos, out = tmp_path / "videos", tmp_path / "out"
    (videos / "sub").mkdir(parents=True)
    for name in ("a", "c", "d"):
        _write_mp4(videos / f"{name}.mp4")
        (videos / f"{name}.srt").write_text(SRT)
    _write_mp4(videos / "b.mp4")
    (videos / "b.vtt").write_text(VTT)
    _write_mp4(videos / "sub" / "e.mp4")  # no subtitles, --transcriber none: skipped
    _write_mp4(videos / "f.mp4", with_audio=False)  # subtitles but no sound track: skipped
    (videos / "f.srt").write_text(SRT)
    (videos / "notes.txt").write_text("not a video")
    assert find_subtitles(videos / "b.mp4") == videos / "b.vtt"
    monkeypatch.setenv("FAKE_KEY", "sk-test")

    args = ["crossmodal", "--videos", str(videos), "--out", str(out), "--api-base", fake_openai.url,
            "--model", "qa-writer", "--api-key-env", "FAKE_KEY", "--frames", "4", "--questions-per-video", "3",
            "--transcriber", "none"]
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert "4 records from 3/6 videos" in result.output

    # one request per video with a transcript and sound; the prompt carries the transcript and frame times
    assert len(fake_openai.requests) == 4
    first = fake_openai.requests[0]
    assert first["model"] == "qa-writer" and first["messages"][0]["role"] == "system"
    user = first["messages"][1]["content"]
    assert "Video: a.mp4 (1.0 s)" in user and "[0.0 - 0.6] A red square appears." in user
    assert "frame 1 at 0.1 s" in user and "frame 4 at 0.9 s" in user and "Write 3 question-answer pairs" in user

    records = json.loads((out / "crossmodal.json").read_text())
    assert [r["id"] for r in records] == ["a_0", "a_1", "b_0", "d_0"]
    assert records[0] == {
        "id": "a_0", "video": "../videos/a.mp4", "audio": "../videos/a.mp4",
        "conversations": [{"from": "human", "value": "<speech><image>\n" + VALID[0]["question"]},
                          {"from": "gpt", "value": VALID[0]["answer"]}],
    }
    assert records[3]["conversations"][1]["value"] == "Yes."
    report = json.loads((out / "crossmodal_report.json").read_text())
    assert report == {
        "videos": 6, "videos_with_records": 3, "videos_resumed": 0, "records": 4,
        "skipped_videos": {"no_audio": 1, "no_subtitles": 1},
        "dropped": {"duplicate_question": 1, "empty_answer": 1, "unparsable_generation": 1},
        "transcript_source": {"subtitles": 4},
    }

    # the records are valid Ola video + audio records, resolved against --out
    converted = convert_record(records[2], out)
    parts = converted.messages[0]["content"]
    assert [p["type"] for p in parts] == ["audio", "video", "text"]
    assert Path(parts[1]["video"]).resolve() == (videos / "b.mp4").resolve()

    # resumable: a rerun asks nothing and writes the same records
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert len(fake_openai.requests) == 4
    assert json.loads((out / "crossmodal.json").read_text()) == records
    assert json.loads((out / "crossmodal_report.json").read_text())["videos_resumed"] == 6


def test_crossmodal_cli_needs_a_generator(tmp_path):
    result = CliRunner().invoke(data_app, ["crossmodal", "--videos", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "--api-base" in result.output


def test_transcriber_and_describe_frames_hooks(tmp_path):
    """Without subtitles the Transcriber gives the cues; the describe-frames hook adds text per frame."""
    from omniola.data.crossmodal import build_crossmodal, make_transcriber

    videos = tmp_path / "videos"
    videos.mkdir()
    _write_mp4(videos / "clip.mp4")
    heard, prompts_seen = [], []

    def transcriber(audio, sampling_rate):
        heard.append((audio.shape, sampling_rate))
        return [Cue(0.0, 1.0, "a steady tone")]

    def generator(system, user):
        prompts_seen.append(user)
        return json.dumps([{"question": "What is seen while the tone plays?", "answer": "A fading frame."}])

    report = build_crossmodal(videos, tmp_path / "out", generator=generator, transcriber=transcriber,
                              num_frames=2, questions_per_video=1,
                              describe_frames=lambda frames, times: [f"mean {f.mean():.0f}" for f in frames])
    assert report.records == 1 and report.transcript_source == {"transcriber": 1}
    assert heard and heard[0][1] == 16000 and 15000 < heard[0][0][0] < 17000
    assert "[0.0 - 1.0] a steady tone" in prompts_seen[0] and "frame 1 at 0.2 s: mean " in prompts_seen[0]

    missing = make_transcriber(str(tmp_path / "no-such-whisper"))
    with pytest.raises(ConfigError, match="no local Whisper model"):
        missing(np.zeros(1600, np.float32), 16000)
    assert make_transcriber("none") is None


def test_local_model_generator(micro_dir):
    """`--local-model`: a saved omniola checkpoint answers through load_model + TextStream (text only)."""
    from omniola.data.crossmodal import LocalModelGenerator

    generator = LocalModelGenerator(micro_dir, device="cpu", max_new_tokens=4)
    reply = generator("Reply with JSON.", "Video: a.mp4 (1.0 s)")
    assert isinstance(reply, str)  # random weights: any text, possibly empty
