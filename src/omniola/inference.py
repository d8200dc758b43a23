"""Loading a model for inference, and streamed generation with timings.

`TextStream` is an iterator of text pieces: media are encoded once (timed as `encode_s`), the LLM prefills and
decodes on a background thread, and pieces arrive through transformers' `TextIteratorStreamer` as soon as they
decode to printable text.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TextIteratorStreamer

from .errors import InputError
from .modeling_ola import PREFILL_ONLY_INPUTS, OlaForConditionalGeneration
from .processing_ola import OlaProcessor
from .weights import apply_weight_format, check_weight_format, default_weight_format, weight_format_of

DEFAULT_HOME_ENV = "OMNIOLA_HOME"


def omniola_home() -> Path:
    """Where omniola keeps its models and data: `$OMNIOLA_HOME`, else `~/.cache/omniola`."""
    return Path(os.environ.get(DEFAULT_HOME_ENV) or Path.home() / ".cache" / "omniola")


def default_model_dir() -> Path:
    """The default model's directory: `<omniola home>/models/tiny` (trained by `recipes/tiny.yaml`)."""
    return omniola_home() / "models" / "tiny"


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    path: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    weights: str | None = None,
) -> tuple[OlaForConditionalGeneration, OlaProcessor]:
    """Loads an omniola checkpoint directory for inference.

    Args:
        path: An omniola model directory.
        device: `cpu`, `cuda`, `cuda:1`, ... (default: cuda if available).
        dtype: The dtype of the whole model at load (default: bf16 on GPU, float32 on CPU).
        weights: The LLM's weight format, one of `omniola.weights.WEIGHT_FORMATS` (`fp32`, `bf16`, `int8`, `int4`).
            Default: `default_weight_format(device)` (fp32 on a CPU, bf16 on a GPU) when `dtype` is not given
            either; with `dtype` alone the LLM stays in `dtype`. The encoders keep `dtype`.

    Raises:
        InputError: `path` is not a model directory.
        WeightFormatError: `weights` is unknown or cannot run on this machine with the installed packages.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not an omniola model directory (no config.json); build one with omniola build")
    dev = pick_device(device)
    if weights is None and dtype is None:
        weights = default_weight_format(dev)
    if weights is not None:
        check_weight_format(weights, dev)  # before the load: a format that cannot run fails fast
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = OlaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(dev).eval()
    if weights is not None:
        apply_weight_format(model, weights)
    model.weight_format = weights or weight_format_of(model)
    return model, OlaProcessor.from_pretrained(path)


class _TimedStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that also records when each generated token arrives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_times: list[float] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.token_times.extend([time.perf_counter()] * value.numel())
        super().put(value)


class TextStream:
    """Streams the answer to prepared inputs, piece by piece, and records timings.

    After iteration, `text` holds the answer and `timings` holds `encode_s`, `time_to_first_token_s`,
    `tokens_per_s` (decode rate after the first token), `total_s`, and `num_tokens`.
    """

    def __init__(
        self,
        model: OlaForConditionalGeneration,
        processor: OlaProcessor,
        inputs,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        stop_strings: list[str] | None = None,
        seed: int | None = None,
        **generate_kwargs,
    ):
        self.model, self.processor = model, processor
        self.inputs = inputs.to(model.device)
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            self.generate_kwargs.update(temperature=temperature or 1.0, top_p=top_p or 1.0)
        else:  # greedy: drop sampling defaults that a generation_config may carry
            self.generate_kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_strings:
            self.generate_kwargs.update(stop_strings=stop_strings, tokenizer=processor.tokenizer)
        self.generate_kwargs.update(generate_kwargs)
        self.seed = seed
        self.text = ""
        self.timings: dict[str, float] = {}
        self.token_counts = processor.modality_token_counts(self.inputs["input_ids"])
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        streamer = _TimedStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        encoded = [start]

        def work():  # all torch work of a request on one thread (one OpenMP team, no hand-over between threads)
            try:
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                with torch.inference_mode():
                    media = {k: self.inputs[k] for k in PREFILL_ONLY_INPUTS if k in self.inputs}
                    inputs_embeds = self.model.model.embed_multimodal(self.inputs["input_ids"], **media)
                    encoded[0] = time.perf_counter()
                    self.model.generate(
                        input_ids=self.inputs["input_ids"],
                        inputs_embeds=inputs_embeds,
                        attention_mask=self.inputs["attention_mask"],
                        streamer=streamer,
                        **self.generate_kwargs,
                    )
            except BaseException as err:  # surfaced to the consumer below
                self.error = err
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        for piece in streamer:
            self.text += piece
            yield piece
        thread.join()
        if self.error is not None:
            raise self.error
        end = time.perf_counter()
        times = streamer.token_times
        first = times[0] if times else end
        decode_s = (times[-1] - times[0]) if len(times) > 1 else 0.0
        self.timings = {
            "encode_s": round(encoded[0] - start, 4),
            "time_to_first_token_s": round(first - start, 4),
            "tokens_per_s": round((len(times) - 1) / decode_s, 2) if decode_s > 0 else 0.0,
            "total_s": round(end - start, 4),
            "num_tokens": len(times),
        }

    def run(self) -> str:
        """Consumes the stream and returns the full answer."""
        for _ in self:
            pass
        return self.text
