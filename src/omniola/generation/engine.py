"""One generation engine for every front end, decoding concurrent requests together (continuous batching).

    engine = Engine(model, processor)                    # one per loaded model; a scheduler thread starts on demand
    request = engine.submit(inputs, GenerationOptions(max_new_tokens=64, stop=("\\n\\n",)), voice=PiperBackend())
    for event in request:                               # TextDelta ... SpeechDelta ... Done
        ...
    request.cancel()                                    # frees its batch slot at the next step

All torch work runs on the scheduler thread (one OpenMP team, nothing handed between threads). Each step it
1. admits waiting requests into free batch slots: encodes each one's media, then prefills their prompts together
   in one left-padded forward pass (while others are decoding, at most one newcomer per step brings media, so the
   others wait for one encoder call and one prefill at most);
2. runs one decode step for every running request at once: one forward pass over a left-padded batch, reading the
   weights once for all of them (decoding on a CPU is bound by memory bandwidth, so a batch of 8 costs little more
   than 1);
3. retires requests that finished (end of sequence, a stop string, max tokens, cancellation) at once.

Why not transformers' own continuous batching (`generate_batch` / `ContinuousBatchingManager`): it takes prompts as
token ids only (`add_request(input_ids: list[int], ...)`), and an Ola prompt is embeddings with the media scattered
in. So the batch is kept here over transformers' `DynamicCache`, whose per-layer key/value tensors are padded on the
left when a request joins and selected (`batch_select_indices`) when one leaves. Positions count real tokens only
(`OlaModel.forward` derives them from the attention mask), so a request gets the same greedy tokens alone or inside a
batch.

Text pieces come from the tokenizers library's incremental `DecodeStream`; stop strings are cut by `StopTrimmer`; spoken
answers are cut into sentences and synthesised on the request's own thread (`omniola.speech.SpeechStream`) while
generation goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator

import torch
import torch.nn.functional as F
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache

from ..errors import OmniolaError
from ..modeling_ola import PREFILL_ONLY_INPUTS
from .events import Done, Event, SpeechDelta, TextDelta, Usage
from .options import GenerationOptions, Sampler
from .stops import StopTrimmer


class EngineClosedError(OmniolaError):
    """The engine was closed before the request finished."""


def default_max_batch(device: torch.device) -> int:
    """Requests decoded together by default: 8 on a CPU (memory-bound decoding; the KV cache of eight 1,000-token
    answers of SmolLM2-135M is about 0.4 GB), 32 on a GPU."""
    return 32 if device.type == "cuda" else 8


class _Pieces:
    """Incremental detokenization with the tokenizers library's `DecodeStream`: each token's new text as soon as it
    is whole (a character split across byte tokens waits for its last byte)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def put(self, token: int) -> str:
        return self.stream.step(self.tokenizer, token) or ""


class _Throttled:
    """A voice whose `synthesize` waits for one of the engine's speech slots: a few sentences are spoken at once,
    whatever the number of spoken answers (each synthesis takes the cores and, with onnxruntime, memory of its own)."""

    def __init__(self, voice, slots: threading.Semaphore):
        self.voice, self.slots = voice, slots

    @property
    def sample_rate(self) -> int:
        return self.voice.sample_rate

    def synthesize(self, text: str):
        with self.slots:
            return self.voice.synthesize(text)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_SPEECH_END = object()


class GenerationRequest:
    """One submitted request: iterate it (or `aevents()` in async code) for its events; `cancel()` to stop it.

    After `Done`, `text`, `finish_reason`, `usage` and `timings` hold the outcome.
    """

    _ids = itertools.count()

    def __init__(self, engine: Engine, inputs, options: GenerationOptions, voice, loop):
        self.id = next(self._ids)
        self.engine, self.inputs, self.options, self.voice = engine, inputs, options, voice
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.has_media = any(k in inputs for k in PREFILL_ONLY_INPUTS)
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.timings: dict[str, float] = {}
        self._loop = loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._cancel = threading.Event()
        self._ended = False  # the consumer has had the last event
        # scheduler-side state
        self.submitted = time.perf_counter()
        self.admitted = self.encoded = None
        self.token_times: list[float] = []
        self.history: list[int] = inputs["input_ids"][0].tolist()  # prompt and answer ids, for penalties
        self.next_token: int | None = None
        self.sampler = Sampler(options)
        self.pieces = _Pieces(engine.processor.tokenizer)
        self.trimmer = StopTrimmer(options.stop)
        self._speech_text: queue.Queue | None = None
        self._speech_stream = None
        if voice is not None:
            self._start_speech()

    # ------------------------------------------------------------------------------------------------ consumer side
    def cancel(self) -> None:
        """Stops the request: it leaves the batch (or the queue) at the next step and ends with `cancelled`."""
        self._cancel.set()
        if self._speech_stream is not None:
            self._speech_stream.close()
        self.engine._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[Event]:
        if self._loop is not None:
            raise RuntimeError("this request was submitted with an event loop: use `async for ... in aevents()`")
        try:
            while not self._ended:
                yield self._take(self._events.get())
        finally:
            if not self._ended:  # the consumer stopped early: generation and speech stop too
                self.cancel()

    async def aevents(self) -> AsyncIterator[Event]:
        """The events, for a request submitted with `loop=`; leaving the loop early cancels the request."""
        try:
            while not self._ended:
                yield self._take(await self._events.get())
        finally:
            if not self._ended:
                self.cancel()

    def _take(self, event) -> Event:
        """An event handed to the consumer: the last is `Done`, or a failure, raised."""
        self._ended = isinstance(event, (Done, _Failed))
        if isinstance(event, _Failed):
            raise event.error
        return event

    def result(self) -> Done:
        """Runs the request to its end and returns its `Done` (synchronous requests)."""
        done = None
        for event in self:
            done = event
        return done

    # ------------------------------------------------------------------------------------------------ engine side
    def emit(self, event) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass
        else:
            self._events.put(event)

    def emit_text(self, text: str) -> None:
        if not text:
            return
        self.text += text
        self.emit(TextDelta(text))
        if self._speech_text is not None:
            self._speech_text.put(text)

    def pick(self, logits: torch.Tensor) -> int:
        if not self.sampler.needs_history:
            return self.sampler(logits)
        vocab = logits.shape[-1]  # media placeholders may lie past the LLM's vocabulary: no penalty applies to them
        return self.sampler(logits, [t for t in self.history if t < vocab])

    def accept(self, token: int, eos: set[int]) -> bool:
        """Takes a generated token; returns True when the request is finished."""
        self.token_times.append(time.perf_counter())
        self.history.append(token)
        if token in eos and not self.options.ignore_eos:
            return self.finish("stop")
        self.emit_text(self.trimmer.push(self.pieces.put(token)))
        if self.trimmer.stopped:
            return self.finish("stop")
        if len(self.token_times) >= self.options.max_new_tokens:
            return self.finish("length")
        self.next_token = token
        return False

    def finish(self, reason: str, error: BaseException | None = None) -> bool:
        if self.finish_reason is not None:
            return True
        if error is None and reason != "cancelled":
            self.emit_text(self.trimmer.flush())
        self.finish_reason = reason
        end = time.perf_counter()
        times = self.token_times
        decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
        start = self.submitted
        self.timings = {
            "queue_s": round((self.admitted or end) - start, 4),
            "encode_s": round((self.encoded or end) - (self.admitted or end), 4),
            "time_to_first_token_s": round((times[0] if times else end) - start, 4),
            "tokens_per_s": round((len(times) - 1) / decode_s, 2) if decode_s > 0 else 0.0,
            "total_s": round(end - start, 4),
            "num_tokens": len(times),
        }
        self.usage = Usage(self.prompt_tokens, len(times))
        if self._speech_text is not None:  # the speech thread sends Done after the last sentence
            self._pending_error = error
            self._speech_text.put(_SPEECH_END)
        elif error is not None:
            self.emit(_Failed(error))
        else:
            self.emit(Done(reason, self.text, self.usage, self.timings))
        return True

    def _start_speech(self) -> None:
        from ..speech import SpeechStream

        self._speech_text = queue.Queue()
        self._pending_error = None

        def pieces():
            while (piece := self._speech_text.get()) is not _SPEECH_END:
                yield piece

        self._speech_stream = SpeechStream(pieces(), _Throttled(self.voice, self.engine.speech_slots))

        def speak():
            try:
                for chunk in self._speech_stream:
                    self.emit(SpeechDelta(chunk.index, chunk.text, chunk.audio, chunk.sample_rate))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                self.cancel()
                self.emit(_Failed(err))
                return
            if self._pending_error is not None:
                self.emit(_Failed(self._pending_error))
                return
            speech_timings = {k: v for k, v in self._speech_stream.timings.items() if k != "total_s"}
            speech_timings["time_to_first_audio_s"] = round(
                speech_timings.get("time_to_first_audio_s", 0.0) + (self._speech_started - self.submitted), 4)
            self.timings.update(speech_timings)
            self.timings["total_s"] = round(time.perf_counter() - self.submitted, 4)
            self.emit(Done(self.finish_reason, self.text, self.usage, self.timings))

        self._speech_started = time.perf_counter()
        threading.Thread(target=speak, name=f"omniola-speech-{self.id}", daemon=True).start()


class Engine:
    """Generates answers for a loaded model, decoding every running request in one batch.

    Args:
        model: a loaded `OlaForConditionalGeneration` in eval mode.
        processor: its `OlaProcessor`.
        max_batch: requests decoded together; more wait in a queue (default: `default_max_batch(model.device)`).
        speech_workers: sentences synthesised at once, over all spoken answers.
    """

    def __init__(self, model, processor, *, max_batch: int | None = None, speech_workers: int = 2):
        self.model, self.processor = model, processor
        self.speech_slots = threading.Semaphore(speech_workers)
        self.backend = getattr(model, "llm_backend", None)  # the LLM in llama.cpp (weight format gguf-q8_0)
        self.max_batch = 1 if self.backend is not None else max_batch or default_max_batch(model.device)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        eos = model.generation_config.eos_token_id
        eos = processor.tokenizer.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._cv = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[GenerationRequest] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (tests and benchmarks)
        self.max_batch_seen = 0
        # the batch: the KV cache of the running requests (left-padded) and its attention mask (1 = real token)
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L)

    # ------------------------------------------------------------------------------------------------ public API
    def submit(self, inputs, options: GenerationOptions | None = None, *, voice=None,
               loop: asyncio.AbstractEventLoop | None = None) -> GenerationRequest:
        """Queues one request.

        Args:
            inputs: the processor's output for one conversation (`OlaProcessor.apply_chat_template`), batch of 1.
            options: how to generate (default: `GenerationOptions()`).
            voice: a `SpeechBackend`: the answer is also spoken, sentence by sentence, as `SpeechDelta` events.
            loop: deliver events to this asyncio loop (iterate with `aevents()`); else iterate the request.
        """
        if int(inputs["input_ids"].shape[0]) != 1:
            raise ValueError(f"submit takes one conversation (batch of 1), got {int(inputs['input_ids'].shape[0])}")
        request = GenerationRequest(self, inputs, options or GenerationOptions(), voice, loop)
        with self._cv:
            if self._closed:
                raise EngineClosedError("the generation engine is closed")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="omniola-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return request

    def generate(self, inputs, options: GenerationOptions | None = None) -> Done:
        """Generates one answer and returns its `Done` (text, finish reason, usage, timings)."""
        return self.submit(inputs, options).result()

    @property
    def running(self) -> int:
        """Requests in the batch still generating (a finished one has sent its `Done`; it leaves the batch at the
        scheduler's next step)."""
        return sum(r.finish_reason is None for r in self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Ends every request (`cancelled`) and stops the scheduler thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ------------------------------------------------------------------------------------------------ scheduler
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._closed):
                    self._cv.wait()
                if self._closed:
                    for request in [*self._waiting, *self._running]:
                        request.finish("cancelled")
                    self._waiting.clear()
                    self._retire()
                    return
            self._retire()
            self._admit()
            if self._running:
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001 - a failed step fails the requests in it, not the engine
                    for request in self._running:
                        request.finish("error", err)
                self._retire()

    def _admit(self) -> None:
        """Admits waiting requests into the free slots and prefills them together. While others are decoding, at
        most one of them brings media, so a step waits for one encoder call at most; text requests all come in."""
        free = self.max_batch - len(self._running)
        media_budget = 1 if self._running else free
        admitted, skipped = [], []
        with self._cv:
            while self._waiting and len(admitted) < free:
                request = self._waiting.popleft()
                if request.cancelled:
                    request.finish("cancelled")
                elif request.has_media and not media_budget:
                    skipped.append(request)  # keeps its place in the queue
                else:
                    media_budget -= request.has_media
                    admitted.append(request)
            self._waiting.extendleft(reversed(skipped))
        if admitted:
            self._prefill(admitted)

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Prefills `requests`; anything unexpected fails them, never the scheduler (the running batch goes on)."""
        try:
            self._prefill_batch(requests)
        except Exception as err:  # noqa: BLE001
            for request in requests:
                if request.finish_reason is None and request not in self._running:
                    request.finish("error", err)

    @torch.inference_mode()
    def _prefill_batch(self, requests: list[GenerationRequest]) -> None:
        """Encodes each request's media, then prefills all their prompts in one left-padded forward pass."""
        model = self.model
        ready, embeds = [], []
        for request in requests:
            request.admitted = time.perf_counter()
            try:
                inputs = request.inputs.to(model.device)
                media = {k: inputs[k] for k in PREFILL_ONLY_INPUTS if k in inputs}
                embeds.append(model.model.embed_multimodal(inputs["input_ids"], **media)[0])  # (P, H)
                ready.append(request)
            except Exception as err:  # noqa: BLE001 - bad media fail this request only
                request.finish("error", err)
            request.encoded = time.perf_counter()
        if not ready:
            return
        if self.backend is not None:  # llama.cpp: one conversation at a time (max_batch is 1)
            (request,) = ready
            logits = torch.from_numpy(self.backend.prefill(embeds[0].float().cpu().numpy()))
            if not request.accept(request.pick(logits), self.eos):
                self._running = [request]
            return
        length = max(e.shape[0] for e in embeds)
        batch = torch.stack([F.pad(e, (0, 0, length - e.shape[0], 0)) for e in embeds])  # (k, P, H)
        mask = torch.stack([F.pad(torch.ones(e.shape[0], dtype=torch.long, device=model.device),
                                  (length - e.shape[0], 0)) for e in embeds])  # (k, P)
        out = model(inputs_embeds=batch, attention_mask=mask, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        going = [i for i, request in enumerate(ready) if not request.accept(request.pick(out.logits[i, -1]), self.eos)]
        if going:
            cache, index = out.cache, torch.tensor(going, device=mask.device)
            if len(going) < len(ready):
                for layer in cache.layers:
                    layer.batch_select_indices(index)
            self._join([ready[i] for i in going], cache, mask[index])

    def _join(self, requests: list[GenerationRequest], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Adds prefilled requests to the batch, padding the shorter side on the left."""
        if self._cache is None:
            self._cache, self._mask, self._running = cache, mask, list(requests)
        else:
            grow = mask.shape[1] - self._mask.shape[1]  # > 0: the batch is padded; < 0: the newcomers are
            pad_old, pad_new = max(grow, 0), max(-grow, 0)
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
                old.values = torch.cat([F.pad(old.values, (0, 0, pad_old, 0)),
                                        F.pad(new.values, (0, 0, pad_new, 0))])
            self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
            self._running.extend(requests)
        self.max_batch_seen = max(self.max_batch_seen, len(self._running))

    @torch.inference_mode()
    def _step(self) -> None:
        """One decode step for the whole batch."""
        model = self.model
        if self.backend is not None:
            logits = torch.from_numpy(self.backend.step(self._running[0].next_token))[None]  # (1, V)
        else:
            tokens = torch.tensor([[r.next_token] for r in self._running], device=model.device)  # (B, 1)
            self._mask = F.pad(self._mask, (0, 1), value=1)  # (B, L + 1)
            out = model(inputs_embeds=model.get_input_embeddings()(tokens), attention_mask=self._mask,
                        cache=self._cache, use_cache=True)
            logits = out.logits[:, -1].float()  # (B, V)
        self.steps += 1
        for i, request in enumerate(self._running):
            if request.cancelled:
                request.finish("cancelled")
            else:
                request.accept(request.pick(logits[i]), self.eos)

    def _retire(self) -> None:
        """Removes finished and cancelled requests from the batch, and the padding no request needs any more."""
        with self._cv:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                request.finish("cancelled")
        for request in self._running:
            if request.cancelled:
                request.finish("cancelled")
        keep = [i for i, r in enumerate(self._running) if r.finish_reason is None]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask[index]
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are padding for all
        self._mask = self._mask[:, unused:]
        for layer in self._cache.layers:
            layer.batch_select_indices(index)
            layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        self._running = [self._running[i] for i in keep]
