"""The LLM exported to GGUF (`omniola convert gguf`) and run by llama.cpp with the prompt as embeddings
(`--weights gguf-*`), on a micro model with a byte-level BPE tokenizer. The llama.cpp tests skip where
llama-cpp-python (the `llamacpp` extra, built from source) is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast, Qwen2Config

from conftest import micro_config, micro_processor
from omniola import OlaForConditionalGeneration
from omniola.convert.gguf_export import _rotary_pairs, export_gguf
from omniola.errors import ConversionError, WeightFormatError
from omniola.processing_ola import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from omniola.weights import check_weight_format

gguf = pytest.importorskip("gguf")
TEXT = ["the quick brown fox jumps over the lazy dog", "what colour is the circle", "a red square on the left"] * 20


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bpe_model_dir(tmp_path_factory, request):
    """A micro Ola whose tokenizer is byte-level BPE (as SmolLM2's and Qwen2's) and whose LLM is a llama (SmolLM2)
    or a qwen2 (Ola's Qwen2.5: query/key/value biases), large random LLM weights so that prompts get different
    greedy answers, saved as a model directory."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT, vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                                  "additional_special_tokens": ["<|im_start|>", IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN]})
    config = micro_config(tokenizer)
    if request.param == "qwen2":
        llama = config.text_config
        config.text_config = Qwen2Config(
            vocab_size=llama.vocab_size, hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
            num_hidden_layers=llama.num_hidden_layers, num_attention_heads=llama.num_attention_heads,
            num_key_value_heads=llama.num_key_value_heads, max_position_embeddings=llama.max_position_embeddings,
            eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = OlaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.mul_(10 if p.ndim == 2 else 1)
    out = tmp_path_factory.mktemp(f"bpe-{request.param}") / "m"
    model.save_pretrained(out)
    micro_processor(tokenizer, config).save_pretrained(out)
    return out


def _load(path, weights):
    from omniola.inference import load_model

    return load_model(path, device="cpu", weights=weights)


def test_rotary_pairs_interleave_each_heads_halves():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of 8 rows
    out = _rotary_pairs(w, heads=2)
    assert out[:8, 0].tolist() == w[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()
    assert out[8:, 0].tolist() == w[[8, 12, 9, 13, 10, 14, 11, 15], 0].tolist()


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_export_writes_the_llm_under_llama_cpp_names(bpe_model_dir, tmp_path, quant):
    model, processor = _load(bpe_model_dir, "fp32")
    path = export_gguf(model, processor.tokenizer, tmp_path / "llm.gguf", quant=quant)
    reader = gguf.GGUFReader(path)
    config = model.config.get_text_config()
    fields = {f.name: f for f in reader.fields.values()}
    arch = config.model_type
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    assert int(fields[f"{arch}.block_count"].parts[-1][0]) == config.num_hidden_layers
    names = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= set(names)
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert ("output.weight" in names) == (not tied)  # a tied head reuses token_embd
    assert len(fields["tokenizer.ggml.tokens"].data) == config.vocab_size  # placeholders past the vocabulary left out
    q = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
    stored = names["blk.0.attn_q.weight"]
    values = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(q.shape)
    expected = _rotary_pairs(q, config.num_attention_heads) if arch == "llama" else q  # qwen2: rotate-half kept
    tolerance = 0 if quant == "f32" else np.abs(q).max() / 127  # q8_0: one step of a block's scale
    assert np.abs(values - expected).max() <= tolerance + 1e-7


def test_export_refuses_what_it_cannot_write(bpe_model_dir, micro, tmp_path):
    model, processor = _load(bpe_model_dir, "fp32")
    with pytest.raises(ConversionError, match="unknown GGUF type"):
        export_gguf(model, processor.tokenizer, tmp_path / "x.gguf", quant="q4_k")
    micro_model, micro_proc = micro  # a word-level tokenizer: llama.cpp has no such vocabulary
    with pytest.raises(ConversionError, match="BPE"):
        export_gguf(micro_model, micro_proc.tokenizer, tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


def test_gguf_formats_are_cpu_only():
    with pytest.raises(WeightFormatError, match="CPU"):
        check_weight_format("gguf-q8_0", torch.device("cuda"))


@pytest.mark.parametrize("weights", ["gguf-f32", "gguf-q8_0"])
def test_llama_cpp_answers_as_torch_with_media_at_prefill(bpe_model_dir, tmp_path, monkeypatch, weights):
    pytest.importorskip("llama_cpp")
    from PIL import Image

    from omniola.generation import Engine, GenerationOptions

    monkeypatch.setenv("OMNIOLA_HOME", str(tmp_path))
    reference, processor = _load(bpe_model_dir, "fp32")
    model, _ = _load(bpe_model_dir, weights)
    assert model.weight_format == weights and len(model.model.language_model.layers) == 0
    with pytest.raises(WeightFormatError, match="llama.cpp"):  # no silently wrong torch pass over the empty decoder
        model.generate(**processor.apply_chat_template([{"role": "user", "content": "hi"}]), max_new_tokens=2)
    assert list((tmp_path / "gguf").glob(f"*.{weights.removeprefix('gguf-')}.gguf"))
    questions = [[{"role": "user", "content": q}] for q in ("what colour is the circle", "the quick brown fox")]
    questions.append([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), "red")},
                                                   {"type": "text", "text": "a red square"}]}])
    options = GenerationOptions(max_new_tokens=12)
    expected = [Engine(reference, processor).generate(processor.apply_chat_template(q), options).text
                for q in questions]
    got = [Engine(model, processor).generate(processor.apply_chat_template(q), options).text for q in questions]
    assert len(set(expected)) == len(expected)  # the answers differ: the comparison means something
    if weights == "gguf-f32":
        assert got == expected
    else:  # 8-bit weights: the first tokens agree
        assert all(g[:3] == e[:3] for g, e in zip(got, expected)), (got, expected)
    model.llm_backend.close()


def test_llama_cpp_context_grows_with_the_conversation(bpe_model_dir, tmp_path):
    """A context that starts small is made again, larger, when a conversation outgrows it: the logits are those of
    a context large enough from the start; past the LLM's limit a clear error."""
    pytest.importorskip("llama_cpp")
    from omniola.errors import InputError
    from omniola.llama_cpp_llm import LlamaCppLLM

    model, processor = _load(bpe_model_dir, "fp32")
    path = export_gguf(model, processor.tokenizer, tmp_path / "llm.gguf", quant="f32")
    prompt = model.get_input_embeddings()(torch.tensor([5, 17, 42, 7, 99, 3])).detach().numpy()
    runs = []
    for llm in (LlamaCppLLM(path, context=8, max_context=64, threads=1),
                LlamaCppLLM(path, context=64, threads=1)):
        logits = [llm.prefill(prompt)]
        for _ in range(20):  # 26 positions: the small context grows from 8 to 16 to 32
            logits.append(llm.step(int(logits[-1].argmax())))
        runs.append((llm.context, np.stack(logits)))
        if llm.max_context == 64:
            small = llm
    (grown, first), (_, second) = runs
    assert grown == 32 and np.allclose(first, second, atol=1e-4)
    with pytest.raises(InputError, match="needs 65 positions, more than the LLM's 64"):
        small.prefill(np.zeros((65, prompt.shape[1]), np.float32))


def _fine_tuned_on_a_base(bpe_model_dir, tmp_path, rank=2):
    """The micro model's LLM written as a float32 base GGUF, then 'fine-tuned' from it: a random rank-`rank` update
    on every decoder matrix (as merged LoRA stages leave it), saved with that GGUF as its LLM's source."""
    model, processor = _load(bpe_model_dir, "fp32")
    base = export_gguf(model, processor.tokenizer, tmp_path / "base.gguf", quant="f32")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
                out, inp = linear.weight.shape
                linear.weight += (torch.randn(out, rank, generator=generator)
                                  @ torch.randn(rank, inp, generator=generator)) * 0.5
    model.config.get_text_config()._name_or_path = str(base)
    out = tmp_path / "tuned"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor, base, out


def test_lora_adapter_gives_back_the_fine_tuning(bpe_model_dir, tmp_path):
    from omniola.convert.gguf_export import base_gguf, export_lora_adapter

    model, _, base, _ = _fine_tuned_on_a_base(bpe_model_dir, tmp_path)
    assert base_gguf(model) == base
    path = export_lora_adapter(model, base, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 2.0  # the update's rank: llama.cpp scales by 1
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert not any(n.startswith(("blk.0.attn_v", "blk.0.ffn_up", "token_embd")) for n in stored)  # unchanged: none
    config = model.config.get_text_config()
    q = model.model.language_model.layers[1].self_attn.q_proj.weight.detach().numpy()
    original = {t.name: t for t in gguf.GGUFReader(base).tensors}["blk.1.attn_q.weight"]
    expected = (_rotary_pairs(q, config.num_attention_heads) if config.model_type == "llama" else q) - np.asarray(
        original.data).reshape(q.shape)
    a, b = stored["blk.1.attn_q.weight.lora_a"], stored["blk.1.attn_q.weight.lora_b"]
    assert a.shape == (2, q.shape[1]) and b.shape == (q.shape[0], 2)
    assert np.abs(b @ a - expected).max() < 1e-4 * np.abs(expected).max()


def test_lora_adapter_refuses_what_it_cannot_carry(bpe_model_dir, tmp_path):
    from omniola.convert.gguf_export import base_gguf, export_lora_adapter

    model, _, base, _ = _fine_tuned_on_a_base(bpe_model_dir, tmp_path)
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight.add_(torch.randn(64, 32))  # a full-rank change
    with pytest.raises(ConversionError, match="rank"):
        export_lora_adapter(model, base, tmp_path / "a.gguf")
    with torch.no_grad():
        model.model.language_model.norm.weight.add_(0.1)
    with pytest.raises(ConversionError, match="output_norm.weight differs"):
        export_lora_adapter(model, base, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    model.config.get_text_config()._name_or_path = str(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="not from one GGUF file"):
        base_gguf(model)


def test_llama_cpp_with_the_lora_adapter_answers_as_torch(bpe_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from omniola.generation import Engine, GenerationOptions

    monkeypatch.setenv("OMNIOLA_HOME", str(tmp_path))
    _, _, base, tuned = _fine_tuned_on_a_base(bpe_model_dir, tmp_path)
    reference, processor = _load(tuned, "fp32")
    model, _ = _load(tuned, "gguf-lora")
    assert model.llm_backend._path == base and list((tmp_path / "gguf").glob("*.lora.gguf"))
    plain, _ = _load(bpe_model_dir, "fp32")  # the base alone: its answers differ, so the adapter is applied
    options = GenerationOptions(max_new_tokens=12)
    questions = [[{"role": "user", "content": q}] for q in ("what colour is the circle", "the quick brown fox")]
    got, expected, untuned = ([Engine(m, processor).generate(processor.apply_chat_template(q), options).text
                               for q in questions] for m in (model, reference, plain))
    assert got == expected and untuned != expected
    model.llm_backend.close()
