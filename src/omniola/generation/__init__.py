"""Generation for every front end: options, stop strings, typed events and the continuous-batching engine."""

from .engine import Engine, EngineClosedError, GenerationRequest, default_max_batch
from .events import Done, Event, SpeechDelta, TextDelta, Usage
from .options import GREEDY_BELOW, GenerationOptions, Sampler
from .stops import StopTrimmer

__all__ = ["Done", "Engine", "EngineClosedError", "Event", "GREEDY_BELOW", "GenerationOptions", "GenerationRequest",
           "Sampler", "SpeechDelta", "StopTrimmer", "TextDelta", "Usage", "default_max_batch"]
