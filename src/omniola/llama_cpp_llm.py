"""omniola's LLM run by llama.cpp (llama-cpp-python), fed the prompt as embeddings with the media scattered in.

The media encoders and connectors stay in torch: `OlaModel.embed_multimodal` gives the prompt's embeddings, which
go to llama.cpp in one `llama_decode` of an embeddings batch (as llama.cpp's own multimodal projects do). The answer
is then decoded token by token by llama.cpp from the GGUF that `omniola convert gguf` wrote.

    llm = LlamaCppLLM("model.q8_0.gguf", threads=2)
    embeds = model.model.embed_multimodal(inputs["input_ids"], **media)[0]     # (P, H) float32
    logits = llm.prefill(embeds.numpy())                                        # (V,) of the next token
    token = int(logits.argmax()); logits = llm.step(token); ...

Needs the `bench` extra (`pip install 'omniola[llamacpp]'`: llama-cpp-python, compiled for the machine).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from .errors import ComponentNotFoundError, InputError


class LlamaCppLLM:
    """One llama.cpp context over a GGUF LLM: `prefill(embeddings)` then `step(token)`, each returning the next
    token's logits. One conversation at a time (`prefill` starts over).

    llama.cpp allocates a context's key/value cache whole, up front (for SmolLM2's 8192 positions, 190 MB). The
    context therefore starts at `context` positions and, when a conversation needs more, is made again at twice
    the size (up to `max_context`) and the conversation so far is prefilled into it: memory follows use, as
    transformers' growing cache does.

    Args:
        path: the GGUF file.
        lora: a LoRA adapter GGUF to apply to it (`omniola.convert.gguf_export.export_lora_adapter`).
        context: the context's first size (positions of prompt and answer).
        max_context: the most positions a conversation may reach (the LLM's own limit; default `context`).
        threads: CPU threads (default: all).
        batch: most prompt positions per `llama_decode` call (longer prompts are cut into several).
    """

    def __init__(self, path: str | os.PathLike, *, lora: str | os.PathLike | None = None, context: int = 2048,
                 max_context: int | None = None, threads: int | None = None, batch: int = 512):
        try:
            import llama_cpp
        except ImportError as err:
            raise ComponentNotFoundError("running the LLM in llama.cpp needs llama-cpp-python: "
                                         "pip install 'omniola[llamacpp]'") from err
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path} is not a GGUF file (write one with omniola convert gguf)")
        if lora is not None and not Path(lora).is_file():
            raise InputError(f"{lora} is not a LoRA adapter GGUF file")
        self._lib, self._path, self._threads = llama_cpp, path, threads or os.cpu_count()
        self._lora = str(lora) if lora is not None else None
        self.max_context = max(max_context or context, 1)
        self.batch_size = batch
        self.llama = None
        self._open(min(context, self.max_context))
        self.width = int(llama_cpp.llama_model_n_embd(self.llama.model))
        self.vocab = int(self.llama.n_vocab())
        self.position = 0
        self._prompt: np.ndarray | None = None  # the conversation so far, to prefill again into a larger context
        self._tokens: list[int] = []

    def _open(self, context: int) -> None:
        if self.llama is not None:
            self.llama.close()
        self.context = context
        self.llama = self._lib.Llama(model_path=str(self._path), n_ctx=context, n_batch=self.batch_size,
                                     n_ubatch=self.batch_size, n_threads=self._threads,
                                     n_threads_batch=self._threads, lora_path=self._lora, verbose=False)
        self.ctx = self.llama.ctx

    def _fit(self, positions: int) -> None:
        """Makes the context hold `positions`, growing it (and prefilling the conversation again) when needed."""
        if positions <= self.context:
            return
        if positions > self.max_context:
            raise InputError(f"the conversation needs {positions} positions, more than the LLM's {self.max_context}")
        size = self.context
        while size < positions:
            size *= 2
        self._open(min(size, self.max_context))
        if self._prompt is not None:
            prompt, tokens = self._prompt, self._tokens
            self.prefill(prompt)
            for token in tokens:
                self.step(token)

    def _decode(self, embeds: np.ndarray | None, tokens: list[int] | None) -> np.ndarray:
        """One `llama_decode` of embeddings `(n, H)` or token ids at the next positions; logits of the last."""
        lib = self._lib
        n = len(tokens) if tokens is not None else embeds.shape[0]
        batch = lib.llama_batch_init(n, self.width if embeds is not None else 0, 1)
        try:
            if embeds is not None:
                data = np.ascontiguousarray(embeds, dtype=np.float32)
                ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
            for i in range(n):
                if tokens is not None:
                    batch.token[i] = tokens[i]
                batch.pos[i] = self.position + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            batch.n_tokens = n
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status} at position {self.position}")
        finally:
            lib.llama_batch_free(batch)
        self.position += n
        logits = lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.vocab,)).copy()

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        """Starts a conversation from prompt embeddings `(P, H)`; returns the next token's logits `(V,)`."""
        if embeds.ndim != 2 or embeds.shape[1] != self.width:
            raise InputError(f"prompt embeddings must be (positions, {self.width}), got {tuple(embeds.shape)}")
        self._prompt, self._tokens = None, []  # a new conversation: a context that grows has nothing to prefill again
        self._fit(embeds.shape[0])
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)
        self.position, self._prompt = 0, embeds
        logits = None
        for start in range(0, embeds.shape[0], self.batch_size):
            logits = self._decode(embeds[start:start + self.batch_size], None)
        return logits

    def step(self, token: int) -> np.ndarray:
        """Feeds one generated token; returns the next token's logits `(V,)`."""
        self._fit(self.position + 1)
        logits = self._decode(None, [token])
        self._tokens.append(token)
        return logits

    def close(self) -> None:
        """Frees llama.cpp's model and context now (rather than at interpreter exit)."""
        self.llama.close()
