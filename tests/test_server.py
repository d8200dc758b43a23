"""The OpenAI-compatible server, driven over loopback by the official `openai` client, on a micro random model."""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import socket
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from conftest import LiveServer, micro_model  # noqa: E402

from omniola.server.app import create_app  # noqa: E402
from omniola.server.settings import ServerSettings  # noqa: E402
from omniola.speech import ToneBackend, split_sentences, wav_bytes  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KEY = "test-key"
TONE = ToneBackend(sample_rate=16000, seconds_per_char=0.002)


@pytest.fixture(scope="module")
def server():
    model, processor = micro_model()
    settings = ServerSettings(api_keys=(KEY,), speech_backend=lambda: TONE, max_image_pixels=128 * 128,
                              max_audio_seconds=3.0, max_tokens=64, default_max_tokens=8, max_concurrent=2,
                              max_waiting=4)
    live = LiveServer(create_app(settings, model, processor))
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _png_data_url(size=(40, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav_b64(seconds: float, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    return base64.b64encode(wav_bytes((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate)).decode()


def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------------ happy paths
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["omniola"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_non_streaming_and_streaming_agree(client):
    kwargs = dict(model="omniola", messages=_user("Hello, who are you?"), max_tokens=6, temperature=0)
    full = client.chat.completions.create(**kwargs)
    choice = full.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert full.usage.completion_tokens <= 6 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert choice.finish_reason == ("length" if full.usage.completion_tokens == 6 else "stop")

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason

    other = client.chat.completions.create(**{**kwargs, "max_tokens": None}, max_completion_tokens=3)
    assert other.usage.completion_tokens <= 3


def test_sampling_with_seed_is_reproducible(client):
    kwargs = dict(model="omniola", messages=_user("hi"), max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_stop_string_is_cut(client):
    base = client.chat.completions.create(model="omniola", messages=_user("abc"), max_tokens=12)
    text = base.choices[0].message.content
    if len(text) < 4:
        pytest.skip("the random micro model answered too little to pick a stop string")
    stop = text[2:4]
    cut = client.chat.completions.create(model="omniola", messages=_user("abc"), max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="omniola", messages=_user("abc"), max_tokens=12, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.find(stop)]


def test_image_audio_and_video_inputs(client):
    text_only = client.chat.completions.create(model="omniola", messages=_user("What is it?"), max_tokens=2)
    image = client.chat.completions.create(model="omniola", max_tokens=2, messages=_user([
        {"type": "image_url", "image_url": {"url": _png_data_url()}}, {"type": "text", "text": "What is it?"}]))
    assert image.usage.prompt_tokens > text_only.usage.prompt_tokens
    audio = client.chat.completions.create(model="omniola", max_tokens=2, messages=_user([
        {"type": "input_audio", "input_audio": {"data": _wav_b64(1.0), "format": "wav"}}]))
    assert audio.usage.prompt_tokens > 10
    clip = base64.b64encode((EXAMPLES / "clip.mp4").read_bytes()).decode()
    video = client.chat.completions.create(model="omniola", max_tokens=2, messages=_user([
        {"type": "video", "video": {"url": f"data:video/mp4;base64,{clip}"}}, {"type": "text", "text": "What?"}]))
    assert video.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_audio_output_non_streaming(client):
    out = client.chat.completions.create(model="omniola", messages=_user("Say hi"), max_tokens=16,
                                         modalities=["text", "audio"], audio={"voice": "default", "format": "wav"})
    audio = out.choices[0].message.audio
    assert out.choices[0].message.content is None and audio.id.startswith("audio_") and audio.expires_at > 0
    with wave.open(io.BytesIO(base64.b64decode(audio.data))) as w:
        assert w.getframerate() == TONE.sample_rate and w.getsampwidth() == 2
        assert w.getnframes() == sum(TONE.num_samples(s) for s in split_sentences(audio.transcript))


@pytest.mark.parametrize("fmt", ["pcm16", "wav"])
def test_audio_output_streaming(client, fmt):
    stream = client.chat.completions.create(model="omniola", messages=_user("Tell me a story"), max_tokens=40,
                                            modalities=["text", "audio"], audio={"voice": "default", "format": fmt},
                                            stream=True)
    data, transcript, ids = b"", "", set()
    for chunk in stream:
        for choice in chunk.choices:
            audio = getattr(choice.delta, "audio", None) or (choice.delta.model_extra or {}).get("audio")
            if audio:
                audio = audio if isinstance(audio, dict) else audio.model_dump()
                ids.add(audio["id"])
                data += base64.b64decode(audio.get("data") or "")
                transcript += audio.get("transcript") or ""
    assert len(ids) == 1
    if fmt == "wav":
        assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
        data = data[44:]
    expected = sum(TONE.num_samples(s) for s in split_sentences(transcript))
    assert len(data) == 2 * expected


def test_audio_voice_chooses_among_installed_voices(client):
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's names are not faked
        client.chat.completions.create(model="omniola", messages=_user("Hi"), max_tokens=2,
                                       modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    body = err.value.body
    assert body["param"] == "audio.voice" and body["code"] == "voice_not_found" and "default" in body["message"]
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = client.chat.completions.create(model="omniola", messages=_user("Say hi"), max_tokens=16,
                                         modalities=["text", "audio"], audio={"voice": "espeak-en-us", "format": "wav"})
    with wave.open(io.BytesIO(base64.b64decode(out.choices[0].message.audio.data))) as w:
        assert w.getframerate() == 22050 and (w.getnframes() > 0) == bool(out.choices[0].message.audio.transcript.strip())


# ------------------------------------------------------------------------------------------------------ auth
def test_api_key_required(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model="omniola", messages=_user("hi"), max_tokens=1)
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": _user("hi")})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# --------------------------------------------------------------------------------------------- bad requests
def _bad_requests() -> list[tuple[str, bytes | dict]]:
    ok = {"model": "omniola", "messages": _user("hi"), "max_tokens": 2}
    big = _png_data_url((200, 200))
    cases: list = [
        ("not json", b"{not json"),
        ("empty", b""),
        ("array", b"[]"),
        ("bytes", bytes(range(256))),
        ("no messages", {"model": "omniola"}),
        ("empty messages", {**ok, "messages": []}),
        ("role", {**ok, "messages": [{"role": "robot", "content": "hi"}]}),
        ("part type", {**ok, "messages": _user([{"type": "hologram", "hologram": {}}])}),
        ("part shape", {**ok, "messages": _user([{"type": "image_url", "image_url": "nope"}])}),
        ("b64", {**ok, "messages": _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}])}),
        ("not an image", {**ok, "messages": _user([{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"hello world").decode()}}])}),
        ("huge image", {**ok, "messages": _user([{"type": "image_url", "image_url": {"url": big}}])}),
        ("http image", {**ok, "messages": _user([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}])}),
        ("file url", {**ok, "messages": _user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])}),
        ("audio b64", {**ok, "messages": _user([{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}])}),
        ("audio corrupt", {**ok, "messages": _user([{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(b"RIFF0000WAVEjunk" * 10).decode(), "format": "wav"}}])}),
        ("audio format", {**ok, "messages": _user([{"type": "input_audio", "input_audio": {"data": _wav_b64(0.5), "format": "aiff"}}])}),
        ("audio too long", {**ok, "messages": _user([{"type": "input_audio", "input_audio": {"data": _wav_b64(4.0), "format": "wav"}}])}),
        ("video path", {**ok, "messages": _user([{"type": "video", "video": {"path": "/etc/passwd"}}])}),
        ("video corrupt", {**ok, "messages": _user([{"type": "video", "video": {"url": "data:video/mp4;base64,AAAA"}}])}),
        ("video empty", {**ok, "messages": _user([{"type": "video", "video": {}}])}),
        ("negative max_tokens", {**ok, "max_tokens": -1}),
        ("zero max_tokens", {**ok, "max_tokens": 0}),
        ("enormous max_tokens", {**ok, "max_tokens": 10**12}),
        ("enormous max_completion_tokens", {**ok, "max_completion_tokens": 65}),
        ("max_tokens string", {**ok, "max_tokens": "lots"}),
        ("temperature", {**ok, "temperature": -1}),
        ("top_p", {**ok, "top_p": 7}),
        ("n", {**ok, "n": 3}),
        ("seed", {**ok, "seed": -5}),
        ("modalities", {**ok, "modalities": ["smell"]}),
        ("audio without modality", {**ok, "audio": {"voice": "x", "format": "wav"}}),
        ("audio format out", {**ok, "modalities": ["text", "audio"], "audio": {"voice": "x", "format": "flac"}}),
        ("stream type", {**ok, "stream": {"a": 1}}),
        ("media in assistant", {**ok, "messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url()}}]}]}),
    ]
    rng = random.Random(0)
    junk = [None, -1, 10**30, "", "x" * 1000, [], {}, [1, 2], {"type": None}, True, 3.5, "data:,"]
    keys = ["messages", "max_tokens", "temperature", "top_p", "stop", "stream", "modalities", "audio", "seed", "n",
            "stream_options", "max_completion_tokens"]
    while len(cases) < 220:
        body = json.loads(json.dumps(ok))
        for _ in range(rng.randint(1, 3)):
            target = rng.random()
            if target < 0.5:
                body[rng.choice(keys)] = rng.choice(junk)
            elif target < 0.8:
                body["messages"] = [{"role": rng.choice(["user", "system", 5, None]),
                                     "content": rng.choice(junk + [[{"type": rng.choice(["text", "image_url",
                                                                                         "input_audio", "video", "?"]),
                                                                      "text": rng.choice(junk)}]])}]
            else:
                raw = json.dumps(body).encode()
                cut = rng.randint(0, len(raw))
                body = raw[:cut] + bytes([rng.randint(0, 255)]) + raw[cut + 1:]
                break
        cases.append(("fuzz", body))
    return cases


def test_fuzz_never_500_and_server_still_works(server, client):
    statuses = []
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for name, body in _bad_requests():
            if isinstance(body, dict):
                r = http.post("/v1/chat/completions", json=body)
            else:
                r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, (name, body if len(str(body)) < 300 else str(body)[:300], r.text)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], (name, err)
            if name != "fuzz":
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
        assert http.post("/v1/chat/completions", content=b"x" * (33 * 1024 * 1024)).status_code == 413
        assert http.get("/v1/nothing").status_code == 404
    assert len(statuses) >= 200
    ok = client.chat.completions.create(model="omniola", messages=_user("still alive?"), max_tokens=2)
    assert ok.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------------- concurrency, disconnect
@pytest.fixture(scope="module")
def slow_server():
    """One generation at a time, one waiting, and each decoding step takes 50 ms."""
    model, processor = micro_model(step_delay_s=0.05)
    settings = ServerSettings(max_concurrent=1, max_waiting=1, max_tokens=400, warmup=False, retry_after_s=2)
    live = LiveServer(create_app(settings, model, processor))
    yield live
    live.stop()


def _wait_idle(url: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = httpx.get(url + "/health").json()
        if health["running"] == 0 and health["admitted"] == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"slots still taken after {timeout}s: {health}")


def _open_stream(http: httpx.Client, max_tokens: int = 300):
    body = {"messages": _user("go on"), "max_tokens": max_tokens, "stream": True}
    response = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")  # the role chunk: the request holds a slot now
    response.lines = lines  # keep the iterator alive: dropping it closes the connection
    return response


def test_saturated_server_answers_429_and_disconnect_frees_slots(slow_server):
    with httpx.Client(base_url=slow_server.url, timeout=30) as a, httpx.Client(base_url=slow_server.url,
                                                                                timeout=30) as b:
        running = _open_stream(a)
        # the second request waits for the slot: send it on a thread, it blocks until the first ends
        waiting_status = []
        waiter = threading.Thread(target=lambda: waiting_status.append(
            b.post("/v1/chat/completions", json={"messages": _user("x"), "max_tokens": 2}).status_code))
        waiter.start()
        deadline = time.monotonic() + 10
        while httpx.get(slow_server.url + "/health").json()["admitted"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        full = httpx.post(slow_server.url + "/v1/chat/completions", json={"messages": _user("x"), "max_tokens": 2})
        assert full.status_code == 429 and full.headers["Retry-After"] == "2"
        assert full.json()["error"]["type"] == "rate_limit_exceeded"
        started = time.monotonic()
        running.close()  # the client goes away mid-stream (300 tokens would take 15 s)
        waiter.join(timeout=20)
        assert waiting_status == [200] and time.monotonic() - started < 5
    assert _wait_idle(slow_server.url, 5) < 5


def test_disconnect_stops_generation_at_once(slow_server):
    with httpx.Client(base_url=slow_server.url, timeout=30) as http:
        response = _open_stream(http)
        time.sleep(0.2)
        assert httpx.get(slow_server.url + "/health").json()["running"] == 1
        response.close()
    freed = _wait_idle(slow_server.url, 5)
    assert freed < 2  # 300 steps of 50 ms would hold the slot for 15 s
    ok = httpx.post(slow_server.url + "/v1/chat/completions", json={"messages": _user("x"), "max_tokens": 2})
    assert ok.status_code == 200


def test_serve_command_starts_an_authenticated_server(micro_dir):
    import os
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMNIOLA_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "omniola.cli", "serve", "--model", str(micro_dir),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "omniola serve did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        out = client.chat.completions.create(model="omniola", messages=_user("hi"), max_tokens=2)
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
