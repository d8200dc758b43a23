"""CTC pre-alignment of the audio connector: the `objective: ctc` of a recipe stage.

Ola pre-aligns its speech connector with the LLM's next-token loss on ASR data: every step runs the whole LLM
forward and backward, and the connector only learns through what the LLM makes of its outputs. On a CPU budget that
is a few thousand utterances, too few to learn open-ended speech. This objective trains the same connector without
the LLM: each output vector of the connector (one per `frames_per_token` encoder frames) is scored against the LLM's
own input-embedding table by cosine similarity, and CTC (Graves et al., 2006) aligns the sequence of scores with
the transcript's LLM tokens, with one learned extra vector as CTC's blank. The connector therefore learns to put
the embeddings of the spoken words, in order, where the LLM reads speech -- the LLM sees speech much as it sees
text -- at about 1/50 of an LLM step's cost per utterance. A following `lm` stage adapts it to the LLM.

- the connector's learned begin / newline / end vectors are left out: they are the same in every clip, so they
  can say nothing about it (scored, they stall CTC on a constant token);
- logits `[T, K + 1]` = `scale * cos(h_t, E_v)` for the rows `E_v` of a candidate vocabulary, and the blank: the
  batch's transcript tokens plus `negatives` rows drawn at random each step (a sampled softmax: the full 49k-row
  vocabulary would make the step ten times dearer for little more signal);
- loss = CTC over the transcript's tokens (the record's answer without special tokens), mean per target token,
  plus `norm_weight * mean_t (|h_t| / mean_v |E_v| - 1)^2`, which keeps the connector's vectors the size of the
  LLM's own embeddings (cosine scores alone say nothing about it);
- records are one clip each with what it says as the answer: ASR records (the transcript), or the tiny world's
  `audio_caption` records, whose answer names the clip's sounds in order ("beep beep", "high tone"), so sounds are
  grounded onto the LLM's words as speech is; a clip too short for its answer (fewer connector tokens than CTC needs)
  is left out of the loss and counted.

Only the audio connector trains (the recipe checks it); the scale and the blank are not part of the model. The blank
is saved beside the stage's model (`ctc_blank.safetensors`), so the connector's own transcription can be read
greedily afterwards (:meth:`CtcObjective.save_blank`, :func:`greedy_readout`, `benchmarks/speech_readout.py`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..modeling.connectors import audio_layout_mask, ctc_labels


class CtcObjective(nn.Module):
    """Wraps an Ola model for a `ctc` stage: `forward(**batch, labels=...)` returns the CTC pre-alignment loss.

    Args:
        model: The `OlaForConditionalGeneration` whose audio connector trains.
        ignore_ids: Token ids never used as CTC targets (the tokenizer's special tokens: end of turn, ...).
        norm_weight: Weight of the embedding-size term.
        negatives: Random vocabulary rows scored besides the batch's own tokens each step.
    """

    def __init__(self, model, ignore_ids: list[int] | tuple[int, ...] = (), norm_weight: float = 0.1,
                 negatives: int = 4096):
        super().__init__()
        if model.model.audio_connector is None:
            raise InputError("the ctc objective needs a model with an audio encoder and connector")
        self.ola = model
        table = model.get_input_embeddings().weight.detach()
        self.register_buffer("ignore_ids", torch.tensor(sorted(set(ignore_ids)), dtype=torch.long), persistent=False)
        self.embedding_norm = float(table.float().norm(dim=-1).mean())
        self.blank = nn.Parameter(table.float().mean(0).clone())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.norm_weight, self.negatives = norm_weight, negatives
        self.skipped = 0  # clips whose transcript did not fit their tokens, so far

    def head_parameters(self) -> list[nn.Parameter]:
        return [self.blank, self.logit_scale]

    def save_blank(self, path: Path) -> Path:
        """Write the learned blank vector (atomically: a temporary file renamed into place); :func:`load_ctc_blank`
        reads it."""
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({"blank": self.blank.detach().float().contiguous()}, str(tmp))
        os.replace(tmp, path)
        return path

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, input_features=None, feature_attention_mask=None,
                audio_num_chunks=None, audio_values=None, audio_values_mask=None, audio_encoder_states=None,
                audio_encoder_lengths=None, **_) -> SimpleNamespace:
        if input_features is None and audio_encoder_states is None:
            raise InputError("a ctc stage needs records with one clip each (ASR or audio captions); "
                             "this batch has no audio")
        clips = self.ola.model.get_audio_features(input_features, feature_attention_mask, audio_num_chunks,
                                                  audio_values, audio_values_mask, audio_encoder_states,
                                                  audio_encoder_lengths, snap=False)
        clips = [content_tokens(self.ola.model.audio_connector, clip) for clip in clips]
        if len(clips) != len(input_ids):
            raise InputError(f"a ctc stage needs records with exactly one clip each; this batch has {len(clips)} "
                             f"clips for {len(input_ids)} records")
        answer = (labels != -100) & ~torch.isin(input_ids, self.ignore_ids.to(input_ids.device))
        targets = [ids[mask] for ids, mask in zip(input_ids, answer)]
        keep = [i for i, (h, t) in enumerate(zip(clips, targets)) if 0 < len(t) and _ctc_length(t) <= len(h)]
        self.skipped += len(clips) - len(keep)
        outputs = [clips[i] for i in keep]
        if not outputs:  # nothing fits: a zero loss that still reaches the connector
            return SimpleNamespace(loss=sum(h.sum() for h in clips) * 0.0)
        table = self.ola.get_input_embeddings().weight
        spoken = torch.cat([targets[i] for i in keep])
        sampled = torch.randint(0, len(table), (min(self.negatives, len(table)),), device=spoken.device)
        candidates, position = torch.unique(torch.cat([spoken, sampled]), return_inverse=True)  # sorted ids
        vocab = torch.cat([table[candidates], self.blank[None].to(table.dtype)])  # (K + 1, D), blank last
        states = nn.utils.rnn.pad_sequence(outputs, batch_first=True)  # (B, T, D)
        logits = F.normalize(states, dim=-1) @ F.normalize(vocab, dim=-1).to(states.dtype).T  # (B, T, K + 1)
        log_probs = (logits.float() * self.logit_scale.exp()).log_softmax(-1).transpose(0, 1)  # (T, B, K + 1)
        lengths = torch.tensor([len(h) for h in outputs])
        target_lengths = torch.tensor([len(targets[i]) for i in keep])
        ctc = F.ctc_loss(log_probs, position[: len(spoken)].cpu(), lengths, target_lengths,
                         blank=len(vocab) - 1, reduction="sum", zero_infinity=True) / target_lengths.sum()
        sizes = torch.cat([h.float().norm(dim=-1) for h in outputs]) / self.embedding_norm
        loss = ctc + self.norm_weight * ((sizes - 1) ** 2).mean()
        return SimpleNamespace(loss=loss, ctc=ctc.detach())


def load_ctc_blank(path: Path) -> torch.Tensor:
    """The blank vector a `ctc` stage saved beside its model."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: no CTC blank here (a `ctc` stage writes ctc_blank.safetensors beside its model)")
    return load_file(str(path))["blank"]


@torch.no_grad()
def greedy_readout(table: torch.Tensor, blank: torch.Tensor, tokens: torch.Tensor,
                   ignore_ids: torch.Tensor | None = None) -> list[int]:
    """Greedy CTC decoding of one clip's content tokens `[T, D]` (`ctc_labels`: runs merged, blanks
    dropped). Returns LLM token ids."""
    best = ctc_labels(table, blank, tokens, ignore_ids).tolist()
    return [b for i, b in enumerate(best) if b >= 0 and (i == 0 or b != best[i - 1])]


@torch.no_grad()
def clip_content_tokens(model, processor, audio_path) -> torch.Tensor:
    """One audio file's content tokens `[T, D]` as the model's audio connector gives them (through the processor,
    the audio encoder and the connector, never snapped; layout vectors left out): what the readouts read as words."""
    inputs = processor("<audio>", audio=[str(audio_path)])
    clip = model.model.get_audio_features(inputs["input_features"], inputs.get("feature_attention_mask"),
                                          inputs.get("audio_num_chunks"), inputs.get("audio_values"),
                                          inputs.get("audio_values_mask"), snap=False)[0]
    return content_tokens(model.model.audio_connector, clip)


def content_tokens(connector: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """A clip's audio tokens `[T, D]` without the connector's layout vectors (`audio_layout_mask`)."""
    return clip[~audio_layout_mask(connector, clip)]


def _ctc_length(target: torch.Tensor) -> int:
    """The fewest frames CTC needs for `target`: one per token, plus a blank between repeated tokens."""
    return len(target) + int((target[1:] == target[:-1]).sum())
