"""A browser demo: `omniola web` (Gradio).

Type a question, attach an image, a video or audio (upload or microphone), and watch the answer stream in; with
"Speak the answer" the reply is spoken sentence by sentence while it is generated (Piper by default, offline, or any
installed voice), and each sentence plays as soon as it is ready, while the text goes on. The conversation is multi-turn: earlier questions, media and answers are sent
again with each new question.

`WebChat` holds the logic and is usable (and tested) without Gradio; `build_demo` only lays out the page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import OmniolaError
from .generation import Done, Engine, GenerationOptions, SpeechDelta, TextDelta
from .speech import SpeechBackend, wav_bytes
from .voices import VoiceRegistry


@dataclass
class Turn:
    """What the page shows after each streamed piece."""

    chat: list[dict]  # [{"role": "user" | "assistant", "content": str}] for the chatbot
    conversation: list[dict]  # processor messages, media included, for the next turn
    audio: bytes | None = None  # a WAV file of the sentence spoken since the last turn, to play now
    timings: dict = field(default_factory=dict)


class WebChat:
    """Multi-turn chat with one loaded model.

    Args:
        model, processor: a loaded omniola model and its processor.
        speech: a voice offered first, as `default` (tests); the installed voices (`omniola.voices`) follow it.
        max_new_tokens: the answer length limit.
    """

    def __init__(self, model, processor, *, speech: SpeechBackend | None = None, max_new_tokens: int = 256):
        self.model, self.processor = model, processor
        self.engine = Engine(model, processor)  # browser tabs asking at once are decoded together
        self.voices = VoiceRegistry(default=None if speech is None else lambda: speech)
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def user_message(text: str, image=None, video=None, audio=None) -> tuple[dict, str]:
        """The processor message of one question, and how the chat shows it.

        Args:
            text: the typed question (may be empty with media).
            image: a PIL image or path; video: a path; audio: Gradio's `(rate, samples)` or a path.
        """
        parts, shown = [], []
        if image is not None:
            parts.append({"type": "image", "image": image})
            shown.append("[image]")
        if video:
            parts.append({"type": "video", "video": video})
            shown.append("[video]")
        if audio is not None:
            if isinstance(audio, tuple):  # Gradio gives (rate, samples); omniola takes (samples, rate)
                rate, samples = audio
                audio = (np.asarray(samples), int(rate))
            parts.append({"type": "audio", "audio": audio})
            shown.append("[audio]")
        if text and text.strip():
            parts.append({"type": "text", "text": text.strip()})
            shown.append(text.strip())
        if not parts:
            raise OmniolaError("type a question or attach an image, a video or audio")
        return {"role": "user", "content": parts}, " ".join(shown)

    def respond(
        self, text: str, image=None, video=None, audio=None, *, speak: bool = False, voice: str | None = None,
        chat: list[dict] | None = None, conversation: list[dict] | None = None,
    ) -> Iterator[Turn]:
        """Streams the answer to a new question, after the earlier turns; with `speak`, spoken by `voice` (a name
        from `voices`; `None`: the default voice).

        Yields:
            `Turn`s: the chat grows piece by piece; with `speak`, each spoken sentence comes in a turn of its own as
            soon as it is ready; the last turn carries the timings.
        """
        chat = list(chat or [])
        conversation = list(conversation or [])
        message, shown = self.user_message(text, image, video, audio)
        conversation.append(message)
        chat += [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
        inputs = self.processor.apply_chat_template(conversation)
        request = self.engine.submit(inputs, GenerationOptions(max_new_tokens=self.max_new_tokens),
                                     voice=self.voices.backend(voice) if speak else None)
        answer, timings = "", {}
        for event in request:
            if isinstance(event, TextDelta):
                answer += event.text
                chat[-1] = {"role": "assistant", "content": answer}
                yield Turn(chat, conversation)
            elif isinstance(event, SpeechDelta):
                if event.audio.size:
                    yield Turn(chat, conversation, wav_bytes(event.audio, event.sample_rate))
            elif isinstance(event, Done):
                timings = event.timings
        conversation = [*conversation, {"role": "assistant", "content": answer}]
        yield Turn(chat, conversation, None, timings)


# The page's player: each sentence's WAV arrives as a new <audio data-new> element in #spoken; it is queued and played
# after the previous sentence (never from the element itself, which the next sentence replaces). Gradio's own
# streaming audio output would re-encode through ffmpeg, which omniola does not need anywhere else.
PLAYER_JS = """
const queue = [];
let busy = false;
window.omniolaSpoken = window.omniolaSpoken || {played: 0};
function next() {
  if (busy || !queue.length) return;
  busy = true;
  const clip = new Audio(queue.shift());
  clip.onplaying = () => { window.omniolaSpoken.played += 1; };
  clip.onended = clip.onerror = () => { busy = false; next(); };
  clip.play().catch(() => { busy = false; next(); });
}
new MutationObserver(() => {
  for (const a of element.querySelectorAll("audio[data-new]")) { a.removeAttribute("data-new"); queue.push(a.src); }
  next();
}).observe(element, {childList: true, subtree: true});
"""


def _clip_html(wav: bytes) -> str:
    import base64

    return f'<audio data-new src="data:audio/wav;base64,{base64.b64encode(wav).decode()}"></audio>'


def build_demo(chat: WebChat, *, title: str = "omniola"):
    """The Gradio page around a `WebChat` (not launched)."""
    import gradio as gr

    def submit(text, image, video, audio, speak, voice, history, conversation):
        try:
            for turn in chat.respond(text, image, video, audio, speak=speak, voice=voice, chat=history,
                                     conversation=conversation):
                t = turn.timings
                status = (f"first token {t['time_to_first_token_s']:.2f}s"
                          + (f" | first audio {t['time_to_first_audio_s']:.2f}s" if "time_to_first_audio_s" in t
                             else "") + f" | total {t['total_s']:.2f}s") if t else "generating ..."
                clip = gr.skip() if turn.audio is None else _clip_html(turn.audio)
                yield turn.chat, turn.conversation, clip, status, "", None, None, None
        except OmniolaError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:  # offline: no usage reporting
        gr.Markdown(f"# {title}\nAsk about text, an image, a video or audio. The answer streams as it is "
                    "generated; tick *Speak the answer* to hear it.")
        conversation = gr.State([])
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=380)
        with gr.Row():
            image = gr.Image(label="Image", type="pil", sources=["upload", "clipboard"])
            video = gr.Video(label="Video", sources=["upload"])
            audio = gr.Audio(label="Audio", sources=["upload", "microphone"], type="numpy")
        text = gr.Textbox(label="Question", placeholder="Ask something and press Enter", elem_id="question")
        with gr.Row():
            speak = gr.Checkbox(label="Speak the answer", value=False)
            names = [v.name for v in chat.voices.voices()]
            voice = gr.Dropdown(names, value=names[0] if names else None, label="Voice", elem_id="voice",
                                filterable=True)
            send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("New conversation")
        spoken = gr.HTML("", elem_id="spoken", js_on_load=PLAYER_JS)  # plays each sentence as it arrives
        status = gr.Markdown(elem_id="status")
        outputs = [chatbot, conversation, spoken, status, text, image, video, audio]
        inputs = [text, image, video, audio, speak, voice, chatbot, conversation]
        text.submit(submit, inputs, outputs)
        send.click(submit, inputs, outputs)
        clear.click(lambda: ([], [], "", ""), None, [chatbot, conversation, spoken, status])
    return demo
