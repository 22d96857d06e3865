"""Every text of the toy world, each true of its image: ImageNet's caption pairs, CIRR's and FashionIQ's
modifications, CIRCO's captions and shared concepts, and the alt-text-like captions of the web part."""
from __future__ import annotations

from typing import Sequence

from toy.attributes import GARMENT_ATTRIBUTES, SCENE_ATTRIBUTES, pick


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def scene_subject(attrs: dict) -> str:
    """'a small red circle' (METHOD §8 subject: up to the first noun)."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']}"


def _background_words(background: str | None, pattern: str | None) -> str:
    if background and pattern:
        return f"plain {background}" if pattern == "plain" else f"{background} {pattern}"
    return background or pattern


def scene_attribute(attrs: dict) -> str:
    """'on a blue background' / 'on a blue striped background' (METHOD §8 attribute: the rest)."""
    words = attrs["background"] if attrs["pattern"] == "plain" else f"{attrs['background']} {attrs['pattern']}"
    return f"on {with_article(words)} background"


def join_clauses(clauses: list[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _background_clause(rng, background: str | None, pattern: str | None) -> str:
    words = _background_words(background, pattern)
    return f"{pick(rng, ('with', 'has', 'is on'))} {with_article(words)} background"


# Captions of the web part: alt-text-like descriptions of one image, in many phrasings, full or partial
# (any attribute may go unmentioned), so that a CLIP trained on them knows every word the benchmark
# texts use about the toy world without ever seeing a benchmark text.
SIZE_WORDS = {"small": ("small", "little", "tiny", "smaller"), "large": ("large", "big", "bigger", "larger")}
SCENE_PATTERN_ADJ = {"plain": ("plain",), "striped": ("striped",), "dotted": ("dotted", "polka dot"),
                      "checkered": ("checkered", "checked")}
# A web text also holds words that say nothing of the picture ("make it yours"): a real CLIP has met
# every word of the benchmarks' texts, "it", "make" and "instead" too, and so must the toy one, or their
# embeddings stay at their random start and blur every query that uses them.
_WEB_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "it is ",
                 "make it yours: ", "turn it into art: ", "use this one instead: ")
_GRAYSCALE_PREFIXES = ("a grayscale photo of ", "a monochrome picture of ", "a grayscale image of ")


def _mentioned(rng, keys: Sequence[str], always: float, each: float) -> set:
    """Which attributes a caption names: all of them with probability `always`, else each with
    probability `each` (at least one)."""
    if rng.random() < always:
        return set(keys)
    chosen = {k for k in keys if rng.random() < each}
    return chosen or {pick(rng, list(keys))}


def _shuffled_words(rng, words: list[str], keep_order: float = 0.7) -> list[str]:
    return words if rng.random() < keep_order else [words[i] for i in rng.permutation(len(words))]


def web_scene_caption(rng, attrs: dict) -> str:
    """'a small red circle on a blue striped background', 'a circle that is red', 'a picture of a
    checked green background with a big star', 'a tiny shape in pink', ..."""
    if rng.random() < 0.2:  # many alt texts only name the thing: "a star", "a photo of a heart"
        return pick(rng, _WEB_PREFIXES) + with_article(attrs["shape"])
    if attrs.get("grayscale"):  # no colour to be seen, none named
        said = _mentioned(rng, ("shape", "size", "pattern"), always=0.5, each=0.6)
        bg = f" on a {pick(rng, SCENE_PATTERN_ADJ[attrs['pattern']])} background" if "pattern" in said else ""
        size = pick(rng, SIZE_WORDS[attrs["size"]]) + " " if "size" in said else ""
        noun = attrs["shape"] if "shape" in said else pick(rng, ("shape", "object", "figure"))
        return f"{pick(rng, _GRAYSCALE_PREFIXES)}{with_article(size + noun)}{bg}"
    said = _mentioned(rng, SCENE_ATTRIBUTES, always=0.4, each=0.55)
    colour = attrs["colour"] if "colour" in said else None
    size = pick(rng, SIZE_WORDS[attrs["size"]]) if "size" in said else None
    noun = attrs["shape"] if "shape" in said else pick(rng, ("shape", "object", "figure"))
    obj = None
    if {"shape", "colour", "size"} & said:
        form = rng.random()
        if colour and form < 0.25:
            obj = with_article(" ".join(w for w in (size, noun) if w) + f" that is {colour}")
        elif colour and form < 0.4:
            obj = with_article(" ".join(w for w in (size, noun) if w) + f" in {colour}")
        else:
            obj = with_article(" ".join(_shuffled_words(rng, [w for w in (size, colour) if w]) + [noun]))
    bg = None
    if {"background", "pattern"} & said:
        words = [w for w in (attrs["background"] if "background" in said else None,
                             pick(rng, SCENE_PATTERN_ADJ[attrs["pattern"]]) if "pattern" in said else None) if w]
        bg = with_article(" ".join(_shuffled_words(rng, words)) + " background")
    prefix = pick(rng, _WEB_PREFIXES)
    if obj and bg:
        form = rng.random()
        if form < 0.2:
            return f"{prefix}{bg} with {obj}"
        if form < 0.3:
            return f"{obj}, {pick(rng, ('on', 'with'))} {bg}"
        if form < 0.4:
            return f"{prefix}{obj} that has {bg}"
        return f"{prefix}{obj} {pick(rng, ('on', 'on', 'with', 'against'))} {bg}"
    return prefix + (obj or bg)


def web_garment_caption(rng, category: str, attrs: dict) -> str:
    """'a loose long red striped dress', 'a blue shirt with long sleeves', 'a tee that is green and
    plaid', 'a photo of a slim sleeveless top', 'a graphic tee', 'a pink shirt with no logo', ..."""
    said = _mentioned(rng, GARMENT_ATTRIBUTES, always=0.35, each=0.5)
    noun = pick(rng, GARMENT_NOUNS[category])
    adjectives, after = [], []
    if "fit" in said:
        adjectives.append(pick(rng, _WEB_FIT_ADJ[attrs["fit"]]))
    if "variant" in said:
        if category == "dress":
            adjectives.append(pick(rng, _WEB_DRESS_LENGTH[attrs["variant"]]))
        else:
            sleeves = pick(rng, _SLEEVES_WITH[attrs["variant"]])
            (after if sleeves.startswith("with") else adjectives).append(sleeves)
    colour = attrs["colour"] if "colour" in said else None
    if colour and rng.random() < 0.15:
        colour += " colored"
    pattern = None
    if "pattern" in said:
        if rng.random() < 0.35:
            after.append(_GARMENT_PATTERN_WITH[attrs["pattern"]])
        else:
            pattern = pick(rng, _GARMENT_PATTERN_ADJ[attrs["pattern"]])
    if "print" in said:
        if attrs["print"] == "graphic" and rng.random() < 0.3:
            adjectives.append("graphic")  # "a graphic tee"
        else:
            after.append(pick(rng, _PRINT_WITH[attrs["print"]]))
    if after and all(a.startswith("with ") for a in after) and rng.random() < 0.3:  # "a top that has a logo"
        after = ["that has " + join_clauses([a[len("with "):] for a in after])]
    prefix = pick(rng, _WEB_PREFIXES)
    if colour and rng.random() < 0.25:  # "a loose dress that is red and striped"
        rest = " and ".join(w for w in (colour, pattern) if w)
        return prefix + with_article(" ".join(_shuffled_words(rng, adjectives) + [noun])) + \
            " " + " ".join(after + [f"that is {rest}"])
    words = _shuffled_words(rng, adjectives + [w for w in (colour, pattern) if w]) + [noun]
    return prefix + " ".join([with_article(" ".join(words))] + ([join_clauses(after)] if after else []))


def scene_change_text(rng, ref: dict, tgt: dict) -> str:
    """CIRR modification: names every attribute in which `tgt` differs from `ref`."""
    clauses = []
    c, s = tgt["colour"], tgt["shape"]
    if ref["colour"] != c and ref["shape"] != s:
        clauses.append(pick(rng, (f"is {c} and {with_article(s)} instead", f"make it {with_article(c + ' ' + s)}")))
    elif ref["colour"] != c:
        clauses.append(pick(rng, (f"is {c} instead", f"make it {c}")))
    elif ref["shape"] != s:
        clauses.append(pick(rng, (f"is {with_article(s)} instead", f"turn it into {with_article(s)}")))
    if ref["size"] != tgt["size"]:
        bigger = tgt["size"] == "large"
        clauses.append(pick(rng, ("make it bigger", "is larger") if bigger else ("make it smaller", "is smaller")))
    new_bg = tgt["background"] if ref["background"] != tgt["background"] else None
    new_pattern = tgt["pattern"] if ref["pattern"] != tgt["pattern"] else None
    if new_bg or new_pattern:
        clauses.append(_background_clause(rng, new_bg, new_pattern))
    if not clauses:
        raise ValueError("reference and target are identical")
    return join_clauses(clauses)


GARMENT_NOUNS = {"dress": ("dress",), "shirt": ("shirt",), "toptee": ("top", "tee")}
# how the garment attributes are worded: as adjectives (descriptions) and as changes (relative captions,
# in the style of FashionIQ's: "is darker", "has no sleeves", "is looser")
_GARMENT_PATTERN_ADJ = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "polka dot"),
                        "plaid": ("plaid", "checked")}
_GARMENT_PATTERN_WITH = {"solid": "in a solid color", "striped": "with stripes", "dotted": "with dots",
                         "plaid": "with a plaid pattern"}
_PRINT_WITH = {"graphic": ("with a graphic", "with a logo", "with a print on the front"),
               "none": ("with no graphic", "without a logo", "with no print")}
_FIT_ADJ = {"fitted": ("fitted", "tight", "slim"), "loose": ("loose", "baggy", "flowy")}
# the web's words for fit and a dress's length also hold comparatives, as "bigger" is one of "large"
_WEB_FIT_ADJ = {"fitted": _FIT_ADJ["fitted"] + ("tighter", "more fitted"), "loose": _FIT_ADJ["loose"] + ("looser", "more loose")}
_WEB_DRESS_LENGTH = {"short": ("short", "shorter"), "long": ("long", "longer")}
_SLEEVES_WITH = {"short": ("with short sleeves", "short-sleeved"), "long": ("with long sleeves", "long-sleeved"),
                 "sleeveless": ("sleeveless", "with no sleeves")}
_COLOUR_CHANGE = ("is {}", "is {} in color", "is {} colored")
_PATTERN_CHANGE = {"solid": ("is solid", "is plain", "is a solid color"), "striped": ("has stripes", "is striped"),
                   "dotted": ("has dots", "has polka dots", "is dotted"),
                   "plaid": ("is plaid", "has a plaid pattern", "is checked")}
_VARIANT_CHANGE = {
    "dress": {"short": ("is shorter", "is short"), "long": ("is longer", "is long")},
    "shirt": {"short": ("has short sleeves", "has shorter sleeves"), "long": ("has long sleeves", "has longer sleeves")},
    "toptee": {"sleeveless": ("has no sleeves", "is sleeveless"), "short": ("has short sleeves", "has sleeves")},
}
_PRINT_CHANGE = {"graphic": ("has a graphic", "has a logo", "has a print on the front"),
                 "none": ("has no graphic", "has no logo", "is without a print")}
_FIT_CHANGE = {"fitted": ("is tighter", "is more fitted", "is fitted"), "loose": ("is looser", "is more loose", "is loose")}


def garment_pair(category: str, attrs: dict) -> tuple[str, str]:
    """A caption of a garment split as the ImageNet pairs are (subject up to the first noun, attribute
    the rest): ('a loose long red dress', 'with stripes'), ('a fitted blue top', 'with no sleeves and dots'),
    ('a loose green shirt', 'with long sleeves, stripes and a graphic'); a garment without a graphic is
    said no more about, as a plain background is not."""
    c, p, v, f = attrs["colour"], attrs["pattern"], attrs["variant"], attrs["fit"]
    noun = GARMENT_NOUNS[category][0]
    graphic = ["a graphic"] if attrs["print"] == "graphic" else []
    pattern = _GARMENT_PATTERN_WITH[p]
    if category == "dress":
        subject = f"a {f} {v} {c} {noun}"
        things = []
    else:
        subject = f"a {f} {c} {noun}"
        things = ["no sleeves" if v == "sleeveless" else f"{v} sleeves"]
    if pattern.startswith("with "):
        return subject, "with " + join_clauses(things + [pattern[5:]] + graphic)
    # "in a solid color": the other things follow with their own "with"
    rest = " with " + join_clauses(things + graphic) if things or graphic else ""
    return subject, pattern + rest


def _garment_change_clause(rng, category: str, key: str, tgt: dict) -> str:
    """One relative clause naming the target's value of `key`."""
    if key == "colour":
        return pick(rng, _COLOUR_CHANGE).format(tgt["colour"])
    if key == "pattern":
        return pick(rng, _PATTERN_CHANGE[tgt["pattern"]])
    if key == "variant":
        return pick(rng, _VARIANT_CHANGE[category][tgt["variant"]])
    if key == "print":
        return pick(rng, _PRINT_CHANGE[tgt["print"]])
    return pick(rng, _FIT_CHANGE[tgt["fit"]])


def fashioniq_captions(rng, category: str, ref: dict, tgt: dict) -> list[str]:
    """Two annotators' relative captions, as in FashionIQ: each names some of the changes (a change
    may be named by both, in other words), together they name every change; now and then one also
    names the target's colour with the garment ("is a blue dress") although the colour is kept."""
    changed = [k for k in GARMENT_ATTRIBUTES if ref[k] != tgt[k]]
    if not changed:
        raise ValueError("reference and target are identical")
    order = [changed[i] for i in rng.permutation(len(changed))]
    cut = int(rng.integers(1, len(order) + 1))
    first, second = order[:cut], order[cut:]
    if not second or rng.random() < 0.4:  # the second annotator also names one the first did
        second = second + [pick(rng, first)]
    texts = []
    for keys in (first, second):
        keys = [k for k in GARMENT_ATTRIBUTES if k in keys]  # annotators name colour first, fit last
        clauses = [_garment_change_clause(rng, category, k, tgt) for k in keys]
        if "colour" not in keys and rng.random() < 0.15:
            clauses.insert(0, f"is {with_article(tgt['colour'] + ' ' + pick(rng, GARMENT_NOUNS[category]))}")
        texts.append(join_clauses(clauses) if rng.random() < 0.5 else " and ".join(clauses))
    return texts


def circo_change_text(rng, changes: dict) -> str:
    clauses = []
    if "colour" in changes:
        clauses.append(pick(rng, (f"is {changes['colour']}", f"is {changes['colour']} instead")))
    if "background" in changes or "pattern" in changes:
        clauses.append(_background_clause(rng, changes.get("background"), changes.get("pattern")))
    return join_clauses(clauses)


def web_caption(rng, record: dict) -> str:
    kind = record["kind"]
    return web_scene_caption(rng, record) if kind == "scene" else web_garment_caption(rng, kind, record)
