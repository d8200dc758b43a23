"""Whisper encoder weights from CTranslate2 and openai-whisper checkpoints, as transformers state dicts.

Both loaders return `(config, state_dict)` such that
`transformers.models.whisper.modeling_whisper.WhisperEncoder(config).load_state_dict(state_dict, strict=True)`
succeeds; every tensor is float32. Decoder weights are read only for their shapes (to fill the config).

CTranslate2 `model.bin` layout, read here without importing ctranslate2 (writer:
`python/ctranslate2/specs/model_spec.py::ModelSpec._serialize`, reader: `src/models/model.cc::Model::load`).
Integers are little-endian; a *string* is a uint16 length that counts a trailing NUL, then the bytes and the NUL.

    uint32 binary_version                     1..6
    string spec_name; uint32 spec_revision    only if binary_version >= 2 ("WhisperSpec", revision <= 3)
    uint32 num_variables, then for each:
        string name; uint8 rank; uint32 dims[rank]
        uint8 dtype_id; uint32 num_bytes      binary_version >= 4; ids: float32, int8, int16, int32, float16, bfloat16
        uint8 item_size; uint32 num_items     binary_version < 4; item sizes 4, 2, 1: float32, int16, int8
        payload[num_bytes]                    row-major
    uint32 num_aliases, then (string alias, string target) pairs      only if binary_version >= 3

Whisper encoder variables (`WhisperEncoderSpec`): `encoder/conv{1,2}/{weight,bias}`,
`encoder/position_encodings/encodings`, `encoder/layer_norm/{gamma,beta}`, `encoder/num_heads` (int16 scalar), and
per layer `encoder/layer_N/self_attention/{layer_norm/{gamma,beta}, linear_0 (fused q|k|v), linear_1 (output)}`
and `encoder/layer_N/ffn/{layer_norm/{gamma,beta}, linear_0, linear_1}`. Quantized weights come with a
`<name>_scale` variable.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from omniola.errors import ConversionError

# Newest `model.bin` binary version and WhisperSpec revision whose layout this module knows.
_CT2_MAX_BINARY_VERSION = 6
_CT2_WHISPER_MAX_REVISION = 3
# Index = dtype id; order of `enum class DataType` in CTranslate2's include/ctranslate2/types.h.
_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
# binary_version < 4 stored an item size instead of a dtype id (model.cc::get_dtype_from_item_size).
_CT2_LEGACY_ITEM_SIZE_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}
# CTranslate2's WhisperEncoder reads `num_heads` with this default when the variable is absent.
_CT2_DEFAULT_NUM_HEADS = 8

# Whisper tokenizer sizes: the English-only (GPT-2 based) vocabulary has 51864 entries, multilingual ones more.
_WHISPER_EN_VOCAB_SIZE = 51864

# CTranslate2 encoder names (after "encoder/") -> WhisperEncoder keys.
_CT2_TOP_LEVEL = {
    "conv1/weight": "conv1.weight",
    "conv1/bias": "conv1.bias",
    "conv2/weight": "conv2.weight",
    "conv2/bias": "conv2.bias",
    "position_encodings/encodings": "embed_positions.weight",
    "layer_norm/gamma": "layer_norm.weight",
    "layer_norm/beta": "layer_norm.bias",
}
# CTranslate2 names inside "encoder/layer_N/" -> keys inside "layers.N." (the fused q|k|v linear is split apart).
_CT2_PER_LAYER = {
    "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
    "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
    "self_attention/linear_1/weight": "self_attn.out_proj.weight",
    "self_attention/linear_1/bias": "self_attn.out_proj.bias",
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
}
_CT2_FUSED_QKV = "self_attention/linear_0/"
_CT2_LAYER_NAME = re.compile(r"layer_(\d+)/(.+)")

# openai-whisper encoder keys (after the "encoder." prefix) -> WhisperEncoder keys.
_OPENAI_TOP_LEVEL = {
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "positional_embedding": "embed_positions.weight",
    "ln_post.weight": "layer_norm.weight",
    "ln_post.bias": "layer_norm.bias",
}
# Keys inside "blocks.N." -> keys inside "layers.N.". openai-whisper's `key` has no bias, nor has transformers' k_proj.
_OPENAI_PER_BLOCK = {
    "attn.query.weight": "self_attn.q_proj.weight",
    "attn.query.bias": "self_attn.q_proj.bias",
    "attn.key.weight": "self_attn.k_proj.weight",
    "attn.value.weight": "self_attn.v_proj.weight",
    "attn.value.bias": "self_attn.v_proj.bias",
    "attn.out.weight": "self_attn.out_proj.weight",
    "attn.out.bias": "self_attn.out_proj.bias",
    "attn_ln.weight": "self_attn_layer_norm.weight",
    "attn_ln.bias": "self_attn_layer_norm.bias",
    "mlp.0.weight": "fc1.weight",
    "mlp.0.bias": "fc1.bias",
    "mlp.2.weight": "fc2.weight",
    "mlp.2.bias": "fc2.bias",
    "mlp_ln.weight": "final_layer_norm.weight",
    "mlp_ln.bias": "final_layer_norm.bias",
}
_OPENAI_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")
_OPENAI_ENCODER_PREFIXES = ("encoder.", "whisper_model.")


# --------------------------------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader


@dataclass(frozen=True)
class CT2Variable:
    """One variable of a CTranslate2 `model.bin`: where its payload lies and how to interpret it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    """Byte position of the payload in the file."""
    num_bytes: int


@dataclass(frozen=True)
class CT2ModelBin:
    """The header of a CTranslate2 `model.bin` (payloads stay on disk until read)."""

    path: Path
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, CT2Variable]
    """Stored variables in file order, plus one entry per alias pointing at its target's payload."""
    aliases: dict[str, str]


class _BinaryReader:
    """Sequential little-endian reads that raise `ConversionError` (naming the file and offset) when it ends early."""

    def __init__(self, file: BinaryIO, path: Path, size: int) -> None:
        self.file = file
        self.path = path
        self.size = size

    def read(self, num_bytes: int, what: str) -> bytes:
        position = self.file.tell()
        data = self.file.read(num_bytes)
        if len(data) != num_bytes:
            raise ConversionError(
                f"{self.path} is truncated: expected {num_bytes} bytes for {what} at offset {position}, "
                f"but the file has {self.size} bytes"
            )
        return data

    def skip(self, num_bytes: int, what: str) -> None:
        position = self.file.tell()
        if position + num_bytes > self.size:
            raise ConversionError(
                f"{self.path} is truncated: {what} needs {num_bytes} bytes at offset {position}, "
                f"but the file has {self.size} bytes"
            )
        self.file.seek(num_bytes, os.SEEK_CUR)

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        position = self.file.tell()
        length = self.uint("H", f"the length of {what}")
        raw = self.read(length, what)
        if length == 0 or raw[-1] != 0:
            raise ConversionError(
                f"{self.path}: invalid string for {what} at offset {position} "
                "(expected a uint16 length followed by a NUL-terminated string; is this a CTranslate2 model.bin?)"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConversionError(f"{self.path}: {what} at offset {position} is not valid UTF-8") from error


def read_ctranslate2_model_bin(path: str | os.PathLike) -> CT2ModelBin:
    """Parse the header of a CTranslate2 `model.bin`, validating every payload's size, without loading payloads.

    Args:
        path: the `model.bin` file.

    Returns:
        The binary version, spec name and revision, variables (with aliases resolved) and aliases.

    Raises:
        ConversionError: the file is missing, truncated, of an unknown binary version or otherwise malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist (expected a CTranslate2 model.bin)")
    size = path.stat().st_size
    with path.open("rb") as file:
        reader = _BinaryReader(file, path, size)
        binary_version = reader.uint("I", "the binary version")
        if not 1 <= binary_version <= _CT2_MAX_BINARY_VERSION:
            raise ConversionError(
                f"{path}: unsupported CTranslate2 binary version {binary_version} "
                f"(expected 1..{_CT2_MAX_BINARY_VERSION}; is this a CTranslate2 model.bin?)"
            )
        spec_name, spec_revision = "", 1
        if binary_version >= 2:
            spec_name = reader.string("the model spec name")
            spec_revision = reader.uint("I", "the spec revision")

        variables: dict[str, CT2Variable] = {}
        num_variables = reader.uint("I", "the number of variables")
        for index in range(num_variables):
            name = reader.string(f"the name of variable #{index}")
            rank = reader.uint("B", f"the rank of {name!r}")
            shape = tuple(reader.uint("I", f"dimension {axis} of {name!r}") for axis in range(rank))
            if binary_version >= 4:
                dtype_id = reader.uint("B", f"the dtype of {name!r}")
                if dtype_id >= len(_CT2_DTYPES):
                    raise ConversionError(
                        f"{path}: variable {name!r} has unknown dtype id {dtype_id} "
                        f"(expected 0..{len(_CT2_DTYPES) - 1})"
                    )
                dtype = _CT2_DTYPES[dtype_id]
                num_bytes = reader.uint("I", f"the byte size of {name!r}")
            else:
                item_size = reader.uint("B", f"the item size of {name!r}")
                if item_size not in _CT2_LEGACY_ITEM_SIZE_DTYPES:
                    raise ConversionError(
                        f"{path}: variable {name!r} has unknown item size {item_size} (expected 1, 2 or 4)"
                    )
                dtype = _CT2_LEGACY_ITEM_SIZE_DTYPES[item_size]
                num_bytes = reader.uint("I", f"the item count of {name!r}") * item_size
            num_items = 1
            for dim in shape:
                num_items *= dim
            expected_bytes = num_items * dtype.itemsize
            if num_bytes != expected_bytes:
                raise ConversionError(
                    f"{path}: variable {name!r} has {num_bytes} payload bytes, expected {expected_bytes} "
                    f"for shape {list(shape)} of {dtype}"
                )
            variables[name] = CT2Variable(name, shape, dtype, file.tell(), num_bytes)
            reader.skip(num_bytes, f"the payload of {name!r}")

        aliases: dict[str, str] = {}
        if binary_version >= 3:
            num_aliases = reader.uint("I", "the number of aliases")
            for index in range(num_aliases):
                alias = reader.string(f"the name of alias #{index}")
                target = reader.string(f"the target of alias {alias!r}")
                if target not in variables:
                    raise ConversionError(f"{path}: alias {alias!r} points at unknown variable {target!r}")
                aliases[alias] = target
                variables[alias] = variables[target]
    return CT2ModelBin(path, binary_version, spec_name, spec_revision, variables, aliases)


def _read_ct2_tensor(file: BinaryIO, variable: CT2Variable) -> torch.Tensor:
    """Read one payload as a tensor of its stored dtype and shape."""
    file.seek(variable.offset)
    payload = bytearray(file.read(variable.num_bytes))
    if not payload:
        return torch.zeros(variable.shape, dtype=variable.dtype)
    return torch.frombuffer(payload, dtype=variable.dtype).reshape(variable.shape)


def _dequantize(name: str, value: torch.Tensor, tensors: Mapping[str, torch.Tensor], source: Path) -> torch.Tensor:
    """float32 copy of `value`; integer weights are divided by their `<name>_scale` (CTranslate2 stores w * scale).

    int8 scales are per output row (shape [out]); the int16 scale is one scalar.
    """
    if value.is_floating_point():
        return value.to(torch.float32)
    scale = tensors.get(f"{name}_scale")
    if scale is None:
        raise ConversionError(
            f"{source}: integer variable {name!r} ({value.dtype}) has no {name}_scale to dequantize it"
        )
    if f"{name}_zero" in tensors:
        raise ConversionError(f"{source}: {name!r} uses zero-point (AWQ) quantization, which is not supported")
    scale = scale.to(torch.float32)
    if scale.dim() == 1:
        scale = scale.reshape(-1, *([1] * (value.dim() - 1)))  # [out, 1, ...] broadcasts over each row
    return value.to(torch.float32) / scale


def _read_vocabulary(model_dir: Path) -> list[str] | None:
    """Token strings of a CTranslate2 model directory (`vocabulary.json` or `vocabulary.txt`), or None if absent."""
    json_path, text_path = model_dir / "vocabulary.json", model_dir / "vocabulary.txt"
    if json_path.is_file():
        tokens = _read_json(json_path)
        if not isinstance(tokens, list):
            raise ConversionError(f"{json_path} must hold a JSON list of token strings")
        return tokens
    if text_path.is_file():
        return text_path.read_text(encoding="utf-8").splitlines()
    return None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} could not be read as JSON: {error}") from error


def _count_layers(names: list[str], pattern: re.Pattern[str]) -> int:
    """Number of layers = highest `N` captured by `pattern` + 1 (gaps then show up as missing keys)."""
    indices = [int(match.group(1)) for name in names if (match := pattern.match(name))]
    return max(indices) + 1 if indices else 0


def _map_ct2_encoder(tensors: Mapping[str, torch.Tensor], d_model: int, source: Path) -> dict[str, torch.Tensor]:
    """Rename (and dequantize, split) every `encoder/*` CTranslate2 variable into `WhisperEncoder` keys.

    Raises:
        ConversionError: an encoder variable is unknown, or the fused q|k|v linear is not [3 * d_model, ...].
    """
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not name.startswith("encoder/") or name == "encoder/num_heads":
            continue  # decoder scalars, and num_heads (already in the config)
        if name.endswith("_scale") and name.removesuffix("_scale") in tensors:
            continue  # quantization scale, used by _dequantize for its weight
        local = name.removeprefix("encoder/")
        if local in _CT2_TOP_LEVEL:
            state_dict[_CT2_TOP_LEVEL[local]] = _dequantize(name, tensor, tensors, source)
            continue
        match = _CT2_LAYER_NAME.fullmatch(local)
        if match is None:
            raise ConversionError(f"{source}: unknown encoder variable {name!r}")
        layer, inner = match.groups()
        prefix = f"layers.{layer}."
        if inner in _CT2_PER_LAYER:
            state_dict[prefix + _CT2_PER_LAYER[inner]] = _dequantize(name, tensor, tensors, source)
        elif inner in (f"{_CT2_FUSED_QKV}weight", f"{_CT2_FUSED_QKV}bias"):
            kind = inner.removeprefix(_CT2_FUSED_QKV)
            fused = _dequantize(name, tensor, tensors, source)
            if fused.shape[0] != 3 * d_model:
                raise ConversionError(
                    f"{source}: {name!r} has shape {list(fused.shape)}, "
                    f"expected first dimension 3 * d_model = {3 * d_model}"
                )
            query, key, value = fused.split(d_model)  # each [d_model, d_model] (weight) or [d_model] (bias)
            state_dict[f"{prefix}self_attn.q_proj.{kind}"] = query.contiguous()
            state_dict[f"{prefix}self_attn.v_proj.{kind}"] = value.contiguous()
            if kind == "weight":
                state_dict[f"{prefix}self_attn.k_proj.weight"] = key.contiguous()
            # The k bias is dropped: see load_ctranslate2_whisper_encoder.
        else:
            raise ConversionError(f"{source}: unknown encoder variable {name!r}")
    return state_dict


def load_ctranslate2_whisper_encoder(model_dir: str | os.PathLike) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Whisper encoder of a CTranslate2 Whisper model directory as a transformers `WhisperEncoder` state dict.

    The fused self-attention projection `linear_0` ([3 * d_model, d_model]) is split into q, k and v. Its k bias
    is dropped: transformers' k_proj has none, and a key bias adds `q . b_k` equally to every score of a query,
    which softmax cancels, so dropping it is exact (CTranslate2's converter writes zeros there anyway).
    float16/bfloat16 weights are upcast to float32; int8/int16 weights are dequantized with their scales.

    Args:
        model_dir: directory with `model.bin` (spec `WhisperSpec`) and optionally `config.json` and
            `vocabulary.txt`/`vocabulary.json`.

    Returns:
        `(config, state_dict)`: a `WhisperConfig` whose encoder dims come from the tensor shapes (decoder dims and
        vocabulary size from the decoder shapes, suppressed tokens from `config.json`), and float32 tensors keyed like
        `WhisperEncoder.state_dict()`.

    Raises:
        ConversionError: `model.bin` is missing or malformed, is not a Whisper model, has an encoder variable this
            mapping does not know, or lacks one a `WhisperEncoder` parameter needs.
    """
    model_dir = Path(model_dir)
    model_bin = read_ctranslate2_model_bin(model_dir / "model.bin")
    source = model_bin.path
    if model_bin.spec_name != "WhisperSpec":
        raise ConversionError(f"{source}: model spec is {model_bin.spec_name!r}, expected 'WhisperSpec'")
    if model_bin.spec_revision > _CT2_WHISPER_MAX_REVISION:
        raise ConversionError(
            f"{source}: WhisperSpec revision {model_bin.spec_revision} is newer than this converter knows "
            f"(<= {_CT2_WHISPER_MAX_REVISION})"
        )
    ct2_config: dict = {}
    if (model_dir / "config.json").is_file():
        loaded = _read_json(model_dir / "config.json")
        if not isinstance(loaded, dict):
            raise ConversionError(f"{model_dir / 'config.json'} must hold a JSON object")
        ct2_config = loaded

    variables = model_bin.variables
    with source.open("rb") as file:
        tensors = {
            name: _read_ct2_tensor(file, variable)
            for name, variable in variables.items()
            if name.startswith("encoder/") or (name.startswith("decoder/") and not variable.shape)
        }

    # Encoder dims from the shapes. conv1: [d_model, num_mel_bins, 3]; encodings: [max_source_positions, d_model].
    def require(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConversionError(f"{source}: missing variable {name!r} (expected a Whisper encoder)")
        return tensors[name]

    d_model, num_mel_bins = require("encoder/conv1/weight").shape[:2]
    max_source_positions = require("encoder/position_encodings/encodings").shape[0]
    encoder_ffn_dim = require("encoder/layer_0/ffn/linear_0/weight").shape[0]
    encoder_heads = _CT2_DEFAULT_NUM_HEADS
    if "encoder/num_heads" in tensors:
        encoder_heads = int(tensors["encoder/num_heads"].item())
    encoder_layers = _count_layers(list(tensors), re.compile(r"encoder/layer_(\d+)/"))

    # Decoder dims (config only). embeddings: [vocab_size, d_model]; linear_0 of the ffn: [decoder_ffn_dim, d_model].
    decoder_names = [name for name in variables if name.startswith("decoder/")]
    decoder_dims: dict[str, int] = {}
    if "decoder/embeddings/weight" in variables:
        decoder_dims["vocab_size"] = variables["decoder/embeddings/weight"].shape[0]
    if "decoder/position_encodings/encodings" in variables:
        decoder_dims["max_target_positions"] = variables["decoder/position_encodings/encodings"].shape[0]
    if "decoder/layer_0/ffn/linear_0/weight" in variables:
        decoder_dims["decoder_ffn_dim"] = variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]
    if "decoder/num_heads" in tensors:
        decoder_dims["decoder_attention_heads"] = int(tensors["decoder/num_heads"].item())
    if decoder_layers := _count_layers(decoder_names, re.compile(r"decoder/layer_(\d+)/")):
        decoder_dims["decoder_layers"] = decoder_layers

    vocab_size = decoder_dims.get("vocab_size", WhisperConfig().vocab_size)
    token_ids = _special_token_ids(vocab_size, _read_vocabulary(model_dir))
    config = _whisper_config(
        source,
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=encoder_layers,
        encoder_attention_heads=encoder_heads,
        encoder_ffn_dim=encoder_ffn_dim,
        max_source_positions=max_source_positions,
        **decoder_dims,
        **token_ids,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", WhisperConfig().begin_suppress_tokens),
    )

    state_dict = _map_ct2_encoder(tensors, d_model, source)
    _check_encoder_state_dict(config, state_dict, source, _ct2_source_name)
    return config, state_dict


# --------------------------------------------------------------------------------------------------------------------
# openai-whisper checkpoints


def load_openai_whisper_encoder(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    dims: Mapping[str, int] | None = None,
) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Whisper encoder of an openai-whisper checkpoint as a transformers `WhisperEncoder` state dict.

    Accepts the openai-whisper file format (`{"dims": {...}, "model_state_dict": {"encoder.*", "decoder.*"}}`), or a
    bare state dict (in memory or in a `.pt` file) whose encoder keys start with `encoder.` or `whisper_model.` (the
    form in Ola checkpoints once `model.speech_encoder.` is stripped). Keys outside that prefix are ignored.

    Args:
        checkpoint: path of a `.pt` file (loaded with `weights_only=True`), or a state dict.
        dims: openai-whisper `ModelDimensions` fields (`n_mels`, `n_audio_ctx`, `n_audio_state`, `n_audio_head`,
            `n_audio_layer`, `n_vocab`, `n_text_ctx`, `n_text_head`, `n_text_layer`); override the file's `dims`.
            Required for a bare state dict, which cannot tell `n_audio_head`; the other encoder fields are
            inferred from the shapes and, when given, checked against them.

    Returns:
        `(config, state_dict)` with float32 tensors keyed like `WhisperEncoder.state_dict()`.

    Raises:
        ConversionError: the file cannot be loaded, no encoder keys are found, `n_audio_head` is unknown, a dims
            field disagrees with the shapes, or an encoder key is unknown or missing.
    """
    if isinstance(checkpoint, Mapping):
        source, loaded = "the given state dict", checkpoint
    else:
        path = Path(checkpoint)
        source = str(path)
        if not path.is_file():
            raise ConversionError(f"{path} does not exist (expected an openai-whisper .pt checkpoint)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types (pickle, zip, unpickler) for a bad file
            raise ConversionError(f"{path} could not be loaded as a torch checkpoint: {error}") from error
        if not isinstance(loaded, Mapping):
            raise ConversionError(f"{path} holds a {type(loaded).__name__}, expected a dict")

    if "model_state_dict" in loaded:
        state = loaded["model_state_dict"]
        all_dims = {**loaded.get("dims", {}), **(dims or {})}
    else:
        state = loaded
        all_dims = dict(dims or {})
    prefix = next((p for p in _OPENAI_ENCODER_PREFIXES if any(key.startswith(p) for key in state)), None)
    if prefix is None:
        raise ConversionError(
            f"{source}: no Whisper encoder keys (expected keys starting with {' or '.join(_OPENAI_ENCODER_PREFIXES)})"
        )
    encoder = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}

    state_dict: dict[str, torch.Tensor] = {}
    for key, value in encoder.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{source}: {prefix}{key} is a {type(value).__name__}, expected a tensor")
        if key in _OPENAI_TOP_LEVEL:
            target = _OPENAI_TOP_LEVEL[key]
        elif (match := _OPENAI_BLOCK_NAME.fullmatch(key)) and match.group(2) in _OPENAI_PER_BLOCK:
            target = f"layers.{match.group(1)}.{_OPENAI_PER_BLOCK[match.group(2)]}"
        else:
            raise ConversionError(f"{source}: unknown encoder key {prefix + key!r}")
        state_dict[target] = value.detach().to(torch.float32)

    # Shapes: conv1 [n_audio_state, n_mels, 3]; positional_embedding [n_audio_ctx, n_audio_state]; mlp.0 [ffn, state].
    for key in ("conv1.weight", "positional_embedding", "blocks.0.mlp.0.weight"):
        if key not in encoder:
            raise ConversionError(f"{source}: missing encoder key {prefix}{key}")
    inferred = {
        "n_audio_state": encoder["conv1.weight"].shape[0],
        "n_mels": encoder["conv1.weight"].shape[1],
        "n_audio_ctx": encoder["positional_embedding"].shape[0],
        "n_audio_layer": _count_layers(list(encoder), _OPENAI_BLOCK_NAME),
    }
    for field, value in inferred.items():
        if field in all_dims and all_dims[field] != value:
            raise ConversionError(
                f"{source}: dims[{field!r}] is {all_dims[field]} but the encoder weights imply {value}"
            )
    if "n_audio_head" not in all_dims:
        raise ConversionError(
            f"{source}: dims['n_audio_head'] is required (the head count cannot be inferred from the weights); "
            "pass dims={'n_audio_head': ...}"
        )

    vocab_size = all_dims.get("n_vocab", WhisperConfig().vocab_size)
    token_ids = _special_token_ids(vocab_size, None)
    config = _whisper_config(
        source,
        num_mel_bins=inferred["n_mels"],
        d_model=inferred["n_audio_state"],
        encoder_layers=inferred["n_audio_layer"],
        encoder_attention_heads=all_dims["n_audio_head"],
        encoder_ffn_dim=encoder["blocks.0.mlp.0.weight"].shape[0],
        max_source_positions=inferred["n_audio_ctx"],
        vocab_size=vocab_size,
        # Whisper's decoder mirrors the encoder where the dims do not say otherwise.
        decoder_layers=all_dims.get("n_text_layer", inferred["n_audio_layer"]),
        decoder_attention_heads=all_dims.get("n_text_head", all_dims["n_audio_head"]),
        decoder_ffn_dim=encoder["blocks.0.mlp.0.weight"].shape[0],
        max_target_positions=all_dims.get("n_text_ctx", WhisperConfig().max_target_positions),
        **token_ids,
    )
    _check_encoder_state_dict(config, state_dict, source, lambda key: _openai_source_name(key, prefix))
    return config, state_dict


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers


def _special_token_ids(vocab_size: int, vocabulary: list[str] | None) -> dict[str, int | None]:
    """`<|endoftext|>` (eos/pad) and `<|startoftranscript|>` (bos/decoder start) ids.

    Taken from the vocabulary when given; otherwise from Whisper's tokenizer layout (`<|endoftext|>` is 50256 in the
    English-only vocabulary of 51864 tokens, 50257 in multilingual ones; `<|startoftranscript|>` follows it).
    A vocabulary too small to hold them (random stand-in models) has no special tokens: eos/pad/bos are None and
    `decoder_start_token_id`, which `WhisperConfig` requires to be an int, is 0.
    """
    end_of_text = start_of_transcript = None
    if vocabulary is not None and "<|endoftext|>" in vocabulary and "<|startoftranscript|>" in vocabulary:
        end_of_text = vocabulary.index("<|endoftext|>")
        start_of_transcript = vocabulary.index("<|startoftranscript|>")
    elif vocab_size >= _WHISPER_EN_VOCAB_SIZE:
        end_of_text = 50256 if vocab_size == _WHISPER_EN_VOCAB_SIZE else 50257
        start_of_transcript = end_of_text + 1
    if end_of_text is None:
        return {"eos_token_id": None, "pad_token_id": None, "bos_token_id": None, "decoder_start_token_id": 0}
    return {
        "eos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "bos_token_id": start_of_transcript,
        "decoder_start_token_id": start_of_transcript,
    }


def _whisper_config(source: str | Path, *, d_model: int, encoder_attention_heads: int, **fields) -> WhisperConfig:
    """A `WhisperConfig` (exact GELU, no dropout: Whisper's inference setup) after checking the head split."""
    if encoder_attention_heads <= 0 or d_model % encoder_attention_heads:
        raise ConversionError(
            f"{source}: d_model {d_model} is not divisible by the encoder head count {encoder_attention_heads}"
        )
    return WhisperConfig(
        d_model=d_model,
        encoder_attention_heads=encoder_attention_heads,
        activation_function="gelu",
        **fields,
    )


def _check_encoder_state_dict(
    config: WhisperConfig,
    state_dict: dict[str, torch.Tensor],
    source: str | Path,
    source_name: Callable[[str], str],
) -> None:
    """Raise `ConversionError` unless `state_dict` fills exactly `WhisperEncoder(config)`'s parameters and shapes.

    `source_name` maps a `WhisperEncoder` key to the checkpoint name it is read from, for the messages.
    """
    with torch.device("meta"):  # shapes only, no memory
        expected = WhisperEncoder(config).state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        described = ", ".join(f"{source_name(key)!r} (for WhisperEncoder {key})" for key in missing)
        raise ConversionError(f"{source}: missing {described}")
    if unexpected:
        raise ConversionError(f"{source}: converted key(s) {unexpected} are not WhisperEncoder parameters")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ConversionError(
                f"{source}: {source_name(key)!r} has shape {list(state_dict[key].shape)}, "
                f"WhisperEncoder {key} expects {list(tensor.shape)}"
            )


def _ct2_source_name(key: str) -> str:
    """The CTranslate2 variable a `WhisperEncoder` key is read from; q/k/v all come from the fused `linear_0`."""
    if key in _CT2_TOP_LEVEL_SOURCES:
        return f"encoder/{_CT2_TOP_LEVEL_SOURCES[key]}"
    layer, _, inner = key.removeprefix("layers.").partition(".")
    if inner in _CT2_PER_LAYER_SOURCES:
        return f"encoder/layer_{layer}/{_CT2_PER_LAYER_SOURCES[inner]}"
    return f"encoder/layer_{layer}/{_CT2_FUSED_QKV}{inner.rpartition('.')[2]}"


def _openai_source_name(key: str, prefix: str) -> str:
    """The openai-whisper key (under `prefix`) a `WhisperEncoder` key is read from."""
    if key in _OPENAI_TOP_LEVEL_SOURCES:
        return prefix + _OPENAI_TOP_LEVEL_SOURCES[key]
    layer, _, inner = key.removeprefix("layers.").partition(".")
    return f"{prefix}blocks.{layer}.{_OPENAI_PER_BLOCK_SOURCES.get(inner, inner)}"


_CT2_TOP_LEVEL_SOURCES = {target: name for name, target in _CT2_TOP_LEVEL.items()}
_CT2_PER_LAYER_SOURCES = {target: name for name, target in _CT2_PER_LAYER.items()}
_OPENAI_TOP_LEVEL_SOURCES = {target: name for name, target in _OPENAI_TOP_LEVEL.items()}
_OPENAI_PER_BLOCK_SOURCES = {target: name for name, target in _OPENAI_PER_BLOCK.items()}
