"""Split a BLIP caption into a (subject, attribute) pair (METHOD §8), quirks included.

A *tagger* is any callable `text -> list of (word, pos)` with Universal POS tags (spaCy's
`token.pos_`). It may also offer `pipe(texts) -> iterable of such lists`, which is used to tag many
captions at once. The default tagger is spaCy's `en_core_web_sm`, loaded lazily: spaCy is an
optional dependency of the caption step alone.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from errors import UserError

Tagged = list[tuple[str, str]]
Tagger = Callable[[str], Tagged]

DEFAULT_SPACY_MODEL = "en_core_web_sm"
MIN_WORDS = 4  # captions with fewer whitespace words are not POS-tagged (rule 2)


class SpacyUnavailable(UserError, RuntimeError):
    """spaCy or its English model is not installed."""


def drop_trailing_repeats(caption: str) -> str:
    """Rule 1: 'a dog on grass grass grass' -> 'a dog on grass' (whitespace words, single spaces)."""
    words = caption.split()
    while len(words) > 1 and words[-1] == words[-2]:
        words.pop()
    return " ".join(words)


def split_tagged(caption: str, tagged: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """Rule 3 on an already tagged caption: tokens up to and including the first NOUN, the rest.

    With no NOUN the authors' code slices *characters*: the first two, then the remainder (code).
    """
    words = [w for w, _ in tagged]
    for i, (_, pos) in enumerate(tagged):
        if pos == "NOUN":
            subject, attribute = " ".join(words[: i + 1]), " ".join(words[i + 1 :])
            # the authors' code compares the caption's CHARACTER length with the noun's token
            # position and, when it is not longer than position + 2, makes the attribute the
            # subject (so rule 4 drops the pair); kept, though it hardly ever fires (code)
            if len(caption) <= i + 1 + 2:
                attribute = subject
            return subject, attribute
    return caption[:2], caption[2:]


def split_caption(caption: str, tagger: Tagger) -> tuple[str, str]:
    """Rules 1-3 of METHOD §8 for one caption. Rule 4 (drop subject == attribute) is the caller's."""
    caption = drop_trailing_repeats(caption)
    if len(caption.split()) < MIN_WORDS:
        return caption, caption
    return split_tagged(caption, tagger(caption))


def _tag_all(texts: list[str], tagger: Tagger) -> Iterable[Tagged]:
    pipe = getattr(tagger, "pipe", None)
    return pipe(texts) if pipe is not None else map(tagger, texts)


def build_pairs(captions: dict[str, str], tagger: Tagger) -> tuple[list[dict], dict[str, int]]:
    """Rules 1-4 over `{img_id: caption}`: the authors' JSON list, sorted by id, and counts.

    Counts: `captions`, `short` (rule 2), `no_noun` (rule 3's character slice), `dropped_equal`
    (rule 4; every short caption ends up here too), `pairs`.
    """
    ids = sorted(captions)
    cleaned = [drop_trailing_repeats(captions[i]) for i in ids]
    long_idx = [k for k, c in enumerate(cleaned) if len(c.split()) >= MIN_WORDS]
    splits = [(c, c) for c in cleaned]  # rule 2 for the short ones; long ones are overwritten below
    no_noun = 0
    for k, tagged in zip(long_idx, _tag_all([cleaned[k] for k in long_idx], tagger)):
        tagged = list(tagged)
        no_noun += not any(pos == "NOUN" for _, pos in tagged)
        splits[k] = split_tagged(cleaned[k], tagged)
    pairs = [
        {"img_id": img_id, "subject": s, "attribute": a}
        for img_id, (s, a) in zip(ids, splits)
        if s != a  # rule 4
    ]
    counts = {
        "captions": len(ids),
        "short": len(ids) - len(long_idx),
        "no_noun": no_noun,
        "dropped_equal": len(ids) - len(pairs),
        "pairs": len(pairs),
    }
    return pairs, counts


class SpacyTagger:
    """spaCy POS tagger: `tagger(text)` or `tagger.pipe(texts)` -> lists of (token text, UPOS)."""

    def __init__(self, model: str = DEFAULT_SPACY_MODEL, batch_size: int = 512):
        self.nlp = load_spacy(model)
        self.batch_size = batch_size

    def __call__(self, text: str) -> Tagged:
        return [(t.text, t.pos_) for t in self.nlp(text)]

    def pipe(self, texts: Iterable[str]) -> Iterable[Tagged]:
        for doc in self.nlp.pipe(texts, batch_size=self.batch_size):
            yield [(t.text, t.pos_) for t in doc]


def load_spacy(model: str = DEFAULT_SPACY_MODEL):
    """Load a spaCy pipeline for POS tags, with an exact error when spaCy or the model is missing."""
    try:  # deferred: spaCy is optional, needed by the caption split alone
        import spacy
    except ImportError as err:
        raise SpacyUnavailable(
            "spaCy is not installed; the caption split needs it (docs/METHOD.md §8). Install it with "
            f"`pip install -r requirements-caption.txt` and its English model with `python -m spacy download {model}` "
            "(the model is not on PyPI; the download needs network access)."
        ) from err
    try:
        nlp = spacy.load(model)
    except OSError as err:
        raise SpacyUnavailable(
            f"spaCy model {model!r} is not installed. It is not on PyPI: install it with "
            f"`python -m spacy download {model}` on a machine with network access, or pass "
            f"--spacy-model with the path of a saved spaCy pipeline. ({err})"
        ) from err
    # Only the POS tags are read: the parser, NER and lemmatizer do not change `pos_` (tagger and
    # attribute ruler set it), so they are switched off for speed.
    unused = [name for name in ("parser", "ner", "lemmatizer") if name in nlp.pipe_names]
    if unused:
        nlp.select_pipes(disable=unused)
    return nlp
