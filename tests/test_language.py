"""The varied and out-of-template generators: disjoint families, deterministic, answerable from the picture."""

import random
import re
from collections import Counter

import pytest

from omniola.data import language, pictures
from omniola.errors import ConfigError


def _sentences(grammar: str, n: int, seed: int = 0) -> set[str]:
    rng = random.Random(seed)
    return {language.shape_sentence(grammar, rng) for _ in range(n)}


def test_grammars_share_no_sentence():
    train, oot = _sentences("train", 20_000), _sentences("oot", 20_000)
    assert len(train) > 10_000 and len(oot) > 10_000
    assert not train & oot


def test_question_phrasings_are_disjoint_across_families():
    for table in (language.INTENTS, language.SOUND_INTENTS):
        for intent, (train, oot) in table.items():
            assert train and oot, intent
            assert not set(train) & set(oot), intent
    # filled in, no out-of-template question is a training question of another intent either
    filled = {g: set() for g in language.GRAMMARS}
    for grammar in language.GRAMMARS:
        for train_or_oot in language.INTENTS.values():
            for phrasing in train_or_oot[language.GRAMMARS.index(grammar)]:
                for color in language.COLOR_WORDS:
                    for shape in language.SHAPE_WORDS:
                        filled[grammar].add(phrasing.format(c=color, s=shape))
    assert not filled["train"] & filled["oot"]


def test_real_text_sources():
    pytest.importorskip("markov_draftjs")
    book, reference = language.book_phrases(), language.reference_sentences()
    assert len(book) > 5000 and len(reference) > 100
    assert not set(book) & set(reference)
    assert all(4 <= len(p.split()) <= 12 and p == p.lower() and p[-1] in ".?!" for p in book)
    assert all(p[0].isalpha() and '"' not in p for p in book + reference)


def test_pictures_are_deterministic_and_styles_differ():
    a = pictures.plan_picture(random.Random(5), "train")
    b = pictures.plan_picture(random.Random(5), "train")
    assert a == b and pictures.draw_picture(a).tobytes() == pictures.draw_picture(b).tobytes()
    kinds = {g: {pictures.plan_picture(random.Random(i), g)["background"]["kind"] for i in range(200)}
             for g in pictures.PICTURE_STYLES}
    assert kinds["train"] == set(pictures.BACKGROUNDS["train"]) and kinds["oot"] == set(pictures.BACKGROUNDS["oot"])
    assert not kinds["train"] & kinds["oot"]
    with pytest.raises(ConfigError, match="style"):
        pictures.plan_picture(random.Random(0), "cartoon")


def test_shapes_are_drawn_where_the_spec_says():
    spec = pictures.plan_picture(random.Random(1), "train", shapes=2)
    image = pictures.draw_picture(spec)
    for shape in spec["shapes"]:
        pixel = image.getpixel((round(shape["cx"]), round(shape["cy"] + shape["h"] / 4)))
        assert max(abs(p - q) for p, q in zip(pixel, shape["rgb"])) <= 1, shape


def test_questions_are_answerable_and_yes_no_is_balanced_per_wording():
    by_wording: dict[str, Counter] = {}
    for i in range(3000):
        rng = random.Random(i)
        spec = pictures.plan_picture(rng, "train")
        present = {(s["color"], s["shape"]) for s in spec["shapes"]}
        for q in language.ask_about(spec, "train", rng, n=4):
            if q.intent == "count":
                assert q.answer == str(len(present))
            elif q.intent in ("color", "color_of"):
                assert any(c == q.answer for c, _ in present)
            elif q.intent in ("shape", "shape_of"):
                assert any(s == q.answer for _, s in present)
            if q.answer in ("yes", "no"):
                wording = next(p for p in language.INTENTS[q.intent][0] if _matches(p, q.text))
                by_wording.setdefault(wording, Counter())[q.answer] += 1
    for wording, counts in by_wording.items():
        share = counts["yes"] / sum(counts.values())
        assert 0.35 < share < 0.65, (wording, counts)


def _matches(phrasing: str, text: str) -> bool:
    """Whether `text` is `phrasing` filled in, with a training lead-in, tail or picture word around it."""
    pattern = re.escape(phrasing).replace(r"\{c\}", "[a-z]+").replace(r"\{s\}", "[a-z]+")
    pattern = re.sub(r"image|picture", "(image|picture|photo)", pattern)
    return re.search(f"(^|\\s){pattern}", text.lower()) is not None


def test_unknown_intent_or_grammar_is_refused():
    with pytest.raises(ConfigError, match="intent"):
        language.question("weather", "train", random.Random(0), answer="sunny")
    with pytest.raises(ConfigError, match="grammar"):
        language.shape_sentence("poetry", random.Random(0))
