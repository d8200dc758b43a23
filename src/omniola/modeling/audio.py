"""Ola's audio encoder: Whisper for speech, optionally BEATs for other sounds, features concatenated on channels.

Whisper is transformers' `WhisperEncoder` (its weights load unchanged). Its stock `forward` insists on 30 s of
input; `OlaAudioEncoder` runs the same modules on chunks of any length up to 30 s, so a 3 s clip costs a tenth of
the work. Chunks of different lengths share a batch with a padding mask: the convolution outputs past a chunk's end
are zeroed (as if the chunk were alone) and attention ignores padded frames, so a chunk gives the same features
batched as alone.

Notation: N = chunks, M = mel bins, T = mel frames (T_max in a batch), S = audio samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .beats import BeatsConfig, BeatsEncoder, beats_output_length


def whisper_output_length(mel_frames: int) -> int:
    """Encoder frames produced from `mel_frames` log-mel frames (conv2 has stride 2, padding 1, kernel 3)."""
    return (mel_frames - 1) // 2 + 1


class OlaAudioEncoder(nn.Module):
    def __init__(self, audio_config: WhisperConfig, beats_config: BeatsConfig | None = None):
        super().__init__()
        self.whisper = WhisperEncoder(audio_config)
        self.beats = BeatsEncoder(beats_config) if beats_config is not None else None

    @property
    def hidden_size(self) -> int:
        width = self.whisper.config.d_model
        if self.beats is not None:
            width += self.beats.config.encoder_embed_dim
        return width

    def encode_whisper(self, input_features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Whisper encoder on `[N, M, T]` log-mel (T <= 3000) with a `[N, T]` mask. Returns `[N, ceil(T/2), C]`."""
        w = self.whisper
        if input_features.shape[-1] > w.config.max_source_positions * 2:
            raise ValueError(
                f"audio chunk of {input_features.shape[-1]} mel frames exceeds Whisper's "
                f"{w.config.max_source_positions * 2}; the processor splits audio into 30 s chunks"
            )
        x = input_features.to(w.conv1.weight.dtype)
        x = F.gelu(w.conv1(x))  # (N, C, T)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)  # what conv2 would see if each chunk were alone
        x = F.gelu(w.conv2(x))  # (N, C, ceil(T/2))
        x = x.transpose(1, 2)  # (N, T', C)
        x = x + w.embed_positions.weight[: x.shape[1]]
        x = F.dropout(x, p=w.dropout, training=self.training)

        attn_mask = None
        if mask is not None and not bool(mask.all()):
            frame_mask = mask[:, ::2].bool()  # (N, T')
            attn_mask = torch.zeros(frame_mask.shape, dtype=x.dtype, device=x.device)
            attn_mask = attn_mask.masked_fill(~frame_mask, torch.finfo(x.dtype).min)[:, None, None, :]  # (N,1,1,T')
        for layer in w.layers:
            x = self._whisper_layer(layer, x, attn_mask)
        return w.layer_norm(x)

    def _whisper_layer(self, layer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """A `WhisperEncoderLayer` computed in openai-whisper's operation order: the 1/sqrt(head_dim) scale is applied
        inside SDPA, not to the queries before it as transformers does. The features are then bit-identical to the
        original encoder's on the same hardware, which Ola compatibility needs: Ola rounds them to bfloat16, where a
        last-bit difference can flip a rounding (and move the logits by ~1e-3)."""
        attn, training = layer.self_attn, self.training
        n, t, _ = x.shape
        h = layer.self_attn_layer_norm(x)
        q, k, v = (
            proj(h).view(n, t, attn.num_heads, -1).permute(0, 2, 1, 3)  # (N, heads, T', head_dim)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=attn.dropout if training else 0.0)
        x = x + F.dropout(attn.out_proj(h.permute(0, 2, 1, 3).flatten(2)), p=layer.dropout, training=training)
        h = F.dropout(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))), p=layer.activation_dropout,
                      training=training)
        x = x + F.dropout(layer.fc2(h), p=layer.dropout, training=training)
        if x.dtype == torch.float16:  # as WhisperEncoderLayer
            clamp = torch.finfo(x.dtype).max - 1000
            x = x.clamp(min=-clamp, max=clamp)
        return x

    def forward(
        self,
        input_features: torch.Tensor,
        feature_attention_mask: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        audio_values_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Encodes audio chunks.

        Args:
            input_features: `[N, M, T]` Whisper log-mel features, zero-padded to the longest chunk.
            feature_attention_mask: `[N, T]`, 1 on real frames.
            audio_values: `[N, S]` raw 16 kHz waveforms of the same chunks, for BEATs.
            audio_values_mask: `[N, S]`, 1 on real samples.

        Returns:
            One `[frames, C]` tensor per chunk (C = Whisper width + BEATs width).
        """
        features = self.encode_whisper(input_features, feature_attention_mask)  # (N, T', Cw)
        if feature_attention_mask is None:
            lengths = [features.shape[1]] * features.shape[0]
        else:
            lengths = [whisper_output_length(int(n)) for n in feature_attention_mask.sum(-1).tolist()]

        if self.beats is not None:
            if audio_values is None:
                raise ValueError("this model has a BEATs encoder: pass audio_values (raw waveforms) too")
            padding = None if audio_values_mask is None else ~audio_values_mask.bool()
            beats, _ = self.beats(audio_values.to(features.dtype), padding)  # (N, Tb, Cb)
            # As in Ola: pad or cut BEATs' frames to Whisper's count, then concatenate channels.
            t = features.shape[1]
            beats = F.pad(beats, (0, 0, 0, max(0, t - beats.shape[1])))[:, :t]
            if audio_values_mask is not None:  # zero what a chunk alone would not have produced
                valid = [beats_output_length(int(n)) for n in audio_values_mask.sum(-1).tolist()]
                keep = torch.arange(t, device=beats.device)[None, :] < torch.tensor(valid, device=beats.device)[:, None]
                beats = beats * keep[..., None].to(beats.dtype)
            features = torch.cat([features, beats.to(features.dtype)], dim=-1)
        return [f[:n] for f, n in zip(features, lengths)]
