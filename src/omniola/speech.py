"""Streaming speech output: cut the streamed answer into sentences and speak each while generation goes on.

Three pieces, each usable alone:

- `SentenceSegmenter` takes text pieces as they stream (`feed`) and returns the sentences completed so far;
  `flush` returns the tail. A boundary is decided only once the text after it is known (the next non-space
  character), so feeding piece by piece gives exactly `split_sentences(whole_text)`. Long sentences are cut at
  a comma/semicolon/colon once they pass `clause_chars` (`first_clause_chars` for the first piece), and at any
  space once they pass `max_chars`, so the first audio never waits for a very long sentence.
- `SpeechBackend` is the protocol of a text-to-speech engine (`sample_rate`, `synthesize(text) -> samples`).
  `PiperBackend` speaks offline with Piper (`omniola.tts`); `ToneBackend` is a fast deterministic stand-in for
  tests and benchmarks.
- `SpeechStream` reads a text-piece iterator (such as `omniola.inference.TextStream`) on one thread, synthesises
  sentences on another while generation continues, and yields `SpeechChunk`s in order, recording the time to the
  first audio.
"""

from __future__ import annotations

import io
import queue
import re
import threading
import time
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import InputError

# --------------------------------------------------------------------------------------------------
# Sentence segmentation
# --------------------------------------------------------------------------------------------------

#: Words after which a period never ends a sentence (titles, Latin abbreviations, "U.S."), lowercase, no final dot.
NON_TERMINAL_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "mt", "e.g", "i.e", "cf", "u.s", "u.k", "u.n",
     "fig", "approx", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
     "sept", "oct", "nov", "dec", "a.m", "p.m"}
)
#: Words after which a period ends a sentence only when the next word starts with a capital letter.
AMBIGUOUS_ABBREVIATIONS = frozenset({"etc", "al"})
#: Words after which a period ends a sentence unless a number follows ("No. 5", "vol. 2").
NUMBERING_ABBREVIATIONS = frozenset({"no", "vol", "p", "pp", "ch", "sec"})

_TERMINATORS = ".!?…"
_CLOSERS = "\"'”’)]}»"
_CLAUSE_MARKS = ",;:"
_WORD_BEFORE_DOT = re.compile(r"([A-Za-z](?:[A-Za-z.]*[A-Za-z])?)$")


class SentenceSegmenter:
    """Incremental sentence splitter for streamed text.

    Args:
        clause_chars: a sentence longer than this is cut at its next comma, semicolon or colon (followed by a
            space); 0 disables clause cuts.
        max_chars: a piece longer than this is cut at its next space, whatever the punctuation; 0 disables it.
        first_clause_chars: `clause_chars` for the first piece only, shorter so that speech starts sooner
            (`None`: the same as `clause_chars`).

    Example:
        >>> seg = SentenceSegmenter()
        >>> seg.feed("Dr. Smith paid $2.50. It")
        ['Dr. Smith paid $2.50.']
        >>> seg.feed(" was cheap.") + seg.flush()
        ['It was cheap.']
    """

    def __init__(self, *, clause_chars: int = 80, max_chars: int = 200, first_clause_chars: int | None = 30):
        if clause_chars < 0 or max_chars < 0 or (first_clause_chars or 0) < 0:
            raise InputError(f"clause_chars, max_chars and first_clause_chars must be >= 0, got {clause_chars}, "
                             f"{max_chars} and {first_clause_chars}")
        self.clause_chars = clause_chars
        self.max_chars = max_chars
        self.first_clause_chars = clause_chars if first_clause_chars is None else first_clause_chars
        self._buf = ""
        self._emitted = 0

    def feed(self, piece: str) -> list[str]:
        """Adds a piece of streamed text; returns the sentences it completed (possibly none)."""
        self._buf += piece
        out = []
        while True:
            cut = self._find_cut(self._buf)
            if cut is None:
                return out
            sentence, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            out.append(sentence)
            self._emitted += 1

    def flush(self) -> list[str]:
        """Returns the text still held (the last sentence, even without final punctuation) and resets."""
        tail, self._buf, self._emitted = self._buf.strip(), "", 0
        return [tail] if tail else []

    # The cut index is where the next segment starts; everything before it (stripped) is one segment. A cut is
    # returned only when it cannot change as more text arrives.
    def _find_cut(self, text: str) -> int | None:
        start = len(text) - len(text.lstrip())
        n = len(text)
        clause_chars = self.clause_chars if self._emitted else self.first_clause_chars
        i = start
        while i < n:
            ch = text[i]
            length = i + 1 - start
            if ch == "\n":
                if _has_word(text[start:i]):
                    return i + 1
            elif ch in _TERMINATORS:
                j = i
                while j + 1 < n and text[j + 1] in _TERMINATORS:  # "?!", "..."
                    j += 1
                while j + 1 < n and text[j + 1] in _CLOSERS:  # closing quotes and brackets
                    j += 1
                if j + 1 >= n:
                    return None  # the character after the punctuation is not known yet
                if text[j + 1].isspace():
                    k = j + 1
                    while k < n and text[k].isspace():
                        k += 1
                    if k >= n:
                        return None  # the next word is not known yet
                    if _has_word(text[start:j + 1]) and self._ends_sentence(text, start, i, j, text[k]):
                        return j + 1
                i = j + 1
                continue
            elif ch in _CLAUSE_MARKS and clause_chars and length >= clause_chars:
                if i + 1 >= n:
                    return None
                if text[i + 1].isspace() and _has_word(text[start:i]):
                    return i + 1
            elif ch.isspace() and self.max_chars and length > self.max_chars and _has_word(text[start:i]):
                return i
            i += 1
        return None

    @staticmethod
    def _ends_sentence(text: str, start: int, i: int, j: int, next_char: str) -> bool:
        """Whether the punctuation run text[i..j] (followed by a space, then `next_char`) ends a sentence."""
        if next_char.islower():  # "e.g. apples", "Wait... what", "3 p.m. today"
            return False
        if text[i] != "." or j > i and text[i + 1] in _TERMINATORS:
            return True  # "!", "?", "...", "?!"
        if text[start:i].strip().isdigit():  # a list marker: "1. The moon ..." is spoken as one piece
            return False
        match = _WORD_BEFORE_DOT.search(text[start:i])
        if match is None:
            return True  # "$2.50." or "1,000." : a number or symbol before the period
        word = match.group(1)
        lowered = word.lower()
        if len(word) == 1 and word.isupper():  # an initial: "J. Smith"
            return False
        if lowered in NON_TERMINAL_ABBREVIATIONS:
            return False
        if lowered in AMBIGUOUS_ABBREVIATIONS:
            return next_char.isupper()
        if lowered in NUMBERING_ABBREVIATIONS:
            return not next_char.isdigit()
        return True


def _has_word(text: str) -> bool:
    return any(c.isalnum() for c in text)


def split_sentences(
    text: str, *, clause_chars: int = 80, max_chars: int = 200, first_clause_chars: int | None = 30
) -> list[str]:
    """Splits a whole text the way `SentenceSegmenter` splits it when fed piece by piece."""
    seg = SentenceSegmenter(clause_chars=clause_chars, max_chars=max_chars, first_clause_chars=first_clause_chars)
    return seg.feed(text) + seg.flush()


# --------------------------------------------------------------------------------------------------
# Speech backends
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class SpeechBackend(Protocol):
    """A text-to-speech engine: `synthesize(text)` returns float32 mono samples in [-1, 1] at `sample_rate`."""

    @property
    def sample_rate(self) -> int: ...

    def synthesize(self, text: str) -> np.ndarray: ...


class PiperBackend:
    """Offline speech with a Piper voice (default: the bundled `en_US-joe-medium`, 22050 Hz).

    Args:
        voice: path of a Piper `.onnx` voice, or `None` for the bundled voice.
    """

    def __init__(self, voice: str | Path | None = None):
        self.voice = voice
        self._rate: int | None = None

    @property
    def sample_rate(self) -> int:
        if self._rate is None:
            from .tts import _load_voice, default_piper_voice_path

            path = default_piper_voice_path() if self.voice is None else Path(self.voice).expanduser().resolve()
            self._rate = int(_load_voice(path).config.sample_rate)
        return self._rate

    def synthesize(self, text: str, *, speed: float = 1.0) -> np.ndarray:
        """Speaks `text`; `speed` scales the speaking rate (the pitch is kept)."""
        from .tts import synthesize_piper

        try:
            samples, rate = synthesize_piper(text, voice=self.voice, speed=speed)
        except InputError:  # nothing speakable (only punctuation or symbols)
            return np.zeros(0, dtype=np.float32)
        self._rate = rate
        return samples


class ToneBackend:
    """A fast deterministic stand-in for a voice: a quiet tone of `seconds_per_char` per character.

    Used by tests and benchmarks to measure the pipeline without the cost of a real voice.
    """

    def __init__(self, sample_rate: int = 16000, seconds_per_char: float = 0.005, delay_s: float = 0.0):
        self.sample_rate = sample_rate
        self.seconds_per_char = seconds_per_char
        self.delay_s = delay_s

    def num_samples(self, text: str) -> int:
        return int(round(len(text) * self.seconds_per_char * self.sample_rate))

    def synthesize(self, text: str) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        t = np.arange(self.num_samples(text), dtype=np.float32) / self.sample_rate
        return (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Audio encoding
# --------------------------------------------------------------------------------------------------


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] -> little-endian 16-bit PCM bytes."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int, num_bytes: int = 0xFFFFFFFF - 36) -> bytes:
    """A 44-byte mono 16-bit WAV header for `num_bytes` of PCM (the default marks a stream of unknown length)."""
    import struct

    return (b"RIFF" + struct.pack("<I", min(36 + num_bytes, 0xFFFFFFFF)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", num_bytes))


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A complete mono 16-bit WAV file in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(to_pcm16(samples))
    return buf.getvalue()


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Writes a mono 16-bit WAV file."""
    Path(path).write_bytes(wav_bytes(samples, sample_rate))


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------


@dataclass
class SpeechChunk:
    """One spoken sentence (or clause).

    Attributes:
        index: position of the sentence in the answer, from 0.
        text: the sentence.
        audio: float32 mono samples, shape `(num_samples,)` (may be empty for unspeakable text).
        sample_rate: samples per second of `audio`.
    """

    index: int
    text: str
    audio: np.ndarray
    sample_rate: int


_END = object()


class SpeechStream:
    """Speaks a stream of text pieces sentence by sentence, while the text is still being generated.

    A reader thread consumes `pieces` and cuts sentences; a synthesis thread speaks them in order; iterating the
    stream yields `SpeechChunk`s in sentence order as soon as each is ready. After iteration `text` holds the whole
    text and `timings` holds `time_to_first_audio_s`, `synthesis_s` (total backend time), `audio_s` (seconds of
    speech), `total_s` and `num_chunks`, plus the text source's own `timings` (e.g. `time_to_first_token_s`)
    when it has them.

    Args:
        pieces: an iterable of text pieces, such as an `omniola.inference.TextStream`.
        backend: the speech engine.
        segmenter: how to cut sentences (default: `SentenceSegmenter()`).
        on_piece: called with every text piece as it arrives (on the reader thread), e.g. to print it.
    """

    def __init__(
        self,
        pieces: Iterable[str],
        backend: SpeechBackend,
        *,
        segmenter: SentenceSegmenter | None = None,
        on_piece: Callable[[str], None] | None = None,
    ):
        self.pieces = pieces
        self.backend = backend
        self.segmenter = segmenter or SentenceSegmenter()
        self.on_piece = on_piece
        self.text = ""
        self.timings: dict[str, float] = {}
        self._closed = threading.Event()

    def close(self) -> None:
        """Stops reading and speaking at the next piece or sentence (the text source is left to its own stop)."""
        self._closed.set()

    def __iter__(self) -> Iterator[SpeechChunk]:
        start = time.perf_counter()
        sentences: queue.Queue = queue.Queue()
        chunks: queue.Queue = queue.Queue()
        errors: list[BaseException] = []
        synth_time = [0.0]

        def read():
            try:
                for piece in self.pieces:
                    if self._closed.is_set():
                        break
                    self.text += piece
                    if self.on_piece is not None:
                        self.on_piece(piece)
                    for sentence in self.segmenter.feed(piece):
                        sentences.put(sentence)
                if not self._closed.is_set():
                    for sentence in self.segmenter.flush():
                        sentences.put(sentence)
            except BaseException as err:
                errors.append(err)
            finally:
                sentences.put(_END)

        def speak():
            index = 0
            try:
                rate = int(self.backend.sample_rate)  # loads a lazy voice while the first sentence is generated
                while True:
                    sentence = sentences.get()
                    if sentence is _END or self._closed.is_set():
                        break
                    t0 = time.perf_counter()
                    audio = np.asarray(self.backend.synthesize(sentence), dtype=np.float32).reshape(-1)
                    synth_time[0] += time.perf_counter() - t0
                    chunks.put(SpeechChunk(index, sentence, audio, rate))
                    index += 1
            except BaseException as err:
                errors.append(err)
                self._closed.set()
            finally:
                chunks.put(_END)

        reader = threading.Thread(target=read, name="omniola-speech-reader", daemon=True)
        speaker = threading.Thread(target=speak, name="omniola-speech-synth", daemon=True)
        reader.start()
        speaker.start()
        first_audio = None
        num_chunks, num_samples, rate = 0, 0, 0
        finished = False
        try:
            while True:
                chunk = chunks.get()
                if chunk is _END:
                    finished = True
                    break
                if first_audio is None and chunk.audio.size:
                    first_audio = time.perf_counter()
                num_chunks += 1
                num_samples += chunk.audio.size
                rate = chunk.sample_rate
                yield chunk
        finally:
            if not finished:  # the consumer stopped early: both threads end at their next piece or sentence
                self._closed.set()
            else:
                speaker.join()
                reader.join()
        if errors:
            raise errors[0]
        end = time.perf_counter()
        source_timings = getattr(self.pieces, "timings", None) or {}
        self.timings = {
            **source_timings,
            "time_to_first_audio_s": round((first_audio or end) - start, 4),
            "synthesis_s": round(synth_time[0], 4),
            "audio_s": round(num_samples / rate, 3) if rate else 0.0,
            "total_s": round(end - start, 4),
            "num_chunks": num_chunks,
        }


def speak_to_outputs(
    chunks: Iterable,
    sample_rate: int,
    *,
    out: str | Path | None = None,
    play: bool = False,
    warn: Callable[[str], None] = print,
) -> np.ndarray:
    """Consumes spoken chunks (anything with `.audio`: `SpeechChunk`s, the engine's `SpeechDelta`s): plays each as it
    arrives (`play`) and writes the whole answer as WAV (`out`).

    Playback uses the `sounddevice` package when it is importable and an output device exists; otherwise `warn`
    is called once with the reason and the audio is only written.

    Returns:
        All samples, float32, shape `(num_samples,)`.
    """
    player = _open_player(sample_rate, warn) if play else None
    parts: list[np.ndarray] = []
    try:
        for chunk in chunks:
            parts.append(chunk.audio)
            if player is not None and chunk.audio.size:
                player.write(chunk.audio.reshape(-1, 1))
    finally:
        if player is not None:
            player.stop()
            player.close()
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    if out is not None:
        write_wav(out, samples, sample_rate)
    return samples


def _open_player(sample_rate: int, warn: Callable[[str], None]):
    try:
        import sounddevice
    except (ImportError, OSError) as err:  # OSError: the PortAudio library is missing
        warn(f"cannot play audio: the `sounddevice` package is not usable ({err}); "
             "install it with `pip install sounddevice`, or use --speak FILE.wav")
        return None
    try:
        player = sounddevice.OutputStream(samplerate=sample_rate, channels=1, dtype="float32")
        player.start()
        return player
    except Exception as err:  # no output device (servers, containers)
        warn(f"cannot play audio: no usable output device ({err}); use --speak FILE.wav")
        return None
