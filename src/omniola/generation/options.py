"""What a request asks of generation, turned into decoding decisions in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import InputError

GREEDY_BELOW = 1e-5  # a lower temperature means greedy decoding, as in vLLM (`_SAMPLING_EPS`)


@dataclass(frozen=True)
class GenerationOptions:
    """How one answer is generated.

    Attributes:
        max_new_tokens: at most this many generated tokens (the end-of-sequence token counts as one).
        temperature: sampling temperature; below 1e-5 (the default 0) means greedy decoding.
        top_p: nucleus sampling mass (sampling only).
        top_k: sample among the k most likely tokens only (sampling only; 0 = all).
        repetition_penalty: CTRL's penalty on tokens already in the prompt or the answer (1 = none).
        no_repeat_ngram_size: never repeat an n-gram of this size (0 = allowed).
        seed: seeds the request's own random generator (sampling only); `None` draws one.
        stop: strings that end the answer; the answer never contains them.
        ignore_eos: keep generating past the end-of-sequence token, up to `max_new_tokens` (benchmarks).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise InputError(f"top_k and no_repeat_ngram_size must be >= 0, got {self.top_k} and "
                             f"{self.no_repeat_ngram_size}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise InputError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Picks one request's next token: transformers' logits processors and warpers for what the options ask, then
    argmax when greedy, else a draw from the request's own generator (so a seeded request gives the same answer
    alone or inside a batch)."""

    def __init__(self, options: GenerationOptions):
        self.options = options
        processors = []
        if options.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        if options.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size))
        self.needs_history = bool(processors)
        if not options.greedy:
            processors.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                processors.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1:
                processors.append(TopPLogitsWarper(options.top_p))
        self.processors = LogitsProcessorList(processors)
        self.generator = None
        if not options.greedy:
            self.generator = torch.Generator()
            if options.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(options.seed)

    def __call__(self, logits: torch.Tensor, history: list[int] | None = None) -> int:
        """logits: `(V,)` scores of the next token; history: the prompt's and the answer's token ids so far (needed
        only when `needs_history`)."""
        scores = logits.float()[None].cpu()  # (1, V)
        if self.processors:
            ids = torch.tensor([history or []], dtype=torch.long)  # (1, T)
            scores = self.processors(ids, scores)
        if self.options.greedy:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs[0], 1, generator=self.generator))
