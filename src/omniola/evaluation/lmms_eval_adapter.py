"""lmms-eval integration: an omniola checkpoint as an lmms-eval model named `omniola`.

lmms-eval (`pip install --no-deps lmms_eval==0.7.3` plus `omniola[lmms]`, see `docs/evaluation.md`) finds the
model in three ways; each ends in `OmniolaLMMS`:

- the CLI, `python -m lmms_eval --model omniola --model_args pretrained=DIR --tasks NAME [--include_path DIR]`:
  lmms-eval reads the `lmms_eval.models` entry point that omniola's package metadata declares;
- in Python, importing this module registers `omniola` in lmms-eval's model registry (`register()`), so
  `lmms_eval.evaluator.simple_evaluate(model="omniola", ...)` works even without the entry point, and
  `simple_evaluate(model=OmniolaLMMS(pretrained=DIR), ...)` takes an instance;
- `omniola eval --lmms-eval TASKS [--include-path DIR] --model DIR` (`run_lmms_eval`).

Requests, as lmms-eval's simple (non-chat) tasks build them:

- `generate_until`: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`. The visuals of the document
  (`doc_to_visual(doc)`: PIL images, image / audio / video paths, audio dicts `{"array", "sampling_rate"}`, a nested
  list of PIL frames for a video) become typed parts before the context's text in one user turn, rendered by
  `OlaProcessor.apply_chat_template`. Requests that share their generation settings are decoded together by the
  generation engine (`omniola.generation`). `until` stop strings end generation early and the answer is cut before
  the first one; greedy unless the task asks for sampling (`do_sample: true`, or `temperature > 0` without
  `do_sample`); `top_k`, `repetition_penalty` and `no_repeat_ngram_size` are honoured, beam search is refused.
- `loglikelihood`: `(context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)`: the sum of the
  log-probabilities of the continuation's tokens appended after the assistant prompt of the same user turn, and
  whether greedy decoding would have produced exactly those tokens, returned with the sign lmms-eval's scorer for
  the task type expects (`OmniolaLMMS.loglikelihood`). Requests with the same context and visuals (the options of
  a multiple-choice question) encode the media and prompt once.
- `generate_until_multi_round`: `(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)`; each
  round is a fresh single-turn request whose visuals and context come from the task's `doc_to_text(doc,
  previous_output=..., round_idx=..., previous_round_info=...)`, until it signals the end.

A document whose visuals cannot be loaded, or whose request is malformed, stops the run with an omniola error naming
the task, split and document (lmms-eval has no way to count a failed sample, and scoring it as an empty answer
would be silent).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError, MediaError, OmniolaError
from ..generation import Engine, GenerationOptions
from ..inference import default_model_dir, load_model
from ..modeling_ola import PREFILL_ONLY_INPUTS
from ..processing_ola import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from .tasks import VIDEO_SUFFIXES

__all__ = [
    "MODEL_NAME", "OmniolaLMMS", "lmms_eval_manifest", "register", "run_lmms_eval", "write_lmms_eval_results",
]

MODEL_NAME = "omniola"
AUDIO_SUFFIXES = (".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".m4a", ".aac", ".opus", ".aif", ".aiff", ".au")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MARKERS = {IMAGE_TOKEN: "image", VIDEO_TOKEN: "video", AUDIO_TOKEN: "audio"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Generation settings of a task's `generation_kwargs` that are passed to `generate`; other keys (written for other
# models' adapters, e.g. `image_aspect_ratio`) are ignored.
_PASSED_KEYS = ("top_k", "repetition_penalty", "no_repeat_ngram_size")  # generation_kwargs the engine takes as they are


def _where(task: str, split: str, doc_id) -> str:
    return f"lmms-eval task {task!r} ({split} split), doc {doc_id}"


def _with_context(err: BaseException, where: str) -> OmniolaError:
    """`err` as an omniola error whose message starts with the sample it belongs to."""
    kind = type(err) if isinstance(err, OmniolaError) else MediaError
    message = str(err) if isinstance(err, OmniolaError) else f"{type(err).__name__}: {err}"
    new = kind(f"{where}: {message}")
    new.__cause__ = err
    return new


def visual_parts(visuals: Any) -> list[dict]:
    """Typed content parts (`image` / `video` / `audio`) for what a task's `doc_to_visual` returned.

    Accepted items: a PIL image; a path (by suffix: video, audio, else image); a dict with `array` and
    `sampling_rate` (a decoded `datasets.Audio` value) or with `path`; a list of PIL images (the frames of one
    video); a numpy array (`[F, H, W, 3]` video frames, `[H, W, 3]` image, `[T]` audio at 16 kHz). `None` items
    are skipped.

    Raises:
        InputError: an item of another type, or a path with no suffix to tell its kind.
    """
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    parts = []
    for k, item in enumerate(visuals):
        if item is None:
            continue
        if isinstance(item, Image.Image):
            parts.append({"type": "image", "image": item})
        elif isinstance(item, (str, os.PathLike)):
            parts.append(_path_part(item))
        elif isinstance(item, dict) and item.get("array") is not None:
            rate = item.get("sampling_rate")
            if rate is None:
                raise InputError(f"visual {k}: an audio dict needs 'sampling_rate' beside 'array'")
            parts.append({"type": "audio", "audio": (np.asarray(item["array"], dtype=np.float32), int(rate))})
        elif isinstance(item, dict) and item.get("path"):
            parts.append(_path_part(item["path"]))
        elif isinstance(item, (list, tuple)) and item and all(isinstance(f, Image.Image) for f in item):
            frames = [np.asarray(f.convert("RGB")) for f in item]
            if len({f.shape for f in frames}) != 1:
                raise InputError(f"visual {k}: the frames of a video must share one size")
            parts.append({"type": "video", "video": np.stack(frames)})  # (F, H, W, 3)
        elif isinstance(item, np.ndarray) and item.ndim in (1, 3, 4):
            kind = {1: "audio", 3: "image", 4: "video"}[item.ndim]
            parts.append({"type": kind, kind: item})
        else:
            raise InputError(
                f"visual {k}: unsupported {type(item).__name__}; expected a PIL image, a path, an audio dict "
                "{'array', 'sampling_rate'}, a list of PIL frames or a numpy array"
            )
    return parts


def _path_part(path: str | os.PathLike) -> dict:
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return {"type": "video", "video": str(path)}
    if suffix in AUDIO_SUFFIXES:
        return {"type": "audio", "audio": str(path)}
    if suffix in IMAGE_SUFFIXES:
        return {"type": "image", "image": str(path)}
    raise InputError(f"{path}: cannot tell image, audio or video apart from the suffix {suffix or '(none)'!r}")


def user_turn(context: str, parts: list[dict]) -> list[dict]:
    """One user message: the media parts, then the context's text.

    A context that already marks where its media go (`<image>`, `<video>`, `<audio>`, as many of each as there
    are media of that kind) keeps that order instead; markers that do not match the media are removed.
    """
    context = context or ""
    pieces = re.split("(" + "|".join(map(re.escape, _MARKERS)) + ")", context)
    markers = [p for p in pieces if p in _MARKERS]
    if not markers:
        return [{"role": "user", "content": [*parts, {"type": "text", "text": context}]}]
    by_kind = {kind: [p for p in parts if p["type"] == kind] for kind in _MARKERS.values()}
    if all(markers.count(m) == len(by_kind[kind]) for m, kind in _MARKERS.items()):
        content, queues = [], {kind: iter(items) for kind, items in by_kind.items()}
        for piece in pieces:
            if piece in _MARKERS:
                content.append(next(queues[_MARKERS[piece]]))
            elif piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        return [{"role": "user", "content": content}]
    text = "".join(p for p in pieces if p not in _MARKERS)
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class OmniolaLMMS(lmms):
    """An omniola checkpoint behind lmms-eval's simple-model interface (`generate_until`, `loglikelihood`,
    `generate_until_multi_round`).

    Args (the keys of `--model_args`):
        pretrained: The omniola model directory (default: the default model, `$OMNIOLA_HOME/models/tiny`).
        device: `cpu`, `cuda`, `cuda:1`, ... (default: cuda if available).
        dtype: `float32` | `bfloat16` | `float16` (default: bf16 on GPU, float32 on CPU).
        batch_size: Requests decoded together; loglikelihood continuations per forward pass.
        max_new_tokens: Answer length limit when a task's `generation_kwargs` give none.
        use_audio_in_video: Add a video's own sound track (default: the processor's setting).
        progress: Show one progress bar per request type.
        model, processor: An already loaded `OlaForConditionalGeneration` and `OlaProcessor` (Python use only;
            instead of `pretrained`).

    Raises:
        ConfigError: an unknown or invalid argument, or a multi-process launch.
        InputError: `pretrained` is not an omniola model directory.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        use_audio_in_video: bool | None = None,
        progress: bool = True,
        model=None,
        processor=None,
        max_batch_size: int | None = None,  # lmms-eval passes it for automatic batch sizes; not used
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ConfigError(
                f"unknown omniola model_args: {', '.join(sorted(unknown))}; known: pretrained, device, dtype, "
                "batch_size, max_new_tokens, use_audio_in_video, progress"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("the omniola lmms-eval model runs in one process; launch lmms-eval without "
                              "accelerate/torchrun (choose the GPU with --device cuda:N)")
        self.batch_size_per_gpu = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        if dtype is not None and str(dtype) not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self._owns_model = model is None
        if model is None:
            if processor is not None:
                raise ConfigError("processor is given only together with model")
            path = Path(pretrained).expanduser() if pretrained else default_model_dir()
            model, processor = load_model(path, device=device, dtype=_DTYPES.get(str(dtype)) if dtype else None)
        elif processor is None or pretrained is not None:
            raise ConfigError("give either pretrained (a model directory) or both model and processor")
        self.model, self.processor = model.eval(), processor
        self.engine = Engine(self.model, processor, max_batch=self.batch_size_per_gpu)
        self.tokenizer = processor.tokenizer
        self.use_audio_in_video = None if use_audio_in_video is None else _boolean(use_audio_in_video)
        self.progress = _boolean(progress)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def clean(self) -> None:
        """Called by lmms-eval after a run: frees a model this object loaded; a model the caller passed in (and this
        object with it) stays usable."""
        if self._owns_model:
            super().clean()

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -------------------------------------------------------------------------------------------- helpers
    def _doc(self, task: str, split: str, doc_id):
        return self.task_dict[task][split][doc_id]

    def _conversation(self, context: str, visuals_of: Callable | None, doc, where: str) -> list[dict]:
        try:
            visuals = visuals_of(doc) if visuals_of is not None else None
        except Exception as err:  # the task's own loader: a missing file, a bad column, ...
            raise _with_context(err, where + ": doc_to_visual failed") from err
        try:
            return user_turn(context, visual_parts(visuals))
        except OmniolaError as err:
            raise _with_context(err, where) from err

    def _inputs(self, conversations: list[list[dict]], wheres: list[str]):
        """Prepared (left-padded) inputs of a batch; on a failure, each conversation alone to name the bad one."""
        try:
            return self.processor.apply_chat_template(
                conversations, add_generation_prompt=True, padding_side="left",
                use_audio_in_video=self.use_audio_in_video,
            ).to(self.device)
        except (OmniolaError, OSError, ValueError) as err:
            if len(conversations) == 1:
                raise _with_context(err, wheres[0]) from err
            for conversation, where in zip(conversations, wheres):
                self._inputs([conversation], [where])
            raise

    def _generate(self, conversations: list[list[dict]], wheres: list[str], gen_kwargs: dict | None) -> list[str]:
        """Answers conversations through the generation engine, decoded together; stop strings cut."""
        options = self._generation_options(gen_kwargs, wheres[0])
        requests = [self.engine.submit(self._inputs([c], [w]), options) for c, w in zip(conversations, wheres)]
        answers = []
        for request, where in zip(requests, wheres):
            try:
                answers.append(request.result().text.strip())
            except OmniolaError as err:
                raise _with_context(err, where) from err
        return answers

    def _generation_options(self, gen_kwargs: dict | None, where: str) -> GenerationOptions:
        """The engine's options from a task's `generation_kwargs`."""
        gen = dict(gen_kwargs or {})
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(s, str) for s in until):
            raise InputError(f"{where}: generation_kwargs 'until' must be a string or a list of strings")
        try:
            if int(gen.get("num_beams") or 1) > 1:
                raise InputError(f"{where}: generation_kwargs num_beams={gen['num_beams']}: beam search is not "
                                 "supported by omniola's generation engine; use num_beams 1 (greedy) or sampling")
            temperature = float(gen.get("temperature") or 0.0)
            do_sample = gen.get("do_sample")
            do_sample = temperature > 0 if do_sample is None else _boolean(do_sample)
            sampling = dict(temperature=temperature or 1.0, top_p=float(gen.get("top_p") or 1.0)) if do_sample else {}
            return GenerationOptions(
                max_new_tokens=int(gen.get("max_new_tokens") or self.max_new_tokens), stop=tuple(s for s in until if s),
                **sampling, **{key: gen[key] for key in _PASSED_KEYS if gen.get(key) is not None})
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: bad generation_kwargs: {err}") from err

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="request", disable=not self.progress or self.rank != 0)

    # ----------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers each request (see the module docstring); batches requests with equal generation settings."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items(), key=str)), []).append(i)
        with self._bar(len(requests), "omniola generate_until") as bar:
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    conversations, wheres = [], []
                    for i in batch:
                        context, _, visuals_of, doc_id, task, split = requests[i].args
                        where = _where(task, split, doc_id)
                        conversations.append(self._conversation(context, visuals_of, self._doc(task, split, doc_id),
                                                                 where))
                        wheres.append(where)
                    texts = self._generate(conversations, wheres, requests[batch[0]].args[1])
                    for i, text in zip(batch, texts):
                        answers[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                    bar.update(len(batch))
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Per request, the answers of every round (as the task's `doc_to_text` returns them at the end)."""
        results = []
        with self._bar(len(requests), "omniola multi-round") as bar:
            for request in requests:
                context, gen_kwargs, visuals_of, doc_to_text, doc_id, task, split = request.args
                where, doc = _where(task, split, doc_id), self._doc(task, split, doc_id)
                rounds = self._generate([self._conversation(context, visuals_of, doc, where)], [where], gen_kwargs)
                info, round_idx = None, 1
                while True:
                    visuals, context, done, previous, info = doc_to_text(
                        doc, previous_output=rounds, round_idx=round_idx, previous_round_info=info)
                    rounds = list(previous)
                    if done:
                        break
                    here = f"{where}, round {round_idx}"
                    conversation = self._conversation(context, lambda _, given=visuals: given, doc, here)
                    rounds += self._generate([conversation], [here], gen_kwargs)
                    round_idx += 1
                results.append(rounds)
                bar.update(1)
        return results

    # ----------------------------------------------------------------------------------------- likelihood
    def loglikelihood(self, requests: list[Instance]) -> list:
        """Scores each continuation after its context (see `score_continuations`) in the form lmms-eval reads.

        lmms-eval 0.7.3 reads the two kinds of loglikelihood request with opposite signs: a `multiple_choice`
        task (its options arrive as strings) picks the option with the smallest value, as its own models return a
        loss; a `loglikelihood` task (the target arrives as the task's `doc_to_target`) takes the value as a
        log-probability (perplexity = exp(-mean)). So an option gets the negative log-likelihood of its tokens,
        a `loglikelihood` target its log-likelihood; the second element is always the is-greedy flag.

        Returns:
            `(value, is_greedy)` per request (wrapped so that lmms-eval's output unwrapping keeps the pair, see
            `_loglikelihood_output`).
        """
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, _, visuals_of, doc_id, task, split = request.args
            groups.setdefault((context, visuals_of, doc_id, task, split), []).append(i)
        with self._bar(len(requests), "omniola loglikelihood") as bar:
            for (context, visuals_of, doc_id, task, split), indices in groups.items():
                where, doc = _where(task, split, doc_id), self._doc(task, split, doc_id)
                continuations, signs = [], []
                for i in indices:
                    target = requests[i].args[1]
                    option = isinstance(target, str)
                    continuations.append(target if option else str(target(doc)))
                    signs.append(-1.0 if option else 1.0)
                conversation = self._conversation(context, visuals_of, doc, where)
                scores = self.score_continuations(conversation, continuations, where)
                for i, sign, (logprob, greedy) in zip(indices, signs, scores):
                    results[i] = _loglikelihood_output(sign * logprob, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], (sign * logprob, greedy))
                bar.update(len(indices))
        return results

    def score_continuations(
        self, conversation: list[dict], continuations: Sequence[str], where: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation after the assistant prompt of `conversation`.

        The prompt (with its media) is embedded once; the continuations' tokens follow it, right-padded, in
        batches of `batch_size`.

        Returns:
            `(sum of log-probabilities, is greedy)` per continuation; an empty continuation gives `(0.0, True)`.
        """
        inputs = self._inputs([conversation], [where])
        media = {k: inputs[k] for k in PREFILL_ONLY_INPUTS if k in inputs}
        token_ids = []
        for text in continuations:
            if any(marker in text for marker in _MARKERS):
                raise InputError(f"{where}: the continuation {text!r:.60} contains a media marker")
            token_ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        results: list[tuple[float, bool]] = []
        with torch.inference_mode():
            prompt = self.model.model.embed_multimodal(inputs["input_ids"], **media)  # (1, P, D)
            for start in range(0, len(token_ids), self.batch_size):
                chunk = token_ids[start:start + self.batch_size]
                width = max(1, max(len(ids) for ids in chunk))
                cont = torch.zeros(len(chunk), width, dtype=torch.long, device=self.device)  # (B, C)
                mask = torch.zeros_like(cont, dtype=torch.bool)
                for row, ids in enumerate(chunk):
                    cont[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[row, :len(ids)] = True
                embeds = torch.cat([prompt.expand(len(chunk), -1, -1),
                                    self.model.get_input_embeddings()(cont).to(prompt.dtype)], dim=1)
                attention = torch.cat([inputs["attention_mask"].expand(len(chunk), -1), mask.long()], dim=1)
                # logits at the last prompt position and every continuation position but the last: (B, C, V)
                logits = self.model(inputs_embeds=embeds, attention_mask=attention,
                                    logits_to_keep=width + 1).logits[:, :-1]
                logprobs = logits.float().log_softmax(-1)
                taken = logprobs.gather(-1, cont.unsqueeze(-1)).squeeze(-1)  # (B, C)
                greedy = (logprobs.argmax(-1) == cont) | ~mask
                for row in range(len(chunk)):
                    results.append((float(taken[row][mask[row]].sum()), bool(greedy[row].all())))
        return results


def _keeps_pairs() -> bool:
    """Whether lmms-eval's evaluator keeps a model's `(value, is_greedy)` pair as it is. lmms-eval 0.7.3 passes
    every model output through `unwrap_generation_output`, which turns anything but text into `str(output)`, so
    `multiple_choice` and `loglikelihood` tasks fail to unpack the string; a `GenerationResult` is passed through."""
    return unwrap_generation_output((0.0, True))[0] == (0.0, True)


_KEEPS_PAIRS = _keeps_pairs()


def _loglikelihood_output(value: float, greedy: bool):
    pair = (float(value), bool(greedy))
    return pair if _KEEPS_PAIRS else GenerationResult(text=pair)  # type: ignore[arg-type]


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and value != number):
        raise ConfigError(f"{name} must be a positive integer (lmms-eval's 'auto' is not supported), got {value!r}")
    return number


def _boolean(value) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected true or false, got {value!r}")
    return bool(value)


# ------------------------------------------------------------------------------------------------ registration
def lmms_eval_manifest():
    """The `lmms_eval.models` entry point: `omniola` -> `OmniolaLMMS` (a simple, non-chat model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{OmniolaLMMS.__name__}")


def register() -> None:
    """Registers `omniola` in lmms-eval's model registry (idempotent)."""
    from lmms_eval.api.registry import MODEL_REGISTRY
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)
    MODEL_REGISTRY[MODEL_NAME] = OmniolaLMMS  # lmms-eval's older registry, read by `lmms_eval.api.registry`


def _register_on_import() -> None:
    models = sys.modules.get("lmms_eval.models")
    if models is not None and not hasattr(models, "MODEL_REGISTRY_V2"):
        return  # lmms-eval is importing us through the entry point while it builds its registry
    register()


_register_on_import()


# ------------------------------------------------------------------------------------------------ running it
def run_lmms_eval(
    tasks: Sequence[str],
    *,
    model: str | os.PathLike | None = None,
    include_path: Sequence[str | os.PathLike] = (),
    limit: float | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 256,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    verbosity: str = "WARNING",
    include_defaults: bool = True,
    lm: OmniolaLMMS | None = None,
) -> dict:
    """Evaluates an omniola model on lmms-eval tasks with `simple_evaluate`, as `omniola eval --lmms-eval` does.

    Args:
        tasks: lmms-eval task or group names (lmms-eval's own, or those of `include_path`).
        model: The model directory (default: the default model); ignored when `lm` is given.
        include_path: Folders of extra task YAML files (lmms-eval's `--include_path`).
        limit: First N documents of each task (a fraction of them when < 1).
        out: Folder for `lmms_eval_results.json` (lmms-eval's results without the samples) and
            `lmms_eval_samples_<task>.jsonl` (one line per document: doc id, target, responses, metrics).
        seed: lmms-eval's python, numpy, torch and few-shot seeds.
        verbosity: lmms-eval's log level.
        include_defaults: Also index lmms-eval's own tasks (a few seconds); `False` for `include_path` only.
        lm: An `OmniolaLMMS` to use instead of loading `model`.

    Returns:
        lmms-eval's results dictionary (`results`, `configs`, `versions`, `n-samples`, `samples`, ...), plus
        `files` when written.

    Raises:
        ConfigError: an unknown task name or include path.
    """
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    include = [str(Path(p).expanduser()) for p in include_path]
    for path in include:
        if not Path(path).is_dir():
            raise ConfigError(f"include path {path} is not a folder of lmms-eval task YAML files")
    manager = TaskManager(verbosity, include_path=include or None, include_defaults=include_defaults,
                          model_name=MODEL_NAME)
    names = list(tasks)
    matched = manager.match_tasks(names)
    missing = [t for t in names if t not in matched and "*" not in t]
    if missing or not matched:
        raise ConfigError(f"unknown lmms-eval task(s): {', '.join(missing or names)} (looked in lmms-eval's tasks"
                          + (f" and {', '.join(include)}" if include else "") + ")")
    if lm is None:
        lm = OmniolaLMMS(pretrained=model, device=device, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         progress=progress)
    results = simple_evaluate(
        model=lm, tasks=matched, limit=limit, task_manager=manager, verbosity=verbosity, log_samples=True,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results["config"].update(model=MODEL_NAME, model_args=f"pretrained={model}" if model else "")
    if out is not None:
        results["files"] = write_lmms_eval_results(results, out)
    return results


def write_lmms_eval_results(results: dict, out: str | os.PathLike) -> dict[str, str]:
    """Writes `lmms_eval_results.json` and one `lmms_eval_samples_<task>.jsonl` per task into `out`."""
    import json

    from lmms_eval.utils import handle_non_serializable

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": str(out / "lmms_eval_results.json")}
    for task, samples in (results.get("samples") or {}).items():
        path = out / f"lmms_eval_samples_{task}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for sample in samples:
                record = {k: v for k, v in sample.items() if k not in ("arguments", "doc")}
                f.write(json.dumps(record, default=handle_non_serializable, ensure_ascii=False) + "\n")
        files[f"samples_{task}"] = str(path)
    summary = {k: v for k, v in results.items() if k not in ("samples", "files")}
    summary["files"] = files
    Path(files["results"]).write_text(
        json.dumps(summary, indent=1, default=handle_non_serializable, ensure_ascii=False) + "\n", encoding="utf-8")
    return files
