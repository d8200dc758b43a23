"""Word grounding of the visual tokens: the `objective: ground` of a recipe stage.

The vision counterpart of the speech connector's CTC stage (`ctc.py`). Each content token of a picture (one per
2x2 patch block with Ola's connector) is pulled onto the LLM's own input embedding of the words of what it shows,
by squared distance, so that the visual tokens sit where the LLM's words sit, in direction and in size. The LLM
can then find "the red shape" among visual tokens the way it finds a word earlier in its context.

Why (docs/training.md, "Vision over space and time"): on the video ladder's `place` rung, Ola's trained tokens
gave 48-53 %; the exact word embeddings delivered through the same visual path gave 100 %; tokens grounded this
way and then kept fixed while the LoRA learnt gave 98 %. Grounded tokens that went on training with the LLM fell
back to 52 %, so the stages after this one should keep the vision tower and connector fixed.

- records are grounding records: a picture, and as the answer its objects' words and boxes
  (`omniola.data.boxes`, e.g. `red circle (120,80),(410,390)`); the answer is read back from the batch's tokens;
- a token's target: the object whose box covers the largest share of the token's block, if it covers at least
  `min_cover` of it, else the `background` word. An object's target is the mean of its words' embeddings (a word
  of several tokens: the mean of its tokens), so "red circle" is near both " red" and " circle";
- loss: `|h - t|^2 / mean_v |E_v|^2`, averaged over tokens (0: every token exactly on its words);
- also returned: `hit`, the share of tokens nearer to their own target than to any other target in the batch;
- a record whose answer is not box lines is left out of the loss, counted (`skipped`) and warned about.

Only the vision tower and connector train (the recipe checks it); nothing is added to the model.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from torch import nn

from ..data.boxes import parse_boxes
from ..data.ola_format import RecordError
from ..errors import InputError

logger = logging.getLogger(__name__)


class GroundingObjective(nn.Module):
    """Wraps an Ola model for a `ground` stage: `forward(**batch, labels=...)` returns the grounding loss.

    Args:
        model: The `OlaForConditionalGeneration` whose vision tower and connector train.
        tokenizer: Its tokenizer: decodes the answers and tokenizes the box words.
        background: The word a token showing no object is pulled onto.
        min_cover: The share of a token's block an object's box must cover to name that token.
    """

    def __init__(self, model, tokenizer, background: str = "background", min_cover: float = 0.125):
        super().__init__()
        if model.model.vision_tower is None:
            raise InputError("the ground objective needs a model with a vision tower")
        self.ola, self.tokenizer = model, tokenizer
        self.background, self.min_cover = background, min_cover
        table = model.get_input_embeddings().weight.detach().float()
        self.embedding_size2 = float(table.pow(2).sum(-1).mean())
        self._phrases: dict[str, torch.Tensor] = {}
        self.skipped = 0  # records whose answer is not box lines, so far (left out of the loss, warned about)

    def phrase(self, words: str) -> torch.Tensor:
        """The target of an object named `words`: the mean of its words' input embeddings."""
        if words not in self._phrases:
            table = self.ola.get_input_embeddings().weight.detach().float()
            vectors = []
            for word in words.split():
                ids = self.tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
                vectors.append(table[ids].mean(0))
            self._phrases[words] = torch.stack(vectors).mean(0)
        return self._phrases[words]

    def targets(self, objects: list[tuple[str, tuple[float, float, float, float]]], rows: int, cols: int):
        """The phrases the tokens of a `rows x cols` grid are pulled onto (`background` first) and `[rows, cols]`
        indices into them: per block, the object whose box covers most of it, if at least `min_cover`."""
        names = [self.background, *dict.fromkeys(words for words, _ in objects)]
        index = torch.zeros(rows, cols, dtype=torch.long)
        best = torch.zeros(rows, cols)
        y = torch.arange(rows + 1) / rows
        x = torch.arange(cols + 1) / cols
        for words, (x0, y0, x1, y1) in objects:
            cover_y = (torch.minimum(y[1:], torch.tensor(y1)) - torch.maximum(y[:-1], torch.tensor(y0))).clamp(min=0)
            cover_x = (torch.minimum(x[1:], torch.tensor(x1)) - torch.maximum(x[:-1], torch.tensor(x0))).clamp(min=0)
            cover = cover_y[:, None] * rows * cover_x[None] * cols  # share of each block
            better = (cover >= self.min_cover) & (cover > best)
            index[better], best[better] = names.index(words), cover[better]
        return names, index

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_hw: torch.Tensor | None = None, image_tower_states: torch.Tensor | None = None,
                **_) -> SimpleNamespace:
        if pixel_values is None and image_tower_states is None:
            raise InputError("a ground stage needs grounding records (one picture each, boxes as the answer); "
                             "this batch has no picture")
        model = self.ola.model
        grids = [tuple(g) for g in image_grid_hw.tolist()]
        if image_tower_states is None:
            features = model.vision_tower(pixel_values, image_grid_hw)
        else:  # a frozen tower's outputs from the feature cache
            features = list(image_tower_states.split([h * w for h, w in grids]))
        views = model.vision_connector.spatial_tokens(features, grids)
        per_image = model.views_per_image
        if len(views) != per_image * len(input_ids):
            raise InputError(f"a ground stage needs records with exactly one picture each; this batch has "
                             f"{len(views) // per_image} pictures for {len(input_ids)} records")
        states, targets, owners, phrase_ids = [], [], [], {}
        for b, (ids, mask) in enumerate(zip(input_ids, labels != -100)):
            answer = self.tokenizer.decode(ids[mask], skip_special_tokens=True)
            try:
                objects = parse_boxes(answer)
            except RecordError as err:
                self.skipped += 1
                logger.warning("ground stage: a record left out of the loss (%d so far): %s", self.skipped, err)
                continue
            for view in views[b * per_image:(b + 1) * per_image]:
                rows, cols, _ = view.shape
                names, index = self.targets(objects, rows, cols)
                table = torch.stack([self.phrase(n) for n in names])
                states.append(view.reshape(rows * cols, -1))
                targets.append(table[index.flatten()])
                owners += [phrase_ids.setdefault(names[i], len(phrase_ids)) for i in index.flatten().tolist()]
        if not states:  # nothing to ground: a zero loss that still reaches the vision side
            return SimpleNamespace(loss=sum(v.sum() for v in views) * 0.0, hit=torch.tensor(0.0))
        h = torch.cat(states).float()
        t = torch.cat(targets).to(h.device)
        loss = (h - t).pow(2).sum(-1).mean() / self.embedding_size2
        with torch.no_grad():  # nearest target among the batch's phrases
            phrases = torch.stack([self.phrase(n) for n in phrase_ids]).to(h.device)
            hit = (torch.cdist(h, phrases).argmin(-1) == torch.tensor(owners, device=h.device)).float().mean()
        return SimpleNamespace(loss=loss, hit=hit)
