"""A browser demo: `omniola web` (Gradio).

Type a question, attach an image, a video or audio (upload or microphone), and watch the answer stream in; with
"Speak the answer" the reply is spoken sentence by sentence while it is generated (Piper, offline) and the audio
appears when the text is done. The conversation is multi-turn: earlier questions, media and answers are sent
again with each new question.

`WebChat` holds the logic and is usable (and tested) without Gradio; `build_demo` only lays out the page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import OmniolaError
from .inference import TextStream
from .speech import SpeechBackend, SpeechStream


@dataclass
class Turn:
    """What the page shows after each streamed piece."""

    chat: list[dict]  # [{"role": "user" | "assistant", "content": str}] for the chatbot
    conversation: list[dict]  # processor messages, media included, for the next turn
    audio: tuple[int, np.ndarray] | None = None  # (rate, int16 samples) once the spoken answer is complete
    timings: dict = field(default_factory=dict)


class WebChat:
    """Multi-turn chat with one loaded model.

    Args:
        model, processor: a loaded omniola model and its processor.
        speech: the voice for spoken answers (`None`: Piper, loaded on first use).
        max_new_tokens: the answer length limit.
    """

    def __init__(self, model, processor, *, speech: SpeechBackend | None = None, max_new_tokens: int = 256):
        self.model, self.processor = model, processor
        self._speech = speech
        self.max_new_tokens = max_new_tokens

    @property
    def speech(self) -> SpeechBackend:
        if self._speech is None:
            from .speech import PiperBackend

            self._speech = PiperBackend()
        return self._speech

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
        self, text: str, image=None, video=None, audio=None, *, speak: bool = False,
        chat: list[dict] | None = None, conversation: list[dict] | None = None,
    ) -> Iterator[Turn]:
        """Streams the answer to a new question, after the earlier turns.

        Yields:
            `Turn`s: the chat grows piece by piece; the last one carries the timings (and the audio when `speak`).
        """
        chat = list(chat or [])
        conversation = list(conversation or [])
        message, shown = self.user_message(text, image, video, audio)
        conversation.append(message)
        chat += [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
        inputs = self.processor.apply_chat_template(conversation)
        stream = TextStream(self.model, self.processor, inputs, max_new_tokens=self.max_new_tokens)
        answer = ""
        if speak:
            import queue
            import threading

            pieces: queue.Queue = queue.Queue()
            speech = SpeechStream(stream, self.speech, on_piece=pieces.put)
            chunks: list[np.ndarray] = []
            errors: list[BaseException] = []

            def run():
                try:
                    chunks.extend(c.audio for c in speech)
                except BaseException as err:
                    errors.append(err)
                finally:
                    pieces.put(None)

            threading.Thread(target=run, daemon=True).start()
            while (piece := pieces.get()) is not None:
                answer += piece
                chat[-1] = {"role": "assistant", "content": answer}
                yield Turn(chat, conversation)
            if errors:
                raise errors[0]
            samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
            timings = speech.timings
            audio_out = (int(self.speech.sample_rate), pcm)
        else:
            for piece in stream:
                answer += piece
                chat[-1] = {"role": "assistant", "content": answer}
                yield Turn(chat, conversation)
            timings, audio_out = stream.timings, None
        conversation = [*conversation, {"role": "assistant", "content": answer}]
        yield Turn(chat, conversation, audio_out, timings)


def build_demo(chat: WebChat, *, title: str = "omniola"):
    """The Gradio page around a `WebChat` (not launched)."""
    import gradio as gr

    def submit(text, image, video, audio, speak, history, conversation):
        try:
            for turn in chat.respond(text, image, video, audio, speak=speak, chat=history,
                                     conversation=conversation):
                t = turn.timings
                status = (f"first token {t['time_to_first_token_s']:.2f}s"
                          + (f" | first audio {t['time_to_first_audio_s']:.2f}s" if "time_to_first_audio_s" in t
                             else "") + f" | total {t['total_s']:.2f}s") if t else "generating ..."
                yield turn.chat, turn.conversation, turn.audio, status, "", None, None, None
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
            send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("New conversation")
        spoken = gr.Audio(label="Spoken answer", type="numpy", interactive=False, autoplay=True)
        status = gr.Markdown(elem_id="status")
        outputs = [chatbot, conversation, spoken, status, text, image, video, audio]
        inputs = [text, image, video, audio, speak, chatbot, conversation]
        text.submit(submit, inputs, outputs)
        send.click(submit, inputs, outputs)
        clear.click(lambda: ([], [], None, ""), None, [chatbot, conversation, spoken, status])
    return demo
