"""BEATs audio encoder (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", arXiv 2212.09058).

Ola encodes every audio chunk twice, with Whisper (speech) and with BEATs (sounds and music), and concatenates the
two feature sequences along channels. This module is the BEATs feature extractor only (no tokenizer or quantizer):

    waveform [B, S] --kaldi fbank--> [B, F, 128] --16x16 patches--> [B, L, E] --LayerNorm, Linear-->
    [B, L, D] --conv position embedding, post-norm transformer with gated relative position bias--> [B, L, D]

Parameter names match Microsoft's checkpoints (`{"cfg": ..., "model": state_dict}`, e.g.
`BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt`), so `load_beats_checkpoint` loads them with strict key checking,
and in eval mode `BeatsEncoder.forward` reproduces the original `BEATs.extract_features(wav, padding_mask,
feature_only=True)`.

Padding masks. The original turns a sample-level mask into a patch-level one by reshaping it
(`mask.view(B, num_patches, -1).all(-1)`), which is only roughly aligned with the patches (patches are ordered time
block by time block, eight frequency bands per block), marks some patches of the boundary block as valid although
their spectrogram frames reach into the padding, and yields NaN for a clip that is all padding. Here a clip's valid
patches are exactly the time blocks whose fbank frames lie wholly inside the clip, i.e. the patches the clip would
produce on its own (`beats_output_length`). Those positions are zeroed before the conv position embedding and masked
as attention keys, so a clip padded in a batch gets the features it gets alone, within float rounding. Without a mask
(which is how Ola calls BEATs) the output is identical to the original's.

Notation: B = batch, S = samples, F = fbank frames, M = mel bins (128), E = patch embedding dim, L = patches,
D = encoder width, H = attention heads, Dh = head dim.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig

from ..errors import ConfigError, ConversionError, InputError, MediaError

__all__ = [
    "BEATS_FBANK_MEAN",
    "BEATS_FBANK_STD",
    "BeatsConfig",
    "BeatsEncoder",
    "beats_fbank",
    "beats_output_length",
    "kaldi_fbank",
    "load_beats_checkpoint",
]

# ---------------------------------------------------------------------------------------------------------------------
# Kaldi log-mel filter bank
# ---------------------------------------------------------------------------------------------------------------------

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 128
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
FFT_SIZE = 512  # FRAME_LENGTH rounded up to a power of two
BEATS_FBANK_MEAN = 15.41663  # dataset statistics BEATs normalises its fbank with
BEATS_FBANK_STD = 6.55582


def _num_frames(num_samples: int) -> int:
    """Kaldi frames with `snip_edges=True`: only frames that fit wholly inside the signal."""
    if num_samples < FRAME_LENGTH:
        return 0
    return 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale, 1127 ln(1 + f / 700)."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=8)
def _kaldi_mel_banks(num_bins: int, fft_size: int, sample_rate: int, low_freq: float) -> torch.Tensor:
    """Kaldi's triangular mel filters (no VTLN warping, `high_freq` = Nyquist).

    The triangles are linear in mel and evaluated at the frequency of each FFT bin; the Nyquist bin gets no weight,
    as in Kaldi. Computed in float32 with torchaudio's order of operations: the filters are then bit-identical to
    torchaudio's, which keeps the log-mel features identical too (a float64 computation moves filter weights by up to
    1e-5 and log-mel values by up to 1e-4).

    Args:
        num_bins: Number of mel filters.
        fft_size: FFT length (even).
        sample_rate: Sampling rate in Hz.
        low_freq: Lower edge of the first filter in Hz.

    Returns:
        Filter weights, float32 `[num_bins, fft_size // 2 + 1]`.
    """
    mel_low, mel_high = _mel(low_freq), _mel(sample_rate / 2)
    step = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)  # [num_bins, 1]
    left = mel_low + index * step  # filter edges and centres in mel, each [num_bins, 1]
    centre = mel_low + (index + 1.0) * step
    right = mel_low + (index + 2.0) * step
    bin_mel = _mel(sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float32)).unsqueeze(0)  # [1, fft/2]
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    banks = torch.minimum(up, down).clamp(min=0.0)  # [num_bins, fft/2]
    return F.pad(banks, (0, 1))  # [num_bins, fft/2 + 1]: zero weight on the Nyquist bin


def kaldi_fbank(waveforms: torch.Tensor, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Kaldi-compatible log-mel filter bank, batched.

    Equal (to float rounding) to `torchaudio.compliance.kaldi.fbank(waveform, num_mel_bins=num_mel_bins,
    sample_frequency=16000, frame_length=25, frame_shift=10)` applied to each row, i.e. with torchaudio's defaults:
    no dither, per-frame DC removal, pre-emphasis 0.97, Povey window, FFT size rounded up to a power of two (512),
    `snip_edges=True` (only frames that fit wholly), power spectrum, 20 Hz to Nyquist, no energy column, and
    `log(max(x, float32 eps))`.

    Args:
        waveforms: `[B, S]` mono 16 kHz audio in the scale Kaldi expects (BEATs multiplies [-1, 1] audio by 2**15).

    Returns:
        float32 `[B, F, num_mel_bins]` with F = 1 + (S - 400) // 160.

    Raises:
        MediaError: the clips are shorter than one 25 ms frame.
    """
    if waveforms.shape[-1] < FRAME_LENGTH:
        raise MediaError(
            f"audio too short for a filter bank: {waveforms.shape[-1]} samples, need at least {FRAME_LENGTH} "
            f"(25 ms at {SAMPLE_RATE} Hz)"
        )
    frames = waveforms.float().unfold(-1, FRAME_LENGTH, FRAME_SHIFT)  # [B, F, 400]
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove DC offset
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[t-1], with x[-1] = x[0]
    frames = frames - 0.97 * previous  # pre-emphasis
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=frames.dtype, device=frames.device).pow(0.85)
    spectrum = torch.fft.rfft(frames * window, n=FFT_SIZE).abs().pow(2.0)  # [B, F, 257], zero-padded to 512
    banks = _kaldi_mel_banks(num_mel_bins, FFT_SIZE, SAMPLE_RATE, 20.0).to(frames.device)  # [M, 257]
    mel_energies = spectrum @ banks.T  # [B, F, M]
    return mel_energies.clamp(min=torch.finfo(torch.float32).eps).log()


def beats_fbank(waveforms: torch.Tensor) -> torch.Tensor:
    """BEATs' input features: the Kaldi fbank of 16-bit-scaled audio, normalised with BEATs' statistics.

    Args:
        waveforms: `[B, S]` mono 16 kHz audio in [-1, 1].

    Returns:
        float32 `[B, F, 128]`, `(fbank - 15.41663) / (2 * 6.55582)`.
    """
    fbank = kaldi_fbank(waveforms.float() * 2**15)
    return (fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)


def beats_output_length(num_samples: int, patch_size: int = 16) -> int:
    """Number of feature vectors BEATs produces for a clip of `num_samples` 16 kHz samples.

    Every `patch_size` whole fbank frames form one time block of `128 // patch_size` patches; trailing frames that do
    not fill a block are dropped. A 30 s chunk (480000 samples, 2998 frames) gives 187 * 8 = 1496.

    Args:
        num_samples: Clip length in samples.
        patch_size: The checkpoint's `input_patch_size` (16 for every released BEATs model).
    """
    return (_num_frames(num_samples) // patch_size) * (NUM_MEL_BINS // patch_size)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------

_ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_accurate", "tanh", "linear", "glu")


@strict
class BeatsConfig(PreTrainedConfig):
    """BEATs hyper-parameters; the fields and defaults of the original `BEATsConfig`, so `BeatsConfig(**ckpt["cfg"])`
    builds the model of any released checkpoint (unknown extra keys are kept as attributes).

    The one deliberate difference: the original defaults `input_patch_size` to -1 ("unset"); here it defaults to 16,
    the value of every released checkpoint, so that `BeatsConfig()` describes a model that can be built.

    Args:
        input_patch_size: Side of the square fbank patches (frames x mel bins).
        embed_dim: Patch embedding width.
        conv_bias: Whether the patch embedding conv has a bias.
        encoder_layers: Number of transformer layers.
        encoder_embed_dim: Transformer width.
        encoder_ffn_embed_dim: Feed-forward width.
        encoder_attention_heads: Attention heads.
        activation_fn: Feed-forward activation: relu, gelu, gelu_fast / gelu_accurate (tanh approximation), tanh,
            linear or glu (swish-gated linear unit).
        layer_wise_gradient_decay_ratio: Gradients are multiplied by this factor at the input of every layer (an
            identity in the forward pass).
        layer_norm_first: Pre-norm layers (and a final LayerNorm) instead of post-norm.
        deep_norm: DeepNet post-norm: residuals are scaled by (2 * encoder_layers) ** 0.25.
        dropout: Dropout on residual branches and after the position embedding.
        attention_dropout: Dropout on attention probabilities.
        activation_dropout: Dropout after the feed-forward activation.
        encoder_layerdrop: Probability of skipping a whole layer during training.
        dropout_input: Dropout on the projected patch embeddings.
        conv_pos: Kernel size of the convolutional position embedding.
        conv_pos_groups: Groups of that convolution.
        relative_position_embedding: Add a T5-style bucketed relative position bias to the attention logits.
        num_buckets: Relative position buckets (half per direction).
        max_distance: Distance at which the logarithmic buckets saturate.
        gru_rel_pos: Gate the relative position bias per query (WavLM's gated relative position bias).
        finetuned_model: The checkpoint carries the AudioSet classification head (`predictor`).
        predictor_dropout: Dropout before the classification head.
        predictor_class: Number of classes of that head (527 for AudioSet).
        reference_attention: Compute attention in the original code's operation order (queries scaled by
            1 / (32 sqrt(Dh)), logits shifted by their max and multiplied by 32, explicit softmax) instead of
            `scaled_dot_product_attention`: bit-identical features to the original on the same hardware (Ola rounds
            them to bfloat16, where a last-bit difference can flip a rounding), at the cost of materialising the
            `[B, H, L, L]` logits. `omniola convert ola` turns it on.
    """

    model_type = "ola_beats"
    base_config_key = "beats_config"

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False

    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"

    layer_wise_gradient_decay_ratio: float | int = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False

    dropout: float | int = 0.1
    attention_dropout: float | int = 0.1
    activation_dropout: float | int = 0.0
    encoder_layerdrop: float | int = 0.0
    dropout_input: float | int = 0.0

    conv_pos: int = 128
    conv_pos_groups: int = 16

    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False

    finetuned_model: bool = False
    predictor_dropout: float | int = 0.1
    predictor_class: int = 527
    reference_attention: bool = False

    def validate_architecture(self):
        super().validate_architecture()
        if not 1 <= self.input_patch_size <= NUM_MEL_BINS or NUM_MEL_BINS % self.input_patch_size:
            raise ConfigError(
                f"beats_config.input_patch_size ({self.input_patch_size}) must divide the {NUM_MEL_BINS} mel bins"
            )
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ConfigError(
                f"beats_config.encoder_embed_dim ({self.encoder_embed_dim}) must be divisible by "
                f"beats_config.encoder_attention_heads ({self.encoder_attention_heads})"
            )
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ConfigError(
                f"beats_config.encoder_embed_dim ({self.encoder_embed_dim}) must be divisible by "
                f"beats_config.conv_pos_groups ({self.conv_pos_groups})"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ConfigError("beats_config.deep_norm and beats_config.layer_norm_first cannot both be true")
        if self.activation_fn not in _ACTIVATIONS:
            raise ConfigError(f"beats_config.activation_fn {self.activation_fn!r} is not one of {_ACTIVATIONS}")
        if self.relative_position_embedding and (self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4):
            raise ConfigError(
                f"beats_config.num_buckets ({self.num_buckets}) must be >= 4 and max_distance "
                f"({self.max_distance}) larger than num_buckets // 4"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` backward (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float()).type_as(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_ACTIVATION_FNS = {
    "relu": F.relu,
    "gelu": _gelu,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "tanh": torch.tanh,
    "linear": _identity,
    "glu": _identity,  # the gate lives in `_SwishGluLinear`
}


class _SwishGluLinear(nn.Module):
    """`fc1` of `activation_fn="glu"` layers: `a * swish(b)` with `[a, b] = linear(x)`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * F.silu(gate)


class _WeightNormConv1d(nn.Module):
    """A grouped `Conv1d` whose weight is `weight_g * weight_v / ||weight_v||`, norms taken per kernel tap.

    This is `torch.nn.utils.weight_norm(conv, dim=2)` written out, so the state dict keeps the original names
    `weight_g [1, 1, K]` and `weight_v [C, C / groups, K]`.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.groups = groups
        self.padding = kernel_size // 2
        weight = torch.randn(channels, channels // groups, kernel_size) * math.sqrt(4.0 / (kernel_size * channels))
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(weight.norm(dim=(0, 1), keepdim=True))  # weight == weight_v at init
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)  # what nn.utils.weight_norm computes, bit for bit
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class _TrimLast(nn.Module):
    """Drops the extra last step an even-kernel "same" convolution produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] - self.remove]


def _relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5 bidirectional buckets: half the buckets per direction, exact up to a quarter, logarithmic beyond.

    Args:
        relative: int64 key position minus query position, any shape.

    Returns:
        int64 bucket ids in [0, num_buckets), same shape.
    """
    half = num_buckets // 2
    max_exact = half // 2
    distance = relative.abs()
    # Same float32 operation order as the original, so bucket boundaries agree exactly.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    near_or_far = torch.where(distance < max_exact, distance, far)
    return (relative > 0).long() * half + near_or_far


class BeatsAttention(nn.Module):
    """Multi-head self-attention with an optional gated relative position bias.

    The logits are `q k^T / sqrt(Dh) + g(q) * bias`, where `bias [H, L, L]` comes from bucketed relative positions
    (shared by all layers) and, with `gru_rel_pos`, `g(q) = a * (b * grep_a - 1) + 2` with `a, b = sigmoid(...)`
    computed from each query. (The original also rescales the logits by 32 around a max subtraction, an fp16
    overflow guard that cancels in the softmax; `scaled_dot_product_attention` computes the same softmax, and
    `config.reference_attention` the original's operation order.)
    """

    def __init__(self, config: BeatsConfig, has_relative_attention_bias: bool):
        super().__init__()
        dim = config.encoder_embed_dim
        self.num_heads = config.encoder_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = config.attention_dropout
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        self.gru_rel_pos = config.gru_rel_pos
        self.reference_attention = config.reference_attention
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, self.num_heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def position_bias(self, length: int) -> torch.Tensor:
        """Relative position bias `[H, L, L]` (query, key) for a sequence of `length`."""
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)
        relative = positions[None, :] - positions[:, None]  # [L, L], key - query
        buckets = _relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # [H, L, L]

    def forward(
        self,
        x: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attends over `x`.

        Args:
            x: `[B, L, D]`.
            position_bias: `[H, L, L]` or `None`.
            key_padding_mask: bool `[B, L]`, True for keys nobody may attend to, or `None`.

        Returns:
            `[B, L, D]`.
        """
        if self.reference_attention:
            return self._reference_forward(x, position_bias, key_padding_mask)
        b, n, d = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        bias = None
        if position_bias is not None:
            bias = position_bias.unsqueeze(0).to(q.dtype)  # [1, H, L, L]
            if self.gru_rel_pos:
                gates = self.grep_linear(q).view(b, self.num_heads, n, 2, 4).sum(-1).sigmoid()  # [B, H, L, 2]
                gate_a, gate_b = gates.chunk(2, dim=-1)  # each [B, H, L, 1]
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias  # [B, H, L, L]
        if key_padding_mask is not None:
            blocked = torch.zeros(b, 1, 1, n, dtype=q.dtype, device=q.device)
            blocked = blocked.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))  # [B, 1, 1, L]
            bias = blocked if bias is None else bias + blocked
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, L, Dh]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def _reference_forward(
        self, x: torch.Tensor, position_bias: torch.Tensor | None, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`forward` in the original's operation order (`config.reference_attention`); same arguments."""
        b, n, d = x.shape
        alpha, scaling = 32, self.head_dim**-0.5
        q = self.q_proj(x) * scaling * (1 / alpha)
        q, k, v = (
            t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]
            for t in (q, self.k_proj(x), self.v_proj(x))
        )
        logits = q @ k.transpose(-1, -2)  # [B, H, L, L]
        logits = (logits - logits.amax(dim=-1, keepdim=True)) * alpha
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if position_bias is not None:
            bias = position_bias.unsqueeze(0).to(q.dtype)  # [1, H, L, L]
            if self.gru_rel_pos:  # gates from the queries as the original recovers them from the scaled ones
                gates = self.grep_linear(q * alpha / scaling).view(b, self.num_heads, n, 2, 4).sum(-1).sigmoid()
                gate_a, gate_b = gates.chunk(2, dim=-1)  # each [B, H, L, 1]
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias  # [B, H, L, L]
            logits = logits + bias
        probs = F.dropout(logits.softmax(dim=-1), p=self.dropout, training=self.training)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(b, n, d))


class BeatsLayer(nn.Module):
    """Transformer layer: post-norm (optionally DeepNet-scaled residuals) or pre-norm."""

    def __init__(self, config: BeatsConfig, has_relative_attention_bias: bool):
        super().__init__()
        dim, ffn_dim = config.encoder_embed_dim, config.encoder_ffn_embed_dim
        self.layer_norm_first = config.layer_norm_first
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0
        self.self_attn = BeatsAttention(config, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.activation_dropout)
        self.dropout3 = nn.Dropout(config.dropout)
        self.fc1 = _SwishGluLinear(dim, ffn_dim) if config.activation_fn == "glu" else nn.Linear(dim, ffn_dim)
        self.activation = _ACTIVATION_FNS[config.activation_fn]
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.fc2(self.dropout2(self.activation(self.fc1(x)))))

    def forward(
        self,
        x: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x [B, L, D]` -> `[B, L, D]`; see `BeatsAttention.forward` for the other arguments."""
        if self.layer_norm_first:
            x = x + self.dropout1(self.self_attn(self.self_attn_layer_norm(x), position_bias, key_padding_mask))
            return x + self._feed_forward(self.final_layer_norm(x))
        attended = self.dropout1(self.self_attn(x, position_bias, key_padding_mask))
        x = self.self_attn_layer_norm(x * self.residual_scale + attended)
        return self.final_layer_norm(x * self.residual_scale + self._feed_forward(x))


class BeatsTransformer(nn.Module):
    """Convolutional position embedding followed by the transformer layers (the original `TransformerEncoder`)."""

    def __init__(self, config: BeatsConfig):
        super().__init__()
        dim = config.encoder_embed_dim
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        self.layer_norm_first = config.layer_norm_first
        self.gradient_decay = config.layer_wise_gradient_decay_ratio
        self.relative_position_embedding = config.relative_position_embedding
        self.pos_conv = nn.Sequential(
            _WeightNormConv1d(dim, config.conv_pos, config.conv_pos_groups), _TrimLast(config.conv_pos), nn.GELU()
        )
        self.layers = nn.ModuleList(
            BeatsLayer(config, has_relative_attention_bias=config.relative_position_embedding)
            for _ in range(config.encoder_layers)
        )
        if self.relative_position_embedding:
            # One bias table for all layers; every layer lists it in the state dict, as in the original.
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encodes `x [B, L, D]`; `padding_mask` is bool `[B, L]`, True at padding. Returns `[B, L, D]`."""
        key_padding_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            # A row that is all padding attends to everything instead of nothing (which would give NaN).
            key_padding_mask = padding_mask & ~padding_mask.all(dim=-1, keepdim=True)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # conv over [B, D, L]
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)

        position_bias = None
        if self.relative_position_embedding:
            position_bias = self.layers[0].self_attn.position_bias(x.shape[1])  # [H, L, L]
        for layer in self.layers:
            if self.gradient_decay != 1.0 and torch.is_grad_enabled():
                x = _GradScale.apply(x, self.gradient_decay)
            if self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop:
                continue
            x = layer(x, position_bias, key_padding_mask)

        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BeatsEncoder(nn.Module):
    """The BEATs feature extractor: waveform in, one `D`-wide vector per fbank patch out.

    Module and parameter names follow Microsoft's `BEATs` class, so its checkpoints load with `strict=True`.
    `predictor` (the AudioSet head of fine-tuned checkpoints) is kept only for that; features never use it.
    """

    def __init__(self, config: BeatsConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.input_patch_size
        self.post_extract_proj = (
            nn.Linear(config.embed_dim, config.encoder_embed_dim)
            if config.embed_dim != config.encoder_embed_dim
            else None
        )
        self.patch_embedding = nn.Conv2d(
            1, config.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=config.conv_bias
        )
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = BeatsTransformer(config)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        if config.finetuned_model:
            self.predictor_dropout = nn.Dropout(config.predictor_dropout)
            self.predictor = nn.Linear(config.encoder_embed_dim, config.predictor_class)
        else:
            self.predictor = None

    def output_length(self, num_samples: int) -> int:
        """Feature vectors produced for a clip of `num_samples` samples (see `beats_output_length`)."""
        return beats_output_length(num_samples, self.patch_size)

    def _patch_padding_mask(self, padding_mask: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Sample-level padding mask `[B, S]` -> patch-level `[B, L]`: a patch is valid iff the clip alone has it."""
        if not torch.equal(padding_mask, padding_mask.cummax(dim=-1).values):
            raise InputError("BEATs padding_mask must mark padding at the end of each clip (False..., True...)")
        num_valid = (~padding_mask).sum(dim=-1)  # [B] samples
        frames = torch.where(
            num_valid >= FRAME_LENGTH, 1 + (num_valid - FRAME_LENGTH).clamp(min=0) // FRAME_SHIFT, 0
        )  # [B] fbank frames that fit wholly inside the clip
        valid_patches = (frames // self.patch_size) * (NUM_MEL_BINS // self.patch_size)  # [B]
        positions = torch.arange(num_patches, device=padding_mask.device)
        return positions[None, :] >= valid_patches[:, None]  # [B, L]

    def forward(
        self, waveforms: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encodes a batch of 16 kHz mono clips.

        Args:
            waveforms: `[B, S]` audio in [-1, 1]; clips shorter than the batch are right-padded (with anything,
                usually zeros).
            padding_mask: bool `[B, S]`, True at padding samples (at the end of each row), or `None` when every
                row is a whole clip.

        Returns:
            `features [B, L, D]` with `L = beats_output_length(S)`, in the dtype of the parameters, and the
            patch-level `padding_mask [B, L]` (True where the position is padding: its features are computed but
            must be ignored), or `None` if no mask was given.

        Raises:
            MediaError: the batch is too short for a single patch (0.175 s with 16-frame patches).
            InputError: `padding_mask` does not match `waveforms` or has padding before valid samples.
        """
        if waveforms.dim() != 2:
            raise InputError(f"BEATs expects waveforms [batch, samples], got shape {tuple(waveforms.shape)}")
        if self.output_length(waveforms.shape[-1]) == 0:
            min_samples = FRAME_LENGTH + (self.patch_size - 1) * FRAME_SHIFT
            raise MediaError(
                f"audio too short for BEATs: {waveforms.shape[-1]} samples, need at least {min_samples} "
                f"({min_samples / SAMPLE_RATE:.3f} s at {SAMPLE_RATE} Hz)"
            )
        if padding_mask is not None and padding_mask.shape != waveforms.shape:
            raise InputError(
                f"BEATs padding_mask has shape {tuple(padding_mask.shape)}, waveforms {tuple(waveforms.shape)}"
            )

        fbank = beats_fbank(waveforms).to(self.patch_embedding.weight.dtype)  # [B, F, M]
        patches = self.patch_embedding(fbank.unsqueeze(1))  # [B, E, F // p, M // p]
        x = patches.flatten(2).transpose(1, 2)  # [B, L, E], time block major, mel band minor
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # [B, L, D]
        x = self.dropout_input(x)

        if padding_mask is not None:
            padding_mask = self._patch_padding_mask(padding_mask.bool(), x.shape[1])  # [B, L]
        return self.encoder(x, padding_mask), padding_mask


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def load_beats_checkpoint(path: str | os.PathLike) -> BeatsEncoder:
    """Loads an official BEATs checkpoint (`{"cfg": dict, "model": state_dict}`) into a `BeatsEncoder`.

    The file is read with `torch.load(..., weights_only=True)`, so no code from it runs. The model is returned on the
    CPU, in the checkpoint's dtype, in eval mode.

    Args:
        path: The `.pt` file, e.g. `BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt`.

    Raises:
        ConversionError: the file is missing or unreadable, is not a BEATs checkpoint, has an invalid cfg, or its
            weights do not match the model the cfg describes (missing, unexpected or mis-shaped keys).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"BEATs checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConversionError(f"{path} could not be read as a torch checkpoint: {err}") from err
    if (
        not isinstance(checkpoint, Mapping)
        or not isinstance(checkpoint.get("cfg"), Mapping)
        or not isinstance(checkpoint.get("model"), Mapping)
    ):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ConversionError(f"{path} is not a BEATs checkpoint: expected a dict with 'cfg' and 'model', got {found}")
    try:
        config = BeatsConfig(**checkpoint["cfg"])
    except Exception as err:
        raise ConversionError(f"{path} has an invalid BEATs cfg: {err}") from err

    model = BeatsEncoder(config)
    state_dict = checkpoint["model"]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ConversionError(
            f"{path} does not match the BEATs model its cfg describes: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ConversionError(f"{path} has weights of the wrong shape for its cfg: {err}") from err
    dtype = next(iter(state_dict.values())).dtype if state_dict else torch.float32
    return model.to(dtype).eval()
