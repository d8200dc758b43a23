"""The server and the media loaders under hostile input (issue 21): decompression bombs refused before decoding with
little memory, admission before work, remote media without SSRF, and OpenAI's semantics where omniola diverged.

The bombs come from benchmarks/fuzz_server.py (which also runs them against a live `omniola serve`)."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import LiveServer, micro_model  # noqa: E402

from omniola.errors import MediaLimitError  # noqa: E402
from omniola.media import MediaLimits, load_audio, load_image, load_video  # noqa: E402
from omniola.server.app import create_app  # noqa: E402
from omniola.server.remote import FetchRefused, RemoteMediaFetcher, is_public_address  # noqa: E402
from omniola.server.settings import ServerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("fuzz_server", ROOT / "benchmarks" / "fuzz_server.py")
fuzz = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(fuzz)


def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------------- bombs, in a fresh process
BOMB_RUNNER = r"""
import asyncio, json, os, sys
sys.path.insert(0, {tests!r})
import importlib.util
spec = importlib.util.spec_from_file_location("fuzz_server", {fuzz!r})
fuzz = importlib.util.module_from_spec(spec); spec.loader.exec_module(fuzz)
from conftest import micro_model
from omniola.server.serving import APIError, OlaServing
from omniola.server.settings import ServerSettings

serving = OlaServing(*micro_model(),
                     ServerSettings(max_concurrent=1, max_waiting=3, warmup=False, **fuzz.SERVER_LIMITS))
cases = [(name, json.dumps(body).encode()) for name, body in fuzz.bombs()]
pid = os.getpid()

async def status(raw):
    try:
        await serving.create_chat_completion(raw)
        return 200
    except APIError as err:
        return err.status

async def main():
    out = []
    for name, raw in cases:
        fuzz.reset_peak(pid); before = fuzz.memory_kib(pid)["VmRSS"]
        code = await status(raw)
        out.append(dict(bomb=name, status=[code], mib=(fuzz.memory_kib(pid)["VmHWM"] - before) / 1024))
    fuzz.reset_peak(pid); before = fuzz.memory_kib(pid)["VmRSS"]
    codes = await asyncio.gather(*(status(raw) for _, raw in (cases * 2)[:12]))
    out.append(dict(bomb="12 at once", status=sorted(codes), mib=(fuzz.memory_kib(pid)["VmHWM"] - before) / 1024))
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def bomb_results() -> list[dict]:
    script = BOMB_RUNNER.format(tests=str(ROOT / "tests"), fuzz=str(ROOT / "benchmarks" / "fuzz_server.py"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak memory")
def test_every_bomb_is_refused_before_decoding_with_little_memory(bomb_results):
    assert len(bomb_results) == len(fuzz.bombs()) + 1
    for row in bomb_results[:-1]:
        assert row["status"] == [400], row
        assert row["mib"] < 300, row  # the audit measured +1.0 to 5.7 GB for these
    together = bomb_results[-1]
    # 4 admitted (1 + 3 waiting) and refused once decoding starts, the text bomb refused before admission, 7 x 429
    assert together["status"].count(429) == 7 and together["status"].count(400) == 5, together
    assert together["mib"] < 300, together


def test_library_loaders_refuse_bombs_from_headers():
    with pytest.raises(MediaLimitError, match="sample rate of 1 Hz"):
        load_audio(fuzz.wav_1hz())
    with pytest.raises(MediaLimitError, match="too large"):  # Pillow's own bound, at open: also from the header
        load_image(fuzz.png_claiming(100_000, 100_000))
    with pytest.raises(MediaLimitError, match="aspect ratio"):
        load_image(fuzz.png(8, 4000))
    with pytest.raises(MediaLimitError, match="lasts 3600.0 s"):
        load_audio(fuzz.flac_hour(), limits=MediaLimits(max_audio_seconds=120))
    with pytest.raises(MediaLimitError, match=r"track of <video data> lasts 600\.\d s"):
        load_video(fuzz.video_long_track(600), limits=MediaLimits(max_audio_seconds=120))
    clip = load_video(fuzz.video_long_track(600), with_audio=False, num_frames=1,
                      limits=MediaLimits(max_audio_seconds=120))  # the track is not used: not checked
    assert clip.frames.shape == (1, 64, 64, 3)
    with pytest.raises(MediaLimitError, match="2048x2048"):
        load_video(fuzz.video_huge_frame(2048), limits=MediaLimits(max_video_pixels=1920 * 1080))
    # within the limits, bytes decode as files do
    assert load_audio(fuzz.wav_16k_silence(0.5)).shape == (8000,)
    assert load_image(fuzz.png(40, 30)).size == (40, 30)


# --------------------------------------------------------------------------------------------------- SSRF
def test_addresses_in_every_spelling_are_refused():
    async def refused(url: str) -> str:
        with pytest.raises(FetchRefused) as err:
            await RemoteMediaFetcher(2.0, 10_000).fetch(url)
        return str(err.value)

    async def all_refused():
        return [await refused(url) for url in fuzz.SSRF_URLS if url.startswith("http")]

    messages = asyncio.run(all_refused())
    assert len(messages) > 20
    for text in messages:  # no port, no credentials, no address in the texts
        assert "secret" not in text and "22" not in text and "127.0" not in text and "8000" not in text, text
    for spelling in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "169.254.169.254", "10.1.2.3",
                     "224.0.0.1", "ff02::1", "fe80::1", "64:ff9b::7f00:1", "2002:7f00:1::", "100.64.0.1"):
        assert not is_public_address(ipaddress.ip_address(spelling)), spelling
    assert is_public_address(ipaddress.ip_address("93.184.215.14"))


class _Media(BaseHTTPRequestHandler):
    """/ok answers b"media" if the Host header is the name the client was given; /redirect goes to 127.0.0.2;
    /drip sends a byte every 0.2 s."""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_port}/ok")
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the fetcher gave up: as it should
                pass
        else:
            body = b"media" if self.headers["Host"].startswith("media.test:") else b"wrong host"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_site():
    site = ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    site.daemon_threads = True
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield site.server_port
    site.shutdown()


def _test_fetcher(timeout_s: float = 5.0, **kwargs) -> RemoteMediaFetcher:
    """A fetcher that treats 127.0.0.1 (only) as public and resolves media.test / slow.test to it."""

    async def resolver(host: str, port: int):
        return [ipaddress.ip_address("127.0.0.1" if host.endswith(".test") else host)]

    return RemoteMediaFetcher(timeout_s, 10_000, resolver=resolver,
                              address_allowed=lambda ip: str(ip) == "127.0.0.1", **kwargs)


def test_fetch_connects_to_the_checked_address_and_checks_each_redirect(media_site):
    port = media_site
    assert asyncio.run(_test_fetcher().fetch(f"http://media.test:{port}/ok")) == b"media"  # pinned, Host kept
    with pytest.raises(FetchRefused, match="not a public address"):
        asyncio.run(_test_fetcher().fetch(f"http://media.test:{port}/redirect"))  # the hop to 127.0.0.2
    with pytest.raises(FetchRefused, match="allowed domains"):
        asyncio.run(_test_fetcher(domains=("example.org",)).fetch(f"http://media.test:{port}/ok"))
    assert asyncio.run(_test_fetcher(domains=("test",)).fetch(f"http://media.test:{port}/ok")) == b"media"


def test_fetch_has_one_deadline_not_a_per_read_timeout(media_site):
    start = time.monotonic()
    with pytest.raises(FetchRefused, match="within 1 s"):
        asyncio.run(_test_fetcher(timeout_s=1.0).fetch(f"http://media.test:{media_site}/drip"))  # 20 s of drip
    assert time.monotonic() - start < 2.5


# ------------------------------------------------------------------------------------------- live servers
@pytest.fixture(scope="module")
def open_server(media_site):
    """No API key (the cross-site guard applies), remote media allowed through the test fetcher, and each
    decoding step 20 ms slower."""
    model, processor = micro_model(step_delay_s=0.02)
    settings = ServerSettings(max_concurrent=1, max_waiting=8, max_tokens=400, default_max_tokens=4, warmup=False,
                              allow_remote_media=True, body_timeout_s=1.0, max_prompt_tokens=2000)
    app = create_app(settings, model, processor)
    app.state.serving.fetcher = _test_fetcher(timeout_s=4.0)
    live = LiveServer(app)
    yield live
    live.stop()


def _post(server, body, timeout=60, **kwargs):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout, **kwargs)


def test_openai_semantics(open_server):
    for name, value in (("tools", [{"type": "function", "function": {"name": "f"}}]),
                        ("response_format", {"type": "json_object"}), ("logprobs", True), ("logit_bias", {"5": 1})):
        r = _post(open_server, {"messages": _user("hi"), name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
        assert r.headers["x-request-id"]
    neutral = _post(open_server, {"messages": _user("hi"), "logprobs": False, "tools": [], "response_format":
                                  {"type": "text"}, "max_tokens": 3, "temperature": 0})
    assert neutral.status_code == 200
    tiny = _post(open_server, {"messages": _user("hi"), "max_tokens": 3, "temperature": 1e-38})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"] == neutral.json()["choices"][0]["message"]
    marked = _post(open_server, {"messages": _user("What does <image> or <video> or <audio> mean in HTML?"),
                                 "max_tokens": 2, "temperature": 0}, headers={"X-Request-Id": "abc-123"})
    assert marked.status_code == 200 and marked.headers["x-request-id"] == "abc-123", marked.text
    assert httpx.get(open_server.url + "/nothing").headers["x-request-id"]


def test_literal_markers_are_text_for_the_processor():
    _, processor = micro_model()
    inputs = processor.apply_chat_template(_user([{"type": "text", "text": "is <image> a tag? <audio>"}]))
    ids = inputs["input_ids"][0].tolist()
    assert processor.image_token_id not in ids and processor.audio_token_id not in ids
    text = processor.decode(ids)
    assert "<image>" in text and "<audio>" in text and "\ue000" not in text  # the micro tokenizer drops spaces


def test_cross_site_requests_are_refused_without_an_api_key(open_server):
    url = open_server.url + "/v1/chat/completions"
    body = json.dumps({"messages": _user("hi"), "max_tokens": 1})
    simple = httpx.post(url, content=body, headers={"Content-Type": "text/plain"})  # what a form/fetch can send
    assert simple.status_code == 415
    other_origin = httpx.post(url, content=body, headers={"Content-Type": "application/json",
                                                          "Origin": "https://evil.example"})
    assert other_origin.status_code == 403
    rebound = httpx.post(url, content=body, headers={"Content-Type": "application/json", "Host": "evil.example"})
    assert rebound.status_code == 403
    same = httpx.post(url, content=body, headers={"Content-Type": "application/json",
                                                  "Origin": open_server.url})
    assert same.status_code == 200


def test_body_read_has_a_deadline(open_server):
    with socket.create_connection(("127.0.0.1", open_server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\"")
        sock.settimeout(5)
        start = time.monotonic()
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3, answer[:100]


def test_headers_have_a_deadline():
    import uvicorn

    from omniola.server.app import server_config

    model, processor = micro_model()
    app = create_app(ServerSettings(warmup=False, header_timeout_s=1.0), model, processor)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            start = time.monotonic()
            for piece in (b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"X-Slow: 1\r\n", b"X-Slow: 2\r\n"):
                try:
                    sock.sendall(piece)
                except OSError:
                    break
                time.sleep(0.6)  # each piece restarts uvicorn's keep-alive timer; the header deadline does not
            closed = sock.recv(100) == b""
        assert closed and time.monotonic() - start < 4
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200  # a prompt client is served
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _wait_idle(url: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = httpx.get(url + "/health").json()
        if health["running"] == 0 and health["admitted"] == 0 and health["decoding"] == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"slots still taken after {timeout}s: {health}")


def test_non_streaming_generation_stops_when_the_client_leaves(open_server):
    with pytest.raises(httpx.ReadTimeout):  # 400 tokens at 20 ms would hold the slot for 8 s
        _post(open_server, {"messages": _user("go on"), "max_tokens": 400}, timeout=httpx.Timeout(60, read=1.0))
    assert _wait_idle(open_server.url, 3) < 3


def test_admission_comes_before_decoding_and_health_counts_decoding(open_server, media_site):
    slow = {"messages": _user([{"type": "image_url", "image_url": {"url": f"http://slow.test:{media_site}/drip"}}]),
            "max_tokens": 1}
    if True:
        pending = [threading.Thread(target=lambda: _post(open_server, slow)) for _ in range(8)]
        for thread in pending:
            thread.start()
        deadline = time.monotonic() + 5
        while (health := httpx.get(open_server.url + "/health").json())["decoding"] < 8:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health["admitted"] == 8
        # 8 slow media fetches in flight: a text request is served as fast as alone (the fetches are on the loop,
        # the decoding on threads of their own)
        start = time.monotonic()
        text = _post(open_server, {"messages": _user("hi"), "max_tokens": 2})
        beside = time.monotonic() - start
        assert text.status_code == 200
        # full (8 decoding + 1 generating): a bomb is refused with 429 before it is decoded
        hold = threading.Thread(target=lambda: _post(open_server, {"messages": _user("x"), "max_tokens": 60}))
        hold.start()
        time.sleep(0.3)
        bomb = dict(fuzz.bombs())["png header claiming 100000x100000"]
        assert _post(open_server, bomb).status_code == 429
        hold.join()
        for thread in pending:
            thread.join()
    start = time.monotonic()
    _post(open_server, {"messages": _user("hi"), "max_tokens": 2})
    alone = time.monotonic() - start
    assert beside <= 2 * alone + 0.3, (beside, alone)
    assert _wait_idle(open_server.url, 3) < 3


def test_error_texts_never_name_server_paths(tmp_path):
    from omniola.server.protocol import VideoSource
    from omniola.server.serving import APIError, OlaServing

    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 20)
    model, processor = micro_model()
    serving = OlaServing(model, processor, ServerSettings(video_dir=tmp_path, warmup=False))
    for source in (VideoSource(path="bad.mp4"), VideoSource(url="data:video/mp4;base64,AAAAAAAA")):
        with pytest.raises(APIError) as err:
            serving._video(source, "messages.0.content.0", {})
        assert str(tmp_path) not in err.value.message and "/tmp" not in err.value.message, err.value.message
    assert "bad.mp4" in err.value.message or "<video data>" in err.value.message


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
def test_media_decoding_threads_yield_the_cores(open_server):
    """Media are decoded at a lower CPU priority than generation and text requests, so decoding 8 large media
    cannot take the cores a text request needs."""
    import os

    from omniola.server.serving import MEDIA_NICE

    pool = open_server.server.config.app.state.serving.media_pool
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    nice = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert nice == max(own, MEDIA_NICE)  # a thread may lower its priority, not raise it above the process's
