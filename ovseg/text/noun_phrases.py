"""Noun phrases and nouns of captions, with nltk when it can tag, else a plain vocabulary match.

Two backends behind one pair of functions (:func:`extract_noun_phrases`, :func:`nouns`):

- ``nltk`` (cloc.md "Data", VESL step 2): POS tags (nltk's perceptron tagger) and a
  ``RegexpParser`` chunker with the grammar :data:`NP_GRAMMAR` (optional determiner,
  adjectives, nouns). Used when nltk is importable **and** its tagger data is installed
  (``python -m nltk.downloader averaged_perceptron_tagger_eng``); nothing is downloaded here.
- ``vocabulary`` [ours, the fallback]: lower-case word split, then the longest known noun at
  each position, from a vocabulary (default: the union of the class names shipped in
  ``ovseg/data/classes/*.txt``), multi-word names first ("traffic light" before "light"),
  simple plurals mapped to the vocabulary's singular ("dogs" -> "dog"). A phrase is the
  vocabulary name itself: no adjectives, since there are no POS tags.

Both drop phrases made only of stop words or generic web words ("photo", "image") and
repeated phrases (case-insensitive, first kept), and keep at most ``max_phrases`` per text.
:func:`noun_phrase_backend` says which backend runs by default.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

BACKENDS = ("nltk", "vocabulary")
# cloc.md "Data" step 2: optional determiner, adjectives, nouns
NP_GRAMMAR = "NP: {<DT>?<JJ.*>*<NN.*>+}"
MAX_PHRASES = 20  # cloc.md: at most 20 queries per image
CLASSES_DIR = Path(__file__).resolve().parents[1] / "data" / "classes"

# function words: never a noun, and a phrase made only of them is dropped
STOP_WORDS = frozenset("""
a an the this that these those some any each every all both few many much more most other
another such no nor not only own same so than too very one two three four five six seven eight
nine ten several and or but if of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here
there when where why how what which who whom whose it its itself they them their we us our you
your he him his she her i me my mine is are was were be been being have has had do does did
top front back side left right middle near next behind
""".split())
# generic web / caption words (cloc.md: "drop generic web words"); not objects in the image
GENERIC_WORDS = frozenset("""
photo photograph picture image pic view shot close closeup background foreground thing things
stuff something someone somebody object objects item items area scene kind type lot part
""".split())
# common caption nouns that no shipped class list names (people, places), for the fallback
CAPTION_NOUNS = frozenset("""
man woman boy girl child kid baby guy lady player men women children people street road
kitchen room beach park city field snow ocean
""".split())
_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def _words(text: str) -> list[str]:
    """Lower-case words; a possessive "'s" is dropped ("man's" -> "man")."""
    return [re.sub(r"'s$", "", word) for word in _WORD.findall(text.lower())]


def _is_generic(words: Sequence[str]) -> bool:
    return all(w in STOP_WORDS or w in GENERIC_WORDS for w in words)


def _dedup_cap(phrases: Iterable[str], max_phrases: int) -> list[str]:
    seen: set[str] = set()
    kept: list[str] = []
    for phrase in phrases:
        key = phrase.casefold()
        if key in seen:
            continue
        seen.add(key)
        kept.append(phrase)
        if len(kept) == max_phrases:
            break
    return kept


# --------------------------------------------------------------------------- vocabulary backend


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> frozenset[str]:
    """Lower-case names of every class file in ``ovseg/data/classes/`` (synonyms too) and
    :data:`CAPTION_NOUNS`, minus stop and generic words (e.g. "background")."""
    names: set[str] = set(CAPTION_NOUNS)
    for path in sorted(CLASSES_DIR.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for name in re.split(r"[,;]", line):
                words = _words(name.replace("_", " "))
                if words and not _is_generic(words):
                    names.add(" ".join(words))
    return frozenset(names)


def _singulars(word: str) -> list[str]:
    """Candidate singulars of a plural, most specific first ("boxes" -> box, boxe, boxes)."""
    out = []
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def _vocabulary_phrases(text: str, vocabulary: frozenset[str]) -> list[str]:
    words = _words(text)
    longest = max((name.count(" ") + 1 for name in vocabulary), default=1)
    found: list[str] = []
    start = 0
    while start < len(words):
        match = None
        for length in range(min(longest, len(words) - start), 0, -1):
            span = words[start:start + length]
            if length == 1 and span[0] in STOP_WORDS:
                break
            head = " ".join(span[:-1])
            # the last word may be plural: "traffic lights" -> "traffic light"
            for last in (span[-1], *_singulars(span[-1])):
                name = f"{head} {last}" if head else last
                if name in vocabulary:
                    match = (name, length)
                    break
            if match:
                break
        if match:
            found.append(match[0])
            start += match[1]
        else:
            start += 1
    return found


# --------------------------------------------------------------------------- nltk backend


@functools.lru_cache(maxsize=1)
def _nltk_parts():
    """(pos_tag, chunker) when nltk and its tagger data are present, else None."""
    try:
        import nltk
    except ImportError:
        return None
    try:
        nltk.pos_tag(["a", "dog"])  # raises LookupError when the tagger data is missing
    except LookupError:
        return None
    except Exception as error:  # a broken install: use the fallback, say why
        logger.warning("nltk cannot tag (%s); using the vocabulary noun extractor", error)
        return None
    return nltk.pos_tag, nltk.RegexpParser(NP_GRAMMAR)


def _nltk_phrases(text: str) -> list[str]:
    pos_tag, chunker = _nltk_parts()
    # our word split, not nltk's punkt tokenizer: punkt needs one more data package
    tagged = pos_tag(_words(text))
    phrases = []
    for subtree in chunker.parse(tagged).subtrees(lambda t: t.label() == "NP"):
        words = [word for word, tag in subtree.leaves() if tag != "DT"]
        # guess: the leading determiner is dropped from the query ("a red car" -> "red car")
        if words and not _is_generic(words):
            phrases.append(" ".join(words))
    return phrases


def _nltk_nouns(text: str) -> list[str]:
    pos_tag, _ = _nltk_parts()
    return [word for word, tag in pos_tag(_words(text))
            if tag.startswith("NN") and not _is_generic([word])]


# --------------------------------------------------------------------------- public API


def noun_phrase_backend(backend: str | None = None) -> str:
    """The backend that runs: ``backend`` when given (checked), else ``nltk`` when nltk and its
    tagger data are present, else ``vocabulary``."""
    if backend is None:
        return "nltk" if _nltk_parts() is not None else "vocabulary"
    if backend not in BACKENDS:
        raise ValueError(f"unknown noun-phrase backend {backend!r}; one of {BACKENDS}")
    if backend == "nltk" and _nltk_parts() is None:
        raise ValueError("noun-phrase backend 'nltk' needs nltk and its tagger data: pip install "
                         "nltk; python -m nltk.downloader averaged_perceptron_tagger_eng")
    return backend


def extract_noun_phrases(text: str, max_phrases: int = MAX_PHRASES, *,
                         backend: str | None = None,
                         vocabulary: Iterable[str] | None = None) -> list[str]:
    """Noun phrases of ``text`` in order of appearance, repeats dropped, at most
    ``max_phrases`` (the module docstring describes the two backends).

    Args:
        text: a caption (several captions can be joined with ". ").
        max_phrases: the cap (20, cloc.md).
        backend: "nltk" | "vocabulary"; None = :func:`noun_phrase_backend`.
        vocabulary: known nouns of the vocabulary backend, lower case (default:
            :func:`default_vocabulary`).
    """
    if max_phrases < 1:
        raise ValueError(f"max_phrases must be >= 1, got {max_phrases}")
    if noun_phrase_backend(backend) == "nltk":
        return _dedup_cap(_nltk_phrases(text), max_phrases)
    known = default_vocabulary() if vocabulary is None else frozenset(
        " ".join(_words(v)) for v in vocabulary)
    return _dedup_cap(_vocabulary_phrases(text, known), max_phrases)


def nouns(text: str, *, backend: str | None = None,
          vocabulary: Iterable[str] | None = None) -> list[str]:
    """The nouns of ``text`` in order, repeats dropped: words tagged NN* (nltk) or the
    vocabulary matches (fallback: then the same as :func:`extract_noun_phrases`, uncapped)."""
    if noun_phrase_backend(backend) == "nltk":
        return _dedup_cap(_nltk_nouns(text), len(text) + 1)
    return extract_noun_phrases(text, len(text) + 1, backend="vocabulary",
                                vocabulary=vocabulary)
