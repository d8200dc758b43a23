"""omniola's error types: one base class, one subclass per kind of problem.

Every message names the file or field at fault and what was expected, so a user never has to read a
traceback from inside a library to know what to fix.
"""

from __future__ import annotations


class OmniolaError(Exception):
    """Base class of every error omniola raises on purpose."""


class MediaError(OmniolaError):
    """A media file (image, audio, video) is missing, unreadable, truncated or empty."""


class MediaLimitError(MediaError):
    """Media exceed a limit (pixels, aspect ratio, duration, sample rate, ...), found before decoding them."""


class InputError(OmniolaError):
    """A request is malformed: unsupported content part, placeholder/media mismatch, bad argument."""


class ConfigError(OmniolaError):
    """A configuration or recipe field is invalid."""


class ComponentNotFoundError(OmniolaError):
    """A pretrained component (LLM, audio encoder, vision tower) could not be resolved."""


class ConversionError(OmniolaError):
    """A checkpoint could not be converted (unknown keys, shape mismatch, missing file)."""


class OutputInUseError(OmniolaError):
    """An output folder is locked by another process writing it (a second trainer on the same `--out`)."""


class WeightFormatError(ConfigError):
    """A weight format (`--weights`) is unknown, or this machine or the installed packages cannot run it."""


class VoiceNotFoundError(InputError):
    """A voice name is not among the installed voices (the message lists those that are)."""


class SpeechSynthesisError(OmniolaError):
    """A speech engine failed: its program is missing, timed out, exited with an error or wrote no audio."""
