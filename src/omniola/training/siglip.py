"""SigLIP pretraining of the vision tower: the `objective: siglip` of a recipe stage.

Ola starts from a pretrained SigLIP tower (OryxViT). A recipe that builds its tower from scratch (`scratch:<preset>`)
can pretrain it the same way first: SigLIP's pairwise sigmoid loss (Zhai et al., 2023) between the tower's pooled
picture embedding and an embedding of the record's answer text (the caption), with no LLM forward pass, so an epoch
costs a small fraction of an LLM stage's. Pairs whose captions are identical count as positives, which a small
world's short captions ("a red circle") often are.

- picture side: the tower's patch features (all views of the picture) -> attention pooling with one learned probe
  (SigLIP's MAP head) -> LayerNorm -> linear;
- text side: the LLM's frozen input embeddings of the answer tokens, averaged -> linear;
- loss: `-sum_ij log sigmoid(z_ij * (t * <x_i, y_j> + b)) / n` with `z_ij = +1` for same-caption pairs and `-1`
  otherwise; learned temperature `t` (initially 10) and bias `b` (initially -10), as in SigLIP.

The heads exist only while the stage trains: the stage checkpoint is the Ola model with its updated tower. With
several processes, each one contrasts the pictures of its own share of the batch.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class SiglipObjective(nn.Module):
    """Wraps an Ola model for a `siglip` stage: `forward(**batch, labels=...)` returns the SigLIP loss."""

    def __init__(self, model, embed_dim: int = 256):
        super().__init__()
        if model.model.vision_tower is None:
            raise InputError("the siglip objective needs a model with a vision tower")
        self.ola = model
        vision = model.config.vision_config
        self.probe = nn.Parameter(torch.randn(1, 1, vision.hidden_size) * vision.hidden_size**-0.5)
        self.pool = nn.MultiheadAttention(vision.hidden_size, vision.num_attention_heads, batch_first=True)
        self.image_norm = nn.LayerNorm(vision.hidden_size)
        self.image_proj = nn.Linear(vision.hidden_size, embed_dim)
        self.text_proj = nn.Linear(model.config.text_config.hidden_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("ola.")]

    def embed_images(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
        """`[images, embed_dim]`, L2-normalised."""
        views = self.ola.model.vision_tower(pixel_values, image_grid_hw)
        per_image = self.ola.model.views_per_image
        pictures = [torch.cat(views[i : i + per_image]) for i in range(0, len(views), per_image)]
        x = nn.utils.rnn.pad_sequence(pictures, batch_first=True)  # (B, patches, D)
        lengths = torch.tensor([len(p) for p in pictures], device=x.device)
        padding = torch.arange(x.shape[1], device=x.device)[None] >= lengths[:, None]
        pooled, _ = self.pool(self.probe.expand(len(x), -1, -1).to(x.dtype), x, x, key_padding_mask=padding,
                              need_weights=False)
        return F.normalize(self.image_proj(self.image_norm(pooled[:, 0])), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean of the answer tokens' input embeddings -> `[samples, embed_dim]`, L2-normalised."""
        answer = labels != -100
        tokens = self.ola.get_input_embeddings()(torch.where(answer, input_ids, 0))
        mean = (tokens * answer[..., None]).sum(1) / answer.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(mean.to(self.text_proj.weight.dtype)), dim=-1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_hw: torch.Tensor | None = None, **_) -> SimpleNamespace:
        if pixel_values is None:
            raise InputError("a siglip stage needs records with one picture each; this batch has none")
        images = self.embed_images(pixel_values, image_grid_hw)
        if len(images) != len(input_ids):
            raise InputError(f"a siglip stage needs records with exactly one picture each; this batch has "
                             f"{len(images)} pictures for {len(input_ids)} records")
        texts = self.embed_texts(input_ids, labels)
        logits = images @ texts.T * self.logit_scale.exp() + self.logit_bias
        answers = [tuple(ids[mask].tolist()) for ids, mask in zip(input_ids, labels != -100)]
        same = torch.tensor([[a == b for b in answers] for a in answers], device=logits.device)
        signs = same.to(logits.dtype) * 2 - 1
        loss = -F.logsigmoid(signs * logits).sum() / len(images)
        return SimpleNamespace(loss=loss, logits=logits)
