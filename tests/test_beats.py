"""Tests of the BEATs encoder: parity with the original code, padding masks, lengths, checkpoint errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from omniola.errors import ConversionError, InputError, MediaError
from omniola.modeling.beats import (
    BeatsConfig,
    BeatsEncoder,
    beats_fbank,
    beats_output_length,
    kaldi_fbank,
    load_beats_checkpoint,
)

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ola_reference_tiny"

# The fields of an official checkpoint's "cfg" dict, with micro sizes (and the fixture's switches: deep norm, gated
# relative position bias, a fine-tuned classification head).
MICRO_CFG = {
    "input_patch_size": 16,
    "embed_dim": 24,
    "conv_bias": False,
    "encoder_layers": 2,
    "encoder_embed_dim": 16,
    "encoder_ffn_embed_dim": 32,
    "encoder_attention_heads": 2,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6,
    "layer_norm_first": False,
    "deep_norm": True,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "relative_position_embedding": True,
    "num_buckets": 32,
    "max_distance": 64,
    "gru_rel_pos": True,
    "finetuned_model": True,
    "predictor_dropout": 0.0,
    "predictor_class": 5,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1)


@pytest.fixture
def micro_model() -> BeatsEncoder:
    model = BeatsEncoder(BeatsConfig(**MICRO_CFG)).eval()
    with torch.no_grad():  # non-trivial norms and gates, so masking mistakes show
        for name, param in model.named_parameters():
            if name.endswith(("layer_norm.weight", "grep_a")):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def _save_checkpoint(path: Path, model: BeatsEncoder, cfg: dict = MICRO_CFG) -> Path:
    torch.save({"cfg": dict(cfg), "model": model.state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the original implementation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="golden fixture ola_reference_tiny not present")
def test_matches_original_beats_on_fixture():
    from safetensors.torch import load_file

    model = load_beats_checkpoint(FIXTURE / "checkpoint" / "BEATs-tiny-random.pt")
    waveform = load_file(FIXTURE / "inputs" / "shared_speech.safetensors")["speech_wav"]  # [1, 480000]
    expected = load_file(FIXTURE / "outputs" / "intermediates_speech.safetensors")["beats_encoder_out"]  # [1, 1496, 16]

    with torch.no_grad():
        features, padding_mask = model(waveform)

    assert padding_mask is None
    assert features.shape == expected.shape == (1, beats_output_length(waveform.shape[-1]), 16)
    max_diff = (features - expected).abs().max().item()
    assert max_diff < 1e-4, f"max abs diff to the original BEATs output: {max_diff:.3g}"  # measured 1.2e-5


# ---------------------------------------------------------------------------------------------------------------------
# Filter bank
# ---------------------------------------------------------------------------------------------------------------------


def test_fbank_frames_batch_independence_and_pitch():
    t = torch.arange(16_000) / 16_000
    tones = torch.stack([0.5 * torch.sin(2 * math.pi * 440 * t), 0.5 * torch.sin(2 * math.pi * 3000 * t)])

    fbank = kaldi_fbank(tones * 2**15)

    assert fbank.shape == (2, 1 + (16_000 - 400) // 160, 128)
    torch.testing.assert_close(fbank[1:], kaldi_fbank(tones[1:] * 2**15), rtol=0, atol=0)
    peak_low, peak_high = fbank[0].mean(0).argmax().item(), fbank[1].mean(0).argmax().item()
    assert 10 < peak_low < peak_high < 127  # 440 Hz lands well below 3 kHz on the mel axis
    # Silence is floored at log(float32 eps) before BEATs' normalisation.
    silence = beats_fbank(torch.zeros(1, 800))
    expected = (math.log(torch.finfo(torch.float32).eps) - 15.41663) / (2 * 6.55582)
    torch.testing.assert_close(silence, torch.full_like(silence, expected))


# ---------------------------------------------------------------------------------------------------------------------
# Lengths and padding masks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [2_800, 2_959, 2_960, 16_000, 37_123])
def test_output_length_formula(micro_model, num_samples):
    frames = 1 + (num_samples - 400) // 160
    assert beats_output_length(num_samples) == (frames // 16) * 8
    with torch.no_grad():
        features, _ = micro_model(torch.randn(1, num_samples) * 0.1)
    assert features.shape == (1, beats_output_length(num_samples), 16)


def test_output_length_of_short_clips_and_30s_chunk(micro_model):
    assert beats_output_length(480_000) == 1496  # Ola's 30 s chunk
    assert beats_output_length(0) == beats_output_length(399) == beats_output_length(2_799) == 0
    assert beats_output_length(2_800) == 8  # 16 frames: one time block of 8 mel-band patches
    with pytest.raises(MediaError, match="2799 samples"):
        micro_model(torch.zeros(1, 2_799))


def test_padded_batch_matches_single_clips(micro_model):
    lengths = [24_000, 9_137, 3_100, 1_000]  # the last is too short for a single patch
    batch = torch.zeros(len(lengths), max(lengths))
    padding_mask = torch.ones_like(batch, dtype=torch.bool)
    clips = [torch.randn(1, n) * 0.1 for n in lengths]
    for row, clip in enumerate(clips):
        batch[row, : clip.shape[1]] = clip
        padding_mask[row, : clip.shape[1]] = False
    batch[padding_mask] = 0.3  # whatever the padding holds must not matter

    with torch.no_grad():
        features, patch_mask = micro_model(batch, padding_mask)

    assert patch_mask.shape == features.shape[:2]
    assert torch.isfinite(features).all()
    for row, clip in enumerate(clips):
        n = beats_output_length(clip.shape[1])
        assert (~patch_mask[row]).sum().item() == n
        assert not patch_mask[row, :n].any()
        if n == 0:
            continue
        with torch.no_grad():
            alone, _ = micro_model(clip)
        torch.testing.assert_close(features[row, :n], alone[0], rtol=0, atol=1e-5)


def test_mask_without_padding_changes_nothing(micro_model):
    waveforms = torch.randn(2, 8_000) * 0.1
    with torch.no_grad():
        plain, no_mask = micro_model(waveforms)
        masked, mask = micro_model(waveforms, torch.zeros_like(waveforms, dtype=torch.bool))
    assert no_mask is None and not mask.any()
    torch.testing.assert_close(plain, masked, rtol=0, atol=1e-6)


def test_padding_mask_must_match_and_be_trailing(micro_model):
    waveforms = torch.randn(1, 8_000)
    with pytest.raises(InputError, match="shape"):
        micro_model(waveforms, torch.zeros(1, 7_999, dtype=torch.bool))
    leading = torch.zeros_like(waveforms, dtype=torch.bool)
    leading[0, :100] = True
    with pytest.raises(InputError, match="end of each clip"):
        micro_model(waveforms, leading)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_uses_official_key_names(micro_model, tmp_path):
    keys = set(micro_model.state_dict())
    assert {"encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v", "predictor.weight"} <= keys
    assert "encoder.layers.1.self_attn.relative_attention_bias.weight" in keys  # shared table, listed per layer

    loaded = load_beats_checkpoint(_save_checkpoint(tmp_path / "beats.pt", micro_model))

    assert not loaded.training
    waveforms = torch.randn(1, 6_000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded(waveforms)[0], micro_model(waveforms)[0], rtol=0, atol=0)


def test_checkpoint_errors_name_the_file(micro_model, tmp_path):
    missing_file = tmp_path / "absent.pt"
    with pytest.raises(ConversionError, match="absent.pt"):
        load_beats_checkpoint(missing_file)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="garbage.pt"):
        load_beats_checkpoint(garbage)

    bare_state_dict = tmp_path / "bare.pt"
    torch.save(micro_model.state_dict(), bare_state_dict)
    with pytest.raises(ConversionError, match="bare.pt is not a BEATs checkpoint"):
        load_beats_checkpoint(bare_state_dict)

    state = micro_model.state_dict()
    state.pop("encoder.layer_norm.bias")
    state["extra.weight"] = torch.zeros(1)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"cfg": MICRO_CFG, "model": state}, mismatched)
    with pytest.raises(ConversionError, match=r"mismatched.pt.*encoder\.layer_norm\.bias.*extra\.weight"):
        load_beats_checkpoint(mismatched)

    wrong_shape = tmp_path / "wrong_shape.pt"
    _save_checkpoint(wrong_shape, micro_model, {**MICRO_CFG, "predictor_class": 6})
    with pytest.raises(ConversionError, match="wrong_shape.pt"):
        load_beats_checkpoint(wrong_shape)

    bad_cfg = tmp_path / "bad_cfg.pt"
    _save_checkpoint(bad_cfg, micro_model, {**MICRO_CFG, "encoder_attention_heads": 3})
    with pytest.raises(ConversionError, match="bad_cfg.pt has an invalid BEATs cfg"):
        load_beats_checkpoint(bad_cfg)
