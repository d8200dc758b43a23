"""The words of the tiny world's varied and out-of-template data: sentences to speak, questions to ask.

Two disjoint families, so that a test can tell learning a modality from completing a template:

- **training** (`grammar="train"`): a grammar of sentences about shapes (many constructions, its own verbs, sizes
  and places), general English phrases cut from Markov-chain text of Project Gutenberg books (the
  `markov_draftjs` package, MIT: :func:`book_phrases`), and several phrasings of every question intent;
- **out of template** (`grammar="oot"`): another grammar with other constructions and vocabulary, real English
  sentences from Python's own reference documentation (the standard library's `pydoc_data`:
  :func:`reference_sentences`), and question phrasings that training never uses (British spelling among them).

Colour and shape names are shared (they are what the questions are about); everything else is kept apart, and
`tests/test_language.py` checks that no sentence or question phrasing is in both families.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass

from ..errors import ComponentNotFoundError, ConfigError
from .pictures import COLORS, SHAPES

__all__ = ["GRAMMARS", "INTENTS", "OOT_NARRATIONS", "SOUND_INTENTS", "VIDEO_INTENTS", "Question", "ask_about",
           "book_phrases", "question", "reference_sentences", "shape_sentence", "sound_question", "video_question"]

GRAMMARS = ("train", "oot")
COLOR_WORDS = tuple(COLORS)
SHAPE_WORDS = SHAPES

# ------------------------------------------------------------------------------------------------ sentences
# Slots: {c}/{c2} colour, {s}/{s2} shape noun ({ss}: plural), {z} size, {v}/{v2} verb, {d}/{d2} direction, {p} place,
# {n} number word.
_VOCABULARY = {
    "train": {
        "s": SHAPE_WORDS + ("square", "star", "ring", "dot", "box"),
        "z": ("small", "big", "large", "tiny", "short", "tall", "thin", "wide"),
        "v": ("moves", "goes", "jumps", "rolls", "turns", "spins", "walks", "runs", "falls", "climbs"),
        "d": ("left", "right", "up", "down", "to the left", "to the right", "away", "back", "forward", "home"),
        "p": ("on the left", "on the right", "at the top", "at the bottom", "in the middle", "in the corner",
              "in the center", "next to the wall", "on the table", "under the line", "over the box",
              "behind the door", "in front of you", "far away", "close to the start"),
        "n": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    },
    "oot": {
        "s": SHAPE_WORDS + ("oval", "diamond", "hexagon", "cube", "arrow"),
        "z": ("little", "huge", "medium", "enormous", "narrow", "chunky", "slim", "giant"),
        "v": ("slides", "drifts", "glides", "floats", "bounces", "wanders", "creeps", "hurries", "tumbles",
              "swerves"),
        "d": ("sideways", "upwards", "downwards", "across the screen", "toward the edge", "out of sight",
              "around the frame", "past the others", "along the border", "into the distance"),
        "p": ("near the edge of the screen", "in the upper half", "along the border", "beside the window",
              "in the lower corner", "just below the title", "halfway across", "against the background",
              "at the very end", "somewhere in the picture"),
        "n": ("thirteen", "fourteen", "fifteen", "twenty", "thirty", "a dozen", "a hundred", "several", "many",
              "a few"),
    },
}
_TEMPLATES = {
    "train": (
        "the {z} {c} {s} {v} {d}.",
        "a {c} {s} is {p}.",
        "there is a {z} {c} {s} next to the {c2} {s2}.",
        "where is the {c} {s}?",
        "draw a {z} {c} {s} {p}.",
        "put the {c} {s} above the {c2} {s2}.",
        "the {s} {p} is {c}.",
        "i see {n} {c} {ss}.",
        "is the {c} {s} bigger than the {c2} {s2}?",
        "the {c} {s} turns {c2}.",
        "count the {c} {ss}.",
        "can you find the {z} {s}?",
        "look at the {c} {s} {p}.",
        "the {s} and the {s2} are both {c}.",
        "move the {c} {s} {d}.",
        "the picture shows a {c} {s} on a white background.",
        "how many {ss} are {c}?",
        "the {z} {s} is behind the {c} {s2}.",
        "every {s} in the picture is {c}.",
        "we have {n} {ss} and one {s2}.",
        "first the {s} {v} {d}, then it stops.",
        "the {c} one is a {s}.",
        "touch the {z} {s} and then the {c} {s2}.",
        "this {s} is {c} and that {s2} is {c2}.",
        "the {s} {v} {d} and the {s2} {v2} {d2}.",
        "show me a {c} {s}.",
        "my {s} is {z} and {c}.",
        "no {s} is {c} here.",
        "the {c} {s} is {z}.",
        "a {z} {s} {v} {d} very fast.",
    ),
    "oot": (
        "please move the {z} {c} {s} {d}.",
        "could you tell me whether the {c} {s} is still there?",
        "i think the {s} looks a little {c} today.",
        "there's a {z} {c} {s} sitting {p}.",
        "after a while the {c} {s} {v} slowly {d}.",
        "my favourite figure is the {c} {s}.",
        "what happens when the {s} {v} into the {c2} {s2}?",
        "nobody noticed the {c} {s} {p}.",
        "the {s} was painted {c} yesterday.",
        "if you rotate the {s}, does it stay {c}?",
        "suddenly a {z} {s} {v} {d}.",
        "let's paint {n} of the {ss} {c}.",
        "honestly, the {c} {s} never {v} {d}.",
        "would you rather have a {c} {s} or a {c2} {s2}?",
        "one {z} {s} keeps hiding {p}.",
        "in the end, only the {c} {s} remained {p}.",
        "somebody swapped the {c} {s} for a {c2} {s2}.",
        "watch how the {s} {v} {d} before it disappears.",
    ),
}


def shape_sentence(grammar: str, rng: random.Random) -> str:
    """One sentence about shapes from `grammar`'s templates and vocabulary (lower case, with punctuation)."""
    if grammar not in GRAMMARS:
        raise ConfigError(f"unknown grammar {grammar!r}; choose one of {GRAMMARS}")
    words = _VOCABULARY[grammar]
    template = rng.choice(_TEMPLATES[grammar])
    c, c2 = rng.sample(COLOR_WORDS, 2)
    s, s2 = rng.sample(words["s"], 2)
    d, d2 = rng.sample(words["d"], 2)
    v, v2 = rng.sample(words["v"], 2)
    plural = s + ("es" if s.endswith(("x", "s")) else "s")
    return template.format(c=c, c2=c2, s=s, s2=s2, ss=plural, z=rng.choice(words["z"]), v=v, v2=v2, d=d, d2=d2,
                           p=rng.choice(words["p"]), n=rng.choice(words["n"]))


# ------------------------------------------------------------------------------------------------ real text
_SPEAKABLE = re.compile(r"[A-Za-z][A-Za-z' ,;-]*[A-Za-z][.?!]?")


def _clean(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", "").replace("\u201d", "")
    return re.sub(r"\s+", " ", text.replace('"', "")).strip()


@functools.lru_cache(maxsize=1)
def book_phrases(min_words: int = 4, max_words: int = 12) -> tuple[str, ...]:
    """General English for training speech: phrases of 4-12 words cut at punctuation from the Markov-chain
    Gutenberg text of the `markov_draftjs` package (MIT), lower-cased, only letters and simple punctuation.

    Raises:
        ComponentNotFoundError: the package is not installed.
    """
    from importlib import resources

    try:
        content = resources.files("markov_draftjs").joinpath("content.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ComponentNotFoundError(
            "the tiny world's varied speech needs English text from the markov_draftjs package: "
            "pip install markov_draftjs (or omniola[data])") from err
    phrases = set()
    for document in json.loads(content):
        for block in document.get("blocks", []):
            for piece in re.split(r"(?<=[.?!;:])\s+|\s+-+\s+|\u2014", _clean(block.get("text", ""))):
                piece = piece.strip(" ,;:-")
                words = piece.split()
                while len(words) > max_words:  # long sentences: cut at a comma near the middle, else in halves
                    cut = next((i + 1 for i in range(max_words // 2, max_words) if words[i].endswith(",")),
                               max_words)
                    head, words = words[:cut], words[cut:]
                    _keep(phrases, " ".join(head).rstrip(",") + ".", min_words, max_words)
                _keep(phrases, " ".join(words), min_words, max_words)
    return tuple(sorted(phrases))


def _keep(phrases: set[str], phrase: str, min_words: int, max_words: int) -> None:
    phrase = phrase.strip(" ,;-").lower()
    if min_words <= len(phrase.split()) <= max_words and _SPEAKABLE.fullmatch(phrase):
        phrases.add(phrase if phrase[-1] in ".?!" else phrase + ".")


@functools.lru_cache(maxsize=1)
def reference_sentences(min_words: int = 5, max_words: int = 14) -> tuple[str, ...]:
    """Real English sentences for out-of-template speech, from Python's reference documentation (the standard
    library's `pydoc_data.topics`): whole sentences of 5-14 words with only letters, commas and apostrophes."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics.values()))
    found = set()
    for sentence in re.split(r"(?<=[.?!])\s+", text):
        words = len(sentence.split())
        if re.fullmatch(r"[A-Z][a-z',]*( [A-Za-z',]+)+[.]", sentence) and min_words <= words <= max_words:
            found.add(sentence.lower())
    return tuple(sorted(found))


# ------------------------------------------------------------------------------------------------ questions
@dataclass(frozen=True)
class Question:
    """A question about a picture: its text, its canonical answer and what it asks (`intent`)."""

    text: str
    answer: str
    intent: str


# intent: (training phrasings, out-of-template phrasings). {c} colour, {s} shape.
INTENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "color": (  # one shape: its colour
        ("what color is the shape?", "what is the color of the shape?", "which color is the shape?",
         "what color is it?", "tell me the color of the shape.", "what color is the object?",
         "which color does the shape have?", "the shape is what color?", "say the color of the shape.",
         "what color do you see?"),
        ("what colour is the shape?", "can you name the colour of the thing in the picture?",
         "which hue does the figure have?", "what's the colour of the figure shown here?",
         "in one word, what colour is it?", "identify the colour of the object, please."),
    ),
    "shape": (  # one shape: which
        ("what shape is in the image?", "what shape is this?", "which shape is shown?", "what is the shape?",
         "name the shape.", "what kind of shape is it?", "what shape do you see?", "which shape is in the picture?"),
        ("what sort of figure is drawn here?", "can you tell which geometric form this is?",
         "what figure does the picture contain?", "identify the form in this picture, please."),
    ),
    "color_of": (  # several shapes: the colour of the named one
        ("what color is the {s}?", "what is the color of the {s}?", "which color is the {s}?",
         "tell me the color of the {s}.", "the {s} is what color?", "what color does the {s} have?"),
        ("what colour is the {s}?", "which hue has the {s} got?", "can you name the colour of the {s}?",
         "what's the colour of the {s} in this picture?"),
    ),
    "shape_of": (  # several shapes: the shape with the named colour
        ("what shape is {c}?", "which shape is {c}?", "what is the {c} shape?", "the {c} shape is which shape?"),
        ("which figure is coloured {c}?", "the {c} one is what kind of figure?",
         "what form does the {c} thing have?"),
    ),
    "has_color": (  # yes / no
        ("is there a {c} shape?", "is anything {c}?", "do you see a {c} shape?",
         "does the picture contain something {c}?", "is there something {c} in the image?", "is a {c} shape present?"),
        ("can you spot anything {c} here?", "does any part of the picture look {c}?",
         "would you say there's a {c} figure?", "is some figure here coloured {c}?"),
    ),
    "has_shape": (
        ("is there a {s}?", "do you see a {s}?", "does the image contain a {s}?", "is a {s} shown?",
         "is there a {s} in the picture?", "can you see a {s}?"),
        ("can you spot a {s} anywhere?", "is a {s} drawn in this picture?", "would you find a {s} here?",
         "does this picture include a {s}?"),
    ),
    "has_both": (
        ("is there a {c} {s}?", "do you see a {c} {s}?", "is the {s} {c}?", "does the image show a {c} {s}?"),
        ("is a {c} {s} visible?", "can you see any {c} {s}?", "is the {s} coloured {c}?"),
    ),
    "no_color": (  # negated: "yes" means the colour is absent
        ("is there no {c} shape?", "is nothing {c}?", "is there not a {c} shape in the image?",
         "does the image not contain a {c} shape?"),
        ("is the picture without any {c}?", "is it true that nothing here is {c}?"),
    ),
    "no_shape": (
        ("is there no {s}?", "is there not a {s}?", "does the image not contain a {s}?", "is no {s} shown?"),
        ("is it true that no {s} appears?", "is the picture free of any {s}?"),
    ),
    "count": (
        ("how many shapes are there?", "how many shapes do you see?", "count the shapes.",
         "how many shapes are in the picture?", "what is the number of shapes?"),
        ("how many figures can you count here?", "what's the total number of figures shown?"),
    ),
    "side": (  # two shapes side by side: where the named one is
        ("is the {s} on the left or the right?", "which side is the {s} on?", "is the {s} left or right?",
         "where is the {s}, left or right?"),
        ("on which side of the picture does the {s} sit, left or right?",
         "would you say the {s} is towards the left or towards the right?"),
    ),
}
# Training questions only: a lead-in and a tail now and then, so that the model learns to answer the question
# rather than to recognise a sentence.
_LEAD_INS = ("",) * 6 + ("look at the picture. ", "in this image, ", "tell me: ", "quick question: ",
                         "about the picture: ", "here is a question. ")
_TAILS = ("",) * 6 + (" answer with one word.", " be brief.", " just the answer, please.")


def question(intent: str, grammar: str, rng: random.Random, *, color: str = "", shape: str = "",
             answer: str) -> Question:
    """A phrasing of `intent` from `grammar`'s family, filled with `color` / `shape`, with its `answer`."""
    if intent not in INTENTS:
        raise ConfigError(f"unknown question intent {intent!r}; choose one of {sorted(INTENTS)}")
    if grammar not in GRAMMARS:
        raise ConfigError(f"unknown grammar {grammar!r}; choose one of {GRAMMARS}")
    phrasings = INTENTS[intent][GRAMMARS.index(grammar)]
    text = rng.choice(phrasings).format(c=color, s=shape)
    if grammar == "train":  # a lead-in, a request for brevity, another word for the picture
        text = rng.choice(_LEAD_INS) + text + rng.choice(_TAILS)
        text = re.sub(r"\b(image|picture)\b", lambda _: rng.choice(("image", "picture", "photo")), text)
    if rng.random() < 0.5:  # typed questions often start with a capital
        text = text[0].upper() + text[1:]
    return Question(text, answer, intent)


def ask_about(picture: dict, grammar: str, rng: random.Random, n: int = 1) -> list[Question]:
    """`n` different questions about a picture spec (`pictures.plan_picture`), answerable only by looking.

    Intents are drawn at random among those the picture allows; every yes/no question is "yes" or "no" with equal
    chance whatever its wording (a negative names a colour or shape that is absent, or a shape with another
    shape's colour), so the wording never gives the answer away.
    """
    shapes = picture["shapes"]
    present = {(s["color"], s["shape"]) for s in shapes}
    colors, kinds = {c for c, _ in present}, {k for _, k in present}
    absent_colors = [c for c in COLOR_WORDS if c not in colors]
    absent_kinds = [k for k in SHAPE_WORDS if k not in kinds]
    intents = ["color", "shape"] if len(shapes) == 1 else ["color_of", "shape_of"]
    intents += ["has_color", "has_both", "no_color", "count"]
    if absent_kinds:
        intents += ["has_shape", "no_shape"]
    by_x = sorted(shapes, key=lambda s: s["cx"])
    if len(shapes) == 2 and by_x[1]["cx"] - by_x[0]["cx"] > 12:
        intents.append("side")
    asked: list[Question] = []
    for _ in range(20 * n):
        if len(asked) == n:
            break
        intent = rng.choice(intents)
        yes = rng.random() < 0.5
        target = rng.choice(shapes)
        if intent in ("color", "color_of"):
            q = question(intent, grammar, rng, shape=target["shape"], answer=target["color"])
        elif intent in ("shape", "shape_of"):
            q = question(intent, grammar, rng, color=target["color"], answer=target["shape"])
        elif intent in ("has_color", "no_color"):
            color = target["color"] if yes == (intent == "has_color") else rng.choice(absent_colors)
            q = question(intent, grammar, rng, color=color, answer="yes" if yes else "no")
        elif intent in ("has_shape", "no_shape"):
            kind = target["shape"] if yes == (intent == "has_shape") else rng.choice(absent_kinds)
            q = question(intent, grammar, rng, shape=kind, answer="yes" if yes else "no")
        elif intent == "has_both":
            if yes:
                color, kind = target["color"], target["shape"]
            elif len(shapes) > 1 and rng.random() < 0.5:  # another shape's colour on this shape
                color, kind = rng.choice([s["color"] for s in shapes if s is not target]), target["shape"]
            else:
                color, kind = rng.choice(absent_colors), target["shape"]
            q = question(intent, grammar, rng, color=color, shape=kind, answer="yes" if yes else "no")
        elif intent == "count":
            q = question(intent, grammar, rng, answer=str(len(shapes)))
        else:  # side
            q = question(intent, grammar, rng, shape=target["shape"],
                         answer="left" if target is by_x[0] else "right")
        if all(q.text != a.text for a in asked):
            asked.append(q)
    return asked


# intent: (training phrasings, out-of-template phrasings); answers: a digit, high / low, tone / beeps / noise.
SOUND_INTENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "count": (("How many beeps?", "How many beeps do you hear?", "Count the beeps.", "How many beeps are in the sound?",
               "What is the number of beeps?"),
              ("How many times does it beep?", "Could you count the beeps in this clip for me?",
               "Tell me how many short beeps sound here.")),
    "pitch": (("Is the tone high or low?", "Is this a high or a low tone?", "Is the pitch high or low?",
               "Does the tone sound high or low?"),
              ("Would you call this tone high-pitched or low-pitched?", "Is the note up high or down low?")),
    "kind": (("What kind of sound is it? Answer tone, beeps or noise.", "Is it a tone, beeps or noise?",
              "What do you hear: tone, beeps or noise?", "Which sound is this: tone, beeps or noise?"),
             ("Which of these describes the clip best: tone, beeps or noise?",
              "Tone, beeps or noise: what's in this recording?")),
}


def sound_question(intent: str, grammar: str, rng: random.Random) -> str:
    """A phrasing of a sound question (`count`, `pitch` or `kind`) from `grammar`'s family."""
    if intent not in SOUND_INTENTS:
        raise ConfigError(f"unknown sound question intent {intent!r}; choose one of {sorted(SOUND_INTENTS)}")
    return rng.choice(SOUND_INTENTS[intent][GRAMMARS.index(grammar)])


# Out-of-template questions about a clip, by (template, what they need). The in-template ones are the tiny world's
# own fixed questions (`tiny_world`), none of which is here; answers are those of the in-template questions.
VIDEO_INTENTS: dict[str, tuple[str, ...]] = {
    "name/visual": ("In this clip, what's the colour of the {s}?", "Which hue has the {s} in the video got?",
                    "Looking at the clip, can you name the colour of the {s}?"),
    "name/audio": ("Which figure is mentioned in the recording?", "What figure does the voice talk about?",
                   "The narrator refers to one figure. Which one?"),
    "name/cross": ("The voice mentions one figure: what colour is it?",
                   "Which colour is the figure the narrator refers to?",
                   "Find the figure the voice talks about. What's its colour?"),
    "move_beeps/visual": ("Which direction is the {s} travelling in?",
                          "Where is the {s} heading: left, right, up or down?",
                          "Watching the clip, does the {s} drift left, right, up or down?"),
    "move_beeps/audio": ("How many times does it beep in this clip?", "Count the beeps you can hear, please.",
                         "What's the total number of beeps in the recording?"),
    "move_beeps/cross": ("How many beeps can be heard while the {s} is in motion?",
                         "While the {s} travels, how many times does it beep?",
                         "Count only the beeps during the {s}'s journey. How many?"),
    "change_tone/visual": ("What colour is the {s} by the end of the clip?",
                           "Which colour does the {s} finish with?",
                           "When the clip ends, what's the {s}'s colour?"),
    "change_tone/audio": ("Would you say the clip's note is high-pitched or low-pitched?",
                          "Does the note in this video sound high or low?",
                          "Is the note you hear up high or down low?"),
    "change_tone/cross": ("At the moment the note plays, what colour is the {s}?",
                          "Which colour does the {s} have while the note sounds?",
                          "During the note, what's the colour of the {s}?"),
}
#: What the narrator says in an out-of-template `name` clip (the in-template ones: "look at the {}.", ...): short,
#: so that slow voices finish within the clip.
OOT_NARRATIONS = ("watch the {}.", "notice the {}.", "see that {}?", "the {} matters.")


def video_question(intent: str, rng: random.Random, *, shape: str = "") -> str:
    """An out-of-template phrasing of a clip question (`VIDEO_INTENTS`: `"<template>/<visual|audio|cross>"`)."""
    if intent not in VIDEO_INTENTS:
        raise ConfigError(f"unknown video question intent {intent!r}; choose one of {sorted(VIDEO_INTENTS)}")
    return rng.choice(VIDEO_INTENTS[intent]).format(s=shape)
