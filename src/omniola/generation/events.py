"""What a generation request yields, in order: text and speech as they are ready, then one `Done`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TextDelta:
    """New answer text (stop strings already cut off)."""

    text: str


@dataclass
class SpeechDelta:
    """One spoken sentence (or clause) of the answer, float32 mono samples at `sample_rate`."""

    index: int
    text: str
    audio: np.ndarray
    sample_rate: int


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Done:
    """The end of a request.

    Attributes:
        finish_reason: `stop` (end of sequence or a stop string), `length` (max_new_tokens) or `cancelled`.
        text: the whole answer.
        usage: token counts.
        timings: seconds from submission: `queue_s` (waiting for a batch slot), `encode_s` (media encoders),
            `time_to_first_token_s`, `total_s`; `tokens_per_s` (decode rate after the first token); `num_tokens`;
            spoken answers add `time_to_first_audio_s`, `synthesis_s`, `audio_s` and `num_chunks`.
    """

    finish_reason: str
    text: str
    usage: Usage
    timings: dict[str, float] = field(default_factory=dict)


Event = TextDelta | SpeechDelta | Done
