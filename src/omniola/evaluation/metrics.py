"""Metrics as pure functions: answer normalisation, exact match, word error rate, multiple-choice answer
extraction and MMBench's circular scoring.

Definitions follow the communities that use them:

- **Exact match** (open-ended QA): SQuAD-style normalisation -- lower case, punctuation and the articles
  *a / an / the* removed, whitespace collapsed -- plus number words written as digits ("three" -> "3",
  "twenty-one" -> "21", 0-99), so "Three." and "3" agree.
- **Word error rate** (ASR): corpus WER, the sum of word edits (substitutions + deletions + insertions) over all
  utterances divided by the sum of reference words (not a mean of per-utterance WERs), computed with `jiwer` after
  Whisper's English text normaliser, as Whisper, Ola and the Open ASR Leaderboard report LibriSpeech.
- **Multiple choice** (MMBench, VideoMME): the option letter is extracted from free text (:func:`extract_choice`);
  an answer that names no option, or several, is *unparsable* and counted as such. MMBench's circular evaluation
  asks each question once per rotation of its options and counts it right only if every rotation is answered
  right (:func:`circular_outcome`).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "circular_outcome",
    "english_normalizer",
    "exact_match",
    "extract_choice",
    "normalize_answer",
    "rotate_options",
    "word_error_rate",
]

# ------------------------------------------------------------------------------------------- exact match
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_NUMBER_WORDS = {word: k for k, word in enumerate(_UNITS)}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT_RE = re.compile("[" + re.escape(string.punctuation) + "]")


def _numbers_to_digits(words: list[str]) -> list[str]:
    """`["twenty", "one", "dogs"]` -> `["21", "dogs"]` (0-99)."""
    out, k = [], 0
    while k < len(words):
        word = words[k]
        if word in _TENS:
            value = _TENS[word]
            if k + 1 < len(words) and words[k + 1] in _NUMBER_WORDS and 0 < _NUMBER_WORDS[words[k + 1]] < 10:
                value += _NUMBER_WORDS[words[k + 1]]
                k += 1
            out.append(str(value))
        elif word in _NUMBER_WORDS:
            out.append(str(_NUMBER_WORDS[word]))
        else:
            out.append(word)
        k += 1
    return out


def normalize_answer(text: str) -> str:
    """Lower case, punctuation -> space (keeping "3.5" and "1,000" whole), apostrophes dropped, number words ->
    digits (0-99), articles removed, whitespace collapsed: `"The  Twenty-one dogs!"` -> `"21 dogs"`."""
    text = str(text).lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"(?<=\d),(?=\d\d\d)", "", text)  # thousands separator: "1,000" -> "1000"
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)  # keep a decimal point ("3.5") through the next line
    text = _PUNCT_RE.sub(" ", text).replace("\0", ".")
    words = _numbers_to_digits(text.split())
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, references: str | Sequence[str]) -> bool:
    """Whether `prediction` equals the reference (or any of a list) after :func:`normalize_answer`."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(r) for r in refs)


# ---------------------------------------------------------------------------------------------------- WER
def _spelling_map(model_dir: str | Path | None) -> dict[str, str] | None:
    """Whisper's British -> American spelling map (`normalizer.json` of Whisper's tokenizer), found offline.

    Looked for, in order: `normalizer.json` in `model_dir` (a Whisper tokenizer directory), the copy shipped in the
    `whisper-normalizer` package (omniola's `eval` extra), the one in `openai-whisper`. transformers itself does
    not ship it (its `WhisperTokenizer` reads it from the model repository).
    """
    candidates = []
    if model_dir is not None:
        candidates.append(Path(model_dir) / "normalizer.json")
    for package in ("whisper_normalizer", "whisper"):
        try:
            candidates.append(importlib.resources.files(package) / "normalizers" / "english.json")
        except (ModuleNotFoundError, TypeError):
            continue
    for path in candidates:
        try:
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


def english_normalizer(model_dir: str | Path | None = None, *, warn: bool = True) -> Callable[[str], str]:
    """Whisper's `EnglishTextNormalizer` (transformers' copy) with its spelling map.

    Without the spelling map (see `_spelling_map`) the normaliser still runs -- numbers, contractions, fillers,
    punctuation and symbols are handled the same -- but British spellings are not mapped to American ones, which
    can only raise the WER; a warning says so. (This is closer to the standard than falling back to
    `BasicTextNormalizer`, which does not standardise numbers or contractions at all.)
    """
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = _spelling_map(model_dir)
    if mapping is None:
        if warn:
            logger.warning("Whisper's English spelling map (normalizer.json) was not found offline: WER is computed "
                           "without British -> American spelling normalisation; pip install 'omniola[eval]' "
                           "(whisper-normalizer) to get it")
        mapping = {}
    return EnglishTextNormalizer(mapping)


def word_error_rate(
    references: Sequence[str],
    hypotheses: Sequence[str],
    normalizer: Callable[[str], str] | None = None,
) -> dict[str, float | int | None]:
    """Corpus word error rate: `(S + D + I) / N`, summed over all utterances.

    Args:
        references: The reference transcripts.
        hypotheses: The model's transcripts, one per reference.
        normalizer: Applied to both sides first (e.g. :func:`english_normalizer`); `None`: compare as given
            (split on whitespace).

    Returns:
        `wer` (`None` when the references hold no word), `substitutions`, `deletions`, `insertions`, `hits`,
        `reference_words` and `utterances`.
    """
    try:
        import jiwer
    except ImportError as err:
        raise ConfigError("word error rate needs jiwer: pip install 'omniola[eval]'") from err

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    norm = normalizer or (lambda s: s)
    refs = [" ".join(norm(r).split()) for r in references]
    hyps = [" ".join(norm(h).split()) for h in hypotheses]
    counts = {"substitutions": 0, "deletions": 0, "insertions": 0, "hits": 0}
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    if pairs:
        out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
        counts = {k: int(getattr(out, k)) for k in counts}
    # jiwer refuses empty references; every word said against one is an insertion
    counts["insertions"] += sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    n = counts["substitutions"] + counts["deletions"] + counts["hits"]
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return {"wer": errors / n if n else None, **counts, "reference_words": n, "utterances": len(refs)}


# ---------------------------------------------------------------------------------------- multiple choice
_CUE_WORDS = r"(?i:answer|option|choice)"
# After a capital "A" (or "I"), these words make it an option letter rather than the article (pronoun).
_AFTER_LETTER = frozenset({"is", "was", "seems", "appears", "would", "should", "fits", "matches", "or", "and",
                           "nor", "but", "because", "since"})


def _letters_in(pattern: str, text: str, letters: str) -> set[str]:
    return {m.upper() for m in re.findall(pattern, text) if m.upper() in letters}


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer names, or `None` when it names none or several (unparsable).

    Tried in order, the first rule that finds anything decides:

    1. the whole answer is a letter: `"B"`, `"b"`, `"(B)"`, `"B."`, `"[B]"`;
    2. explicit cues: `"The answer is B"`, `"Answer: (C)"`, `"option D"`, a leading `"B."` / `"B)"` / `"B:"`,
       or `"(B)"` anywhere -- exactly one letter, else unparsable;
    3. a capital option letter standing alone (`"I think B"`), where a capital "A" followed by a lower-case
       word ("A dog ...") is read as the article unless that word is a verb or conjunction ("A is", "A or B")
       -- one letter, else unparsable;
    4. the option text itself: the answer is, or contains as whole words, exactly one option's text (an
       option whose text lies inside another matched option's text does not count separately), compared after
       :func:`normalize_answer`.

    Args:
        text: The model's answer.
        options: `{letter: option text}`, e.g. `{"A": "cat", "B": "dog"}`.
    """
    letters = "".join(options)
    s = text.strip()
    if not s or not letters:
        return None
    cls = f"[{re.escape(letters)}]"
    # 1. a letter alone
    m = re.fullmatch(rf"[\s(\[]*({cls})[\s)\].:,]*", s, flags=re.IGNORECASE)
    if m:
        return m.group(1).upper()
    # 2. explicit cues
    found = set()
    found |= _letters_in(rf"{_CUE_WORDS}\s*(?:is|:|-|would be|should be)?\s*:?\s*[(\[]?\s*({cls})\b", s, letters)
    found |= _letters_in(rf"^[\s(\[]*({cls})\s*[).:\]]", s, letters)
    found |= _letters_in(rf"[(\[]({cls})[)\]]", s, letters)
    if found:
        return found.pop() if len(found) == 1 else None
    # 3. a letter standing alone
    for m in re.finditer(rf"(?<![\w'])({cls})(?![\w'])", s):
        letter = m.group(1)
        follow = re.match(r"\s+([a-z]+)", s[m.end():])
        if letter in "AI" and follow and follow.group(1) not in _AFTER_LETTER:
            continue  # the article "A" / the pronoun "I"
        found.add(letter)
    if found:
        return found.pop() if len(found) == 1 else None
    # 4. the option text
    answer = normalize_answer(s)
    texts = {letter: normalize_answer(t) for letter, t in options.items() if normalize_answer(t)}
    equal = [letter for letter, t in texts.items() if t == answer]
    if len(equal) == 1:
        return equal[0]
    padded = f" {answer} "
    hits = {letter: t for letter, t in texts.items() if f" {t} " in padded}
    hits = {letter: t for letter, t in hits.items()
            if not any(t != other and f" {t} " in f" {other} " for other in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


def rotate_options(texts: Sequence[str], answer: int, k: int) -> tuple[list[str], int]:
    """Rotation `k` of MMBench's circular evaluation: option `i` gets the text of option `(i + k) mod n`.

    Args:
        texts: Option texts in letter order.
        answer: Index of the right option.
        k: Rotation, `0 <= k < len(texts)`; 0 is the original order.

    Returns:
        The rotated texts and the index of the right option among them.
    """
    n = len(texts)
    return [texts[(i + k) % n] for i in range(n)], (answer - k) % n


def circular_outcome(outcomes: Iterable[str]) -> str:
    """One question's result under circular evaluation, from the outcomes of its rotations.

    Args:
        outcomes: Per rotation one of `"correct"`, `"wrong"`, `"unparsable"`, `"failed"` (media or generation
            failed) or `"invalid"` (the row is malformed).

    Returns:
        `"invalid"` or `"failed"` if any rotation was (the question is not scored, and is counted as such),
        `"correct"` if every rotation is correct, `"unparsable"` if a rotation is unparsable and none is wrong,
        else `"wrong"`.
    """
    outcomes = list(outcomes)
    for status in ("invalid", "failed"):
        if status in outcomes:
            return status
    if outcomes and all(o == "correct" for o in outcomes):
        return "correct"
    if "wrong" in outcomes or not outcomes:
        return "wrong"
    return "unparsable"
