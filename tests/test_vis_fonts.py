"""Tests of text in images (ovseg.vis.fonts): non-ASCII class names in legends and region labels
are drawn as themselves, a character no font has as "?" (issue 23)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import ovseg.vis.fonts as fonts
from ovseg.vis import draw_legend, draw_regions, palette
from ovseg.vis.fonts import FONT_ENV_VAR, draw_text, font_files, fonts_cover, text_style

# a private-use code point of plane 15: no font of a normal system draws it
NO_FONT_HAS_IT = "\U000f0000"


@pytest.fixture
def unicode_font() -> str:
    files = font_files()
    if not files:
        pytest.skip("no Unicode TrueType font on this machine (e.g. apt-get install "
                    "fonts-dejavu-core, or pip install matplotlib)")
    return files[0]


def _text(text: str, size: int = 20) -> np.ndarray:
    canvas = np.full((40, 200, 3), 255, dtype=np.uint8)
    return draw_text(canvas, text, (4, 28), (0, 0, 0), size)


def _columns_with_ink(image: np.ndarray) -> np.ndarray:
    return np.flatnonzero((image < 128).any(axis=(0, 2)))


@pytest.mark.parametrize("name", ["café", "Straße", "ёлка", "naïve", "Ελλάδα"],
                         ids=["latin-accent", "eszett", "cyrillic", "diaeresis", "greek"])
def test_non_ascii_is_drawn_not_a_placeholder(unicode_font, name: str) -> None:
    placeholder = "".join(c if c.isascii() else "?" for c in name)
    drawn, replaced = _text(name), _text(placeholder)
    assert fonts_cover(name)
    assert not np.array_equal(drawn, replaced)
    # the ASCII prefix is the same glyphs at the same place (a few pixels kept clear of the
    # next glyph, whose accents may overhang to the left)
    prefix = len(name) - len(name.lstrip("abcdefghijklmnopqrstuvwxyzS"))
    if prefix:
        cut = 4 + text_style(20).width(name[:prefix]) - 3
        np.testing.assert_array_equal(drawn[:, :cut], replaced[:, :cut])


def test_legend_draws_non_ascii_names(unicode_font) -> None:
    image = np.full((120, 80, 3), 90, dtype=np.uint8)

    def legend(names: list[str]) -> np.ndarray:
        # one palette for both, so only the text can differ
        return draw_legend(image, names, palette(["café", "ёлка"]), [0, 1])

    drawn, replaced = legend(["café", "ёлка"]), legend(["caf?", "????"])
    np.testing.assert_array_equal(drawn[:, :80], image)
    # the panel is as wide as the widest name: compare where both have pixels
    width = min(drawn.shape[1], replaced.shape[1])
    assert drawn.shape[0] == replaced.shape[0]
    assert not np.array_equal(drawn[:, :width], replaced[:, :width])


def test_ascii_text_is_drawn_as_itself(unicode_font) -> None:
    drawn = _text("cat")
    assert len(_columns_with_ink(drawn)) > 10
    assert not np.array_equal(drawn, _text("???"))
    assert fonts_cover("a plain ASCII name 123")


def test_a_character_no_font_has_is_a_question_mark(unicode_font) -> None:
    assert not fonts_cover(f"x{NO_FONT_HAS_IT}")
    np.testing.assert_array_equal(_text(f"x{NO_FONT_HAS_IT}"), _text("x?"))
    # CJK is drawn when the machine has a CJK font, else shown as "?" too
    if not fonts_cover("猫"):
        np.testing.assert_array_equal(_text("猫"), _text("?"))


def test_each_character_takes_the_first_font_that_has_it(
    unicode_font, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the same file under two names, the first made to lack "é"
    first, second = unicode_font, os.path.join(os.path.dirname(unicode_font), ".",
                                               os.path.basename(unicode_font))
    monkeypatch.setattr(fonts, "_has_glyph",
                        lambda path, char: not (path == first and char == "é"))
    style = fonts.TextStyle((first, second), 20)
    runs = style.runs("café au lait")
    assert [piece for _, piece in runs] == ["caf", "é", " au lait"]
    assert [font for font, _ in runs] == [style.fonts[0], style.fonts[1], style.fonts[0]]


def test_font_from_the_environment_comes_first(
    unicode_font, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = tmp_path / "Chosen.ttf"
    shutil.copyfile(unicode_font, chosen)
    not_a_font = tmp_path / "notes.ttf"
    not_a_font.write_text("not a font")
    monkeypatch.setenv(FONT_ENV_VAR, os.pathsep.join([str(not_a_font), str(chosen)]))
    files = font_files()
    assert files[0] == str(chosen) and str(not_a_font) not in files


def test_without_font_files_pil_default_draws_ascii(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fonts, "font_files", lambda: ())
    assert not fonts_cover("café") and fonts_cover("cafe")
    assert len(_columns_with_ink(_text("cat"))) > 5
    np.testing.assert_array_equal(_text("café"), _text("caf?"))
    image = np.zeros((30, 20, 3), dtype=np.uint8)
    out = draw_legend(image, ["café"], palette(["café"]), [0])
    assert out.shape[1] > 20 and (out[:, 20:] < 100).all(axis=-1).any()


def test_region_labels_draw_non_ascii(unicode_font) -> None:
    image = np.full((60, 120, 3), 200, dtype=np.uint8)
    drawn, _ = draw_regions(image, [[10, 10, 100, 50]], None, [0], ["ёлка"])
    replaced, _ = draw_regions(image, [[10, 10, 100, 50]], None, [0], ["????"])
    assert not np.array_equal(drawn, replaced)
