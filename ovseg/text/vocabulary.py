"""Vocabularies: classes with synonyms, parsed from inline text, files or lists, and the
max-over-synonyms reduction from per-name scores to per-class scores.

A vocabulary is an ordered list of classes; each class is a tuple of names (synonyms) whose
first name is the class's display name. Every name becomes one text-classifier row; a class
scores the max over its names (see ``specs/dense_clip.md``, step 4).

One set of rules, applied by every constructor (``Vocabulary(...)`` included):
- names are stripped and runs of whitespace collapsed to one space; case is kept;
- order is kept;
- a name equal (case-insensitively) to an earlier name anywhere in the vocabulary is dropped,
  and a class left without names is dropped (with a warning, because the class indices shift);
- an empty name is a ``VocabularyError`` naming its position; so is an empty vocabulary.
"""

from __future__ import annotations

import codecs
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ovseg.errors import VocabularyError

# inline syntax: "person;man;woman, dog, sky"
_INLINE_CLASS_SEP = ","
_INLINE_SYNONYM_SEP = ";"
# class files: SCLIP/NACLIP separate synonyms with ", ", ProxyCLIP with "; "
_FILE_NAME_SEP = re.compile(r"[,;]")


def _normalise_name(name: str) -> str:
    return " ".join(name.split())


def _dedup_key(name: str) -> str:
    return _normalise_name(name).casefold()


def _clean_classes(
    classes: Sequence[Sequence[str] | str], positions: Sequence[str] | None = None
) -> tuple[tuple[str, ...], ...]:
    """Apply the vocabulary rules (module docstring) to raw classes.

    ``positions[i]`` says where raw class ``i`` came from (e.g. ``"file x.txt, line 3"``) for
    error messages; by default ``"class i+1"``.
    """
    if isinstance(classes, str):
        # a bare string would otherwise be read as one class per character
        classes = [classes]
    if positions is None:
        positions = [f"class {i + 1}" for i in range(len(classes))]
    seen: set[str] = set()
    cleaned: list[tuple[str, ...]] = []
    for raw_class, where in zip(classes, positions, strict=True):
        if isinstance(raw_class, bytes | bytearray) or not isinstance(raw_class, str | Sequence):
            raise VocabularyError(
                f"{where} of the vocabulary is {type(raw_class).__name__} {raw_class!r}; a "
                "class is a name or a list of synonyms"
            )
        names = (raw_class,) if isinstance(raw_class, str) else tuple(raw_class)
        if not names:
            raise VocabularyError(f"{where} of the vocabulary has no names; give at least one")
        kept: list[str] = []
        for j, raw_name in enumerate(names):
            if not isinstance(raw_name, str):
                raise VocabularyError(
                    f"{where}, name {j + 1} of the vocabulary is {type(raw_name).__name__} "
                    f"{raw_name!r}; names must be strings"
                )
            name = _normalise_name(raw_name)
            if not name:
                what = where if len(names) == 1 else f"{where}, name {j + 1}"
                raise VocabularyError(
                    f"{what} of the vocabulary is empty; remove the extra separator or fill "
                    "in a name"
                )
            key = name.casefold()
            if key not in seen:
                seen.add(key)
                kept.append(name)
        if kept:
            cleaned.append(tuple(kept))
        else:
            warnings.warn(
                f"{where} of the vocabulary ({', '.join(map(_normalise_name, names))}) repeats "
                "earlier names and is dropped; the indices of the classes after it shift by one",
                stacklevel=2,
            )
    if not cleaned:
        raise VocabularyError("the vocabulary is empty; give at least one class name")
    return tuple(cleaned)


@dataclass(frozen=True)
class Vocabulary:
    """Ordered classes, each a tuple of synonyms; the first name is the display name.

    Construction applies the module's rules, so ``Vocabulary((("cat",), ("Cat", "kitty")))``
    holds ``(("cat",), ("kitty",))``.
    """

    classes: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        # frozen dataclass: normalise in place through object.__setattr__
        object.__setattr__(self, "classes", _clean_classes(self.classes))

    @property
    def class_names(self) -> list[str]:
        """Display name of every class, (num_classes,)."""
        return [names[0] for names in self.classes]

    @property
    def names(self) -> list[str]:
        """All names, class by class: one text-classifier row each, (N_names,)."""
        return [name for names in self.classes for name in names]

    @property
    def name_to_class(self) -> Tensor:
        """Class index of every name: int64 (N_names,), on the CPU."""
        return torch.tensor(
            [c for c, names in enumerate(self.classes) for _ in names], dtype=torch.long
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.classes)


def parse_vocabulary(text: str) -> Vocabulary:
    """Parse the inline syntax: classes separated by ``,``, synonyms within a class by ``;``.

    ``"person;man;woman, dog, sky"`` -> ``(("person", "man", "woman"), ("dog",), ("sky",))``.
    """
    if not text.strip():
        raise VocabularyError("the vocabulary is empty; give class names like 'cat, dog, sky'")
    if not text.replace(_INLINE_CLASS_SEP, "").replace(_INLINE_SYNONYM_SEP, "").strip():
        raise VocabularyError(
            f"the vocabulary {text.strip()!r} has separators but no class names; give class "
            f"names like 'cat, dog, sky' ('{_INLINE_CLASS_SEP}' between classes, "
            f"'{_INLINE_SYNONYM_SEP}' between synonyms)"
        )
    classes = [part.split(_INLINE_SYNONYM_SEP) for part in text.split(_INLINE_CLASS_SEP)]
    return Vocabulary(classes)


def read_vocabulary_file(path: str | os.PathLike[str]) -> Vocabulary:
    """Read a class file: one class per line, synonyms on a line separated by ``,`` or ``;``.

    Both the SCLIP/NACLIP syntax (``sky, wall``) and the ProxyCLIP syntax (``sky; wall``) are
    read. Blank lines and lines starting with ``#`` are skipped. The file is UTF-8 (a
    byte-order mark is skipped) or UTF-16 with a byte-order mark; anything else is one
    ``VocabularyError`` naming the line of the first undecodable byte.
    """
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VocabularyError(
            f"vocabulary file {path} does not exist; give a text file with one class per line"
        ) from None
    except OSError as error:
        raise VocabularyError(
            f"vocabulary file {path} cannot be read: {error.strerror or error}"
        ) from error
    # UTF-8, with or without the byte-order mark Windows editors write; UTF-16 with its mark
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else (
        "utf-8-sig")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise VocabularyError(
            f"vocabulary file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} on line "
            f"{line}); save it as UTF-8"
        ) from None
    classes: list[list[str]] = []
    positions: list[str] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        classes.append(_FILE_NAME_SEP.split(stripped))
        positions.append(f"class {len(classes)} (file {path}, line {line_number})")
    if not classes:
        raise VocabularyError(f"vocabulary file {path} has no class names")
    # clean here to name file and line in errors; the constructor's second pass is a no-op
    return Vocabulary(_clean_classes(classes, positions))


def as_vocabulary(
    x: Vocabulary | str | os.PathLike[str] | Sequence[str | Sequence[str]],
) -> Vocabulary:
    """Turn what a user passes as a vocabulary into a ``Vocabulary``.

    - ``Vocabulary``: returned as is;
    - ``str``: the inline syntax of ``parse_vocabulary``;
    - a path object (``pathlib.Path``): a class file, see ``read_vocabulary_file``;
    - a sequence: each item is one class, a string (one name) or a sequence of synonyms.
    """
    if isinstance(x, Vocabulary):
        return x
    if isinstance(x, str):
        return parse_vocabulary(x)
    if isinstance(x, os.PathLike):
        return read_vocabulary_file(x)
    if isinstance(x, Sequence):
        return Vocabulary(x)
    raise VocabularyError(
        f"cannot read a vocabulary from {type(x).__name__}; give a string like 'cat, dog', "
        "a list of names, a list of synonym lists or a class file path"
    )


