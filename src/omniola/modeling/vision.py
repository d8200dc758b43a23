"""A SigLIP-style vision transformer that reads images at their native resolution (Ola's OryxViT idea).

Images of different sizes go through in one call as *flattened patches* (the Qwen2-VL convention): the processor
cuts every view into `patch_size x patch_size` patches, row-major, each flattened channel-first, and sends
`pixel_values [total_patches, C * p * p]` with `grid_hw [num_views, 2]`. The learned position embedding grid is
interpolated to each view's patch grid. Views with the same grid are batched together, which gives the same result
as block-diagonal (varlen) attention over the concatenation, without building a mask.

Notation: N = total patches, V = views, D = hidden size, P = C * patch_size**2.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from ..configuration_ola import OlaVisionConfig


class OlaVisionEmbeddings(nn.Module):
    def __init__(self, config: OlaVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.position_grid**2, config.hidden_size)

    def position_grid(self, h: int, w: int) -> torch.Tensor:
        """The position embedding resampled to an `h x w` patch grid. Returns `[h * w, D]`."""
        g = self.config.position_grid
        table = self.position_embedding.weight
        if (h, w) == (g, g):
            return table
        grid = table.T.reshape(1, -1, g, g)  # (1, D, g, g)
        grid = F.interpolate(
            grid.float(), size=(h, w), mode=self.config.position_interpolation, align_corners=False
        ).to(table.dtype)
        return grid.reshape(-1, h * w).T  # (h*w, D)

    def forward(self, patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Embeds `patches [B, h*w, P]` of views on an `h x w` grid. Returns `[B, h*w, D]`."""
        weight = self.patch_embedding.weight.flatten(1)  # (D, P): a stride-p conv is a linear map per patch
        x = F.linear(patches.to(weight.dtype), weight, self.patch_embedding.bias)
        return x + self.position_grid(h, w)


class OlaVisionAttention(nn.Module):
    def __init__(self, config: OlaVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, n, hd)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class OlaVisionMLP(nn.Module):
    def __init__(self, config: OlaVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OlaVisionLayer(GradientCheckpointingLayer):
    def __init__(self, config: OlaVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = OlaVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = OlaVisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class OlaVisionEncoder(nn.Module):
    def __init__(self, config: OlaVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(OlaVisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class OlaVisionTower(nn.Module):
    """SigLIP-style ViT over native-resolution views given as flattened patches.

    Module names mirror transformers' `SiglipVisionTransformer` (`embeddings`, `encoder.layers`, `post_layernorm`).
    """

    def __init__(self, config: OlaVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = OlaVisionEmbeddings(config)
        self.encoder = OlaVisionEncoder(config)
        self.post_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.post_layernorm else None
        )

    def forward(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> list[torch.Tensor]:
        """Encodes views of any size.

        Args:
            pixel_values: `[N, C * p * p]` flattened patches of all views, view after view, row-major.
            grid_hw: `[V, 2]` patch grid (rows, columns) of each view.

        Returns:
            One `[h * w, D]` tensor per view, in input order.
        """
        grids = [tuple(g) for g in grid_hw.tolist()]
        sizes = [h * w for h, w in grids]
        if sum(sizes) != pixel_values.shape[0]:
            raise ValueError(
                f"grid_hw describes {sum(sizes)} patches but pixel_values has {pixel_values.shape[0]} rows"
            )
        views = pixel_values.split(sizes)
        by_grid: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, grid in enumerate(grids):
            by_grid[grid].append(i)

        outputs: list[torch.Tensor | None] = [None] * len(grids)
        for (h, w), indices in by_grid.items():
            x = torch.stack([views[i] for i in indices])  # (B, h*w, P)
            x = self.encoder(self.embeddings(x, h, w))  # (B, h*w, D)
            if self.post_layernorm is not None:
                x = self.post_layernorm(x)
            for i, features in zip(indices, x):
                outputs[i] = features
        return outputs
