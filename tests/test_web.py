"""The Gradio demo: the chat logic on a micro model, the page built without launching, and (when Chromium is
installed) a real browser asking a question on loopback."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from omniola.speech import ToneBackend
from omniola.web import WebChat

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def test_multi_turn_with_media_and_speech(micro):
    model, processor = micro
    chat = WebChat(model, processor, speech=ToneBackend(sample_rate=8000), max_new_tokens=6)
    rate = 16000
    audio = (rate, (np.sin(np.arange(rate) / 10) * 3000).astype(np.int16))  # what gr.Audio(type="numpy") gives
    from PIL import Image

    turns = list(chat.respond("What is this?", image=Image.new("RGB", (40, 30)), audio=audio))
    last = turns[-1]
    assert last.chat[0] == {"role": "user", "content": "[image] [audio] What is this?"}
    assert last.chat[1]["role"] == "assistant" and last.audio is None and "time_to_first_token_s" in last.timings
    assert [m["role"] for m in last.conversation] == ["user", "assistant"]
    turns = list(chat.respond("And then?", speak=True, voice="default", chat=last.chat,
                              conversation=last.conversation))
    final = turns[-1]
    assert [m["role"] for m in final.conversation] == ["user", "assistant", "user", "assistant"]
    assert len(final.chat) == 4 and final.chat[3]["content"] == final.conversation[3]["content"]
    spoken = [t.audio for t in turns if t.audio is not None]  # one WAV per sentence, played as it comes
    assert spoken and all(w[:4] == b"RIFF" and int.from_bytes(w[24:28], "little") == 8000 for w in spoken)
    assert "time_to_first_audio_s" in final.timings
    with pytest.raises(Exception, match="type a question"):
        list(chat.respond("  "))


def test_demo_builds_without_launching(micro):
    gr = pytest.importorskip("gradio")
    from omniola.web import build_demo

    model, processor = micro
    demo = build_demo(WebChat(model, processor, speech=ToneBackend(), max_new_tokens=4))
    assert isinstance(demo, gr.Blocks)
    kinds = {type(block).__name__ for block in demo.blocks.values()}
    assert {"Chatbot", "Textbox", "Image", "Video", "Audio", "Checkbox", "Button", "Dropdown"} <= kinds


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def _page(demo):
    """The demo served on a free loopback port, open in headless Chromium (sound plays without a gesture)."""
    playwright = pytest.importorskip("playwright.sync_api")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False,
                        quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            yield page
            browser.close()
    finally:
        demo.close()


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_browser_asks_a_question_and_sees_the_streamed_answer(micro):
    pytest.importorskip("gradio")
    from omniola.web import build_demo

    model, processor = micro
    chat = WebChat(model, processor, speech=ToneBackend(), max_new_tokens=8)
    with _page(build_demo(chat)) as page:
        page.locator("#question textarea").fill("What is the capital of France?")
        page.locator("#send").click()
        page.locator("#status").get_by_text("total").wait_for(timeout=60_000)
        chat_text = page.locator("#chatbot").inner_text()
        assert "What is the capital of France?" in chat_text
        answer = chat.respond("What is the capital of France?")  # greedy: the same answer as in the page
        expected = [t for t in answer][-1].chat[-1]["content"]
        assert expected.strip()[:3] in chat_text
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_demo.png"), full_page=True)


class _ScriptedRequest:
    """What the engine yields for a slow spoken answer: the first sentence and its audio at once, then the rest of
    the text over about three seconds."""

    def __iter__(self):
        from omniola.generation import Done, SpeechDelta, TextDelta, Usage

        tone = ToneBackend(sample_rate=16000, seconds_per_char=0.05)
        yield TextDelta("Hello there. ")
        yield SpeechDelta(0, "Hello there.", tone.synthesize("Hello there."), tone.sample_rate)
        for i in range(12):
            time.sleep(0.25)
            yield TextDelta(f"word{i} ")
        yield TextDelta("THE END.")
        yield SpeechDelta(1, "rest", tone.synthesize("The rest."), tone.sample_rate)
        yield Done("stop", "", Usage(1, 14), {"time_to_first_token_s": 0.0, "time_to_first_audio_s": 0.0,
                                               "total_s": 3.0})


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_browser_plays_the_first_sentence_before_the_text_is_complete(micro):
    pytest.importorskip("gradio")
    from omniola.web import build_demo

    model, processor = micro
    chat = WebChat(model, processor, speech=ToneBackend())
    chat.engine.submit = lambda *args, **kwargs: _ScriptedRequest()
    with _page(build_demo(chat)) as page:
        page.locator("#question textarea").fill("Say hello.")
        page.get_by_label("Speak the answer").check()
        page.locator("#send").click()
        page.wait_for_function("() => window.omniolaSpoken && window.omniolaSpoken.played > 0", timeout=30_000)
        assert "THE END" not in page.locator("#chatbot").inner_text()  # the text is still streaming
        page.locator("#status").get_by_text("total").wait_for(timeout=30_000)
        assert "THE END" in page.locator("#chatbot").inner_text()


def test_web_command_is_registered():
    from typer.testing import CliRunner

    from omniola.cli import app

    result = CliRunner().invoke(app, ["web", "--help"])
    assert result.exit_code == 0 and "--port" in result.output and "browser demo" in result.output.lower()
