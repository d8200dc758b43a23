"""The language model of an omniola checkpoint as a GGUF file, for llama.cpp (`omniola export-gguf`).

Only the LLM is exported (its LoRA already merged in a saved checkpoint): the media encoders and connectors stay in
torch, and their embeddings are handed to llama.cpp at prefill (`omniola.llama_cpp_llm`). Written with the `gguf`
package (llama.cpp's own writer and quantizers), for the two LLM families omniola builds on:

- `llama` (SmolLM2): the query and key rows are reordered from transformers' rotate-half layout to the interleaved
  pairs llama.cpp's rotary embedding expects (transformers' GGUF loader undoes the same reordering);
- `qwen2` (Ola's Qwen2.5): no reordering (llama.cpp rotates Qwen2 in the rotate-half layout), query/key/value biases.

`export_lora_adapter` writes the other way to hand llama.cpp a fine-tuned LLM: the GGUF it was built from stays as it
is (SmolLM2's own Q4_1 file), and the fine-tuning becomes a LoRA adapter GGUF beside it. A checkpoint's merged LLM
differs from its base by the sum of its stages' LoRA updates (rank 16 per stage); a singular value decomposition of
each matrix's difference gives that update back as float factors, and llama.cpp adds them at every step.

Matrices are written as `q8_0` (8-bit blocks of 32 with one scale each: the fine-tuning survives, unlike 4-bit
grids), `f16` or `f32`; norms stay float32. Token ids past the LLM's vocabulary (omniola's media placeholders) are
left out of the GGUF's vocabulary: they never reach the LLM as ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConversionError
from ..weights import _checkpoint_ranges, _release_pages

QUANT_TYPES = ("q8_0", "f16", "f32")
_ARCHES = {"llama": "llama", "qwen2": "qwen2"}
# transformers name (after `layers.N.`) -> llama.cpp name (after `blk.N.`)
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _rotary_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from halves `[x0..x31, y0..y31]` to pairs `[x0, y0, x1, y1, ...]` (llama.cpp's llama)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llm_tensors(model) -> tuple[str, dict[str, np.ndarray]]:
    """The LLM's tensors under llama.cpp's names (float32 numpy), and the architecture name."""
    config = model.config.get_text_config()
    arch = _ARCHES.get(config.model_type)
    if arch is None:
        raise ConversionError(f"GGUF export supports the LLM families {sorted(_ARCHES)}, not {config.model_type!r}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = {k: v.detach().float().cpu().numpy() for k, v in model.model.language_model.state_dict().items()}
    tensors: dict[str, np.ndarray] = {"token_embd.weight": state.pop("embed_tokens.weight"),
                                      "output_norm.weight": state.pop("norm.weight")}
    head = model.lm_head.weight
    if head.data_ptr() != model.get_input_embeddings().weight.data_ptr():  # untied: its own output matrix
        tensors["output.weight"] = head.detach().float().cpu().numpy()
    for name, value in state.items():
        if "rotary_emb" in name:
            continue
        parts = name.split(".")  # layers.N.<module>.<weight|bias>
        if parts[0] != "layers" or ".".join(parts[2:-1]) not in _LAYER_NAMES:
            raise ConversionError(f"the LLM tensor {name!r} has no llama.cpp counterpart")
        module = ".".join(parts[2:-1])
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj") and parts[-1] == "weight":
            value = _rotary_pairs(value, heads if module == "self_attn.q_proj" else kv_heads)
        tensors[f"blk.{parts[1]}.{_LAYER_NAMES[module]}.{parts[-1]}"] = value
    return arch, tensors


def export_gguf(model, tokenizer, path: str | os.PathLike, *, quant: str = "q8_0") -> Path:
    """Writes the LLM of a loaded omniola model (float weights) as a GGUF file that llama.cpp loads.

    Args:
        model: an `OlaForConditionalGeneration` in a float dtype.
        tokenizer: its tokenizer (the GGUF carries the LLM's vocabulary and merges, as llama.cpp requires).
        path: the `.gguf` file to write (atomically).
        quant: `q8_0`, `f16` or `f32` for the matrices.

    Raises:
        ConversionError: an unknown `quant`, an LLM family llama.cpp's names are not mapped for, or a tokenizer
            that is not BPE.
    """
    import gguf

    if quant not in QUANT_TYPES:
        raise ConversionError(f"unknown GGUF type {quant!r}; use one of {', '.join(QUANT_TYPES)}")
    config = model.config.get_text_config()
    arch, tensors = llm_tensors(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(f"omniola LLM ({config.model_type})")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta")
                                    or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "f32": gguf.LlamaFileType.ALL_F32}[quant]
    writer.add_file_type(file_type)
    _add_vocabulary(writer, tokenizer, config.vocab_size)
    target = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16,
              "f32": gguf.GGMLQuantizationType.F32}[quant]
    ranges = _checkpoint_ranges()
    for name, value in tensors.items():
        kind = target if value.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms and biases stay float32
        if kind == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, value.astype(np.float16 if kind == gguf.GGMLQuantizationType.F16 else np.float32))
        # the float32 checkpoint pages it was read from (a view of the mapped file) are not needed again: the
        # peak is the written weights plus one tensor, not the whole float32 LLM besides
        _release_pages(torch.from_numpy(value), ranges)
    return _finish(writer, tmp, path)


def _finish(writer, tmp: Path, path: Path) -> Path:
    """Writes a filled `GGUFWriter` to its `tmp` file, then moves it to `path` in one step (no half-written GGUF)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _add_vocabulary(writer, tokenizer, vocab_size: int) -> None:
    """The LLM's BPE vocabulary (ids below `vocab_size`), merges, token types and special ids."""
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ConversionError("GGUF export needs a BPE tokenizer (llama.cpp's gpt2 vocabulary), not a "
                              f"{model.get('type')} one")
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_types([3 if i in special else 1 for i in range(vocab_size)])  # 3: control, 1: normal
    merges = model["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None and token_id < vocab_size:
            setter(int(token_id))


def base_gguf(model) -> Path:
    """The GGUF file a model's LLM was built from (`omniola build --llm smollm2`, or a `.gguf` path), found from the
    LLM config's source: that file, the one GGUF in that folder, or, when the folder is an offline LLM package's
    from another install, the package's file in this one.

    Raises:
        ConversionError: the LLM was not built from a GGUF file that is here.
    """
    from ..components import OFFLINE_LLMS, _package_file

    source = str(getattr(model.config.get_text_config(), "_name_or_path", "") or "")
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    for spec, (module, relative, pip_name) in OFFLINE_LLMS.items():
        if path.name == module:
            return _package_file(module, relative, pip_name, f"the LLM {spec!r}")
    raise ConversionError(f"this model's LLM was built from {source or 'an unrecorded source'!r}, not from one GGUF "
                          "file that is here; --weights gguf-lora needs that file (use gguf-f16 or gguf-q8_0)")


#: A difference from the base whose singular values fall below this share of the largest is rounding, not fine-tuning.
LORA_RANK_TOLERANCE = 1e-4


def export_lora_adapter(model, base: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Writes the fine-tuning of a loaded omniola model's LLM as a LoRA adapter GGUF on `base`, the GGUF the LLM was
    built from, which llama.cpp then loads unchanged with the adapter (`--weights gguf-lora`).

    Every matrix's difference from the base, `W - W_base`, is factored as `B @ A` by a singular value decomposition at
    one rank for all matrices (the largest numerical rank among them: 48 after three LoRA stages of rank 16). The
    factors are float32, so llama.cpp computes the model that was trained, up to its own rounding of the base
    product's activations.

    Raises:
        ConversionError: the base is not a GGUF of this LLM, a tensor the adapter cannot carry (a norm, the embedding
            table) was trained, or the difference is not of low rank (the LLM was not fine-tuned by LoRA from it).
    """
    import gguf

    base = Path(base)
    arch, tensors = llm_tensors(model)
    try:
        reader = gguf.GGUFReader(base)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{base}: not a readable GGUF file ({err})") from None
    field = reader.fields.get("general.architecture")
    base_arch = bytes(field.parts[-1]).decode() if field is not None else None
    if base_arch != arch:
        raise ConversionError(f"{base}: a GGUF of a {base_arch!r} LLM, not of this model's {arch!r} LLM")
    stored = {t.name: t for t in reader.tensors}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}  # u, s, vh, rank
    for name, value in tensors.items():
        if name not in stored:
            raise ConversionError(f"{base}: has no tensor {name!r}; it is not the GGUF this model's LLM was built from")
        t = stored[name]
        original = gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape)
        delta = torch.from_numpy(value - original)
        if value.ndim != 2 or name == "token_embd.weight" or name == "output.weight":
            if delta.abs().max() > 1e-6 * max(float(np.abs(original).max()), 1.0):
                raise ConversionError(f"the LLM's {name} differs from {base}'s, and a LoRA adapter carries only the "
                                      "decoder layers' matrices; use --weights gguf-f16 for this model")
            continue
        if delta.abs().max() == 0:
            continue
        # a low-rank difference needs only its leading singular vectors: a randomized decomposition finds them
        # (exactly, up to rounding, when the rank is below `limit`) at a fraction of a full one's cost
        limit = min(delta.shape) // 4
        with torch.random.fork_rng():  # its random projection, reproducible, leaving the caller's generator alone
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(delta, q=min(limit + 8, min(delta.shape)), niter=2)
        rank = int((s > s[0] * LORA_RANK_TOLERANCE).sum())
        if rank > limit:
            raise ConversionError(f"the LLM's {name} differs from {base}'s at rank {rank} or more (of "
                                  f"{min(delta.shape)}): it was not fine-tuned from it by LoRA; use --weights "
                                  "gguf-f16 for this model")
        factors[name] = (u, s, v.T, rank)
    if not factors:
        raise ConversionError(f"the LLM is {base} unchanged: no adapter to write; load the base GGUF as it is")
    rank = max(r for *_, r in factors.values())
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type("adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # llama.cpp scales by alpha / rank = 1
    for name, (u, s, vh, _) in factors.items():
        a, b = torch.zeros(rank, vh.shape[1]), torch.zeros(u.shape[0], rank)  # one rank for all: zeros pad a small one
        kept = min(rank, s.shape[0])
        root = s[:kept].sqrt()
        a[:kept], b[:, :kept] = root[:, None] * vh[:kept], u[:, :kept] * root
        writer.add_tensor(f"{name}.lora_a", a.numpy())  # (rank, in)
        writer.add_tensor(f"{name}.lora_b", b.numpy())  # (out, rank)
    return _finish(writer, tmp, path)
