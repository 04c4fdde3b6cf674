"""Tests of the palette, overlays, legends and the atomic output writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import ovseg.vis.writers as writers
from ovseg.vis import (
    atomic_path,
    class_color,
    class_fractions,
    draw_legend,
    overlay,
    palette,
    write_json,
    write_label_png,
    write_rgb_png,
)

# ---------------------------------------------------------------------------------- palette


def test_class_color_is_fixed() -> None:
    # pinned: a class must keep its colour across releases, not only across runs
    assert class_color("cat") == (209, 200, 39)
    assert class_color("cat") == class_color("cat")
    assert class_color("Traffic  light") == class_color("traffic light")
    assert all(isinstance(c, int) and 0 <= c <= 255 for c in class_color("sky"))


def test_class_color_same_in_other_processes() -> None:
    # Python's hash() of a str differs between processes (PYTHONHASHSEED); colours must not
    script = "from ovseg.vis import class_color; print(class_color('sky'), class_color('dog'))"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout.strip())
    assert outputs == {f"{class_color('sky')} {class_color('dog')}"}


def test_palette_matches_class_colors_across_vocabularies() -> None:
    colors = palette(["dog", "cat", "sky"])
    assert colors.shape == (3, 3) and colors.dtype == np.uint8
    assert tuple(colors[1]) == class_color("cat")
    np.testing.assert_array_equal(palette(["cat"])[0], colors[1])


def test_palette_colours_distinct() -> None:
    names = [f"class {i}" for i in range(1000)]
    colors = palette(names)
    assert len({tuple(row) for row in colors}) == len(names)
    np.testing.assert_array_equal(colors, palette(names))


def test_palette_resolves_exact_collisions_deterministically() -> None:
    # names equal up to case share class_color, so the second must be moved
    colors = palette(["Cat", "cat", "CAT"])
    assert tuple(colors[0]) == class_color("cat")
    assert len({tuple(row) for row in colors}) == 3
    np.testing.assert_array_equal(colors, palette(["Cat", "cat", "CAT"]))


# ---------------------------------------------------------------------------------- overlay


def test_overlay_blend_value() -> None:
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1, 1], [1, 0, -1]], dtype=np.int64)
    colors = np.array([[200, 0, 50], [0, 0, 0]], dtype=np.uint8)
    out = overlay(image, labels, colors, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [150, 50, 75])
    np.testing.assert_array_equal(out[0, 1], [50, 50, 50])
    np.testing.assert_array_equal(out[1, 2], [100, 100, 100])  # outside [0, C): untouched
    quarter = overlay(image, labels, colors, alpha=0.25)
    np.testing.assert_array_equal(quarter[0, 0], [125, 75, 88])  # 87.5 rounds to even
    np.testing.assert_array_equal(overlay(image, labels, colors, alpha=0.0), image)


def test_overlay_rejects_bad_shapes() -> None:
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="labels"):
        overlay(image, np.zeros((3, 2), dtype=np.int64), np.zeros((1, 3), np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, np.zeros((2, 3), dtype=np.int64), np.zeros((1, 3), np.uint8), 1.5)


@pytest.mark.parametrize("height", [12, 240, 1500])
def test_legend_widens_and_keeps_pixels(height: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, 200, 3), dtype=np.uint8)
    names = ["cat", "dog", "sky", "grass", "a rather long class name"]
    colors = palette(names)
    out = draw_legend(image, names, colors, present=[2, 0, 4])
    assert out.dtype == np.uint8
    assert out.shape[1] > image.shape[1] and out.shape[0] >= image.shape[0]
    np.testing.assert_array_equal(out[:height, :200], image)
    panel = out[:, 200:]
    # the swatches of the listed classes are drawn, the others are not
    for index in (2, 0, 4):
        assert np.all(panel == colors[index], axis=-1).any()
    assert not np.all(panel == colors[1], axis=-1).any()
    assert (panel < 100).all(axis=-1).any()  # dark text pixels


def test_legend_many_classes_use_columns() -> None:
    image = np.zeros((100, 50, 3), dtype=np.uint8)
    names = [f"c{i}" for i in range(40)]
    out = draw_legend(image, names, palette(names), present=range(40))
    assert out.shape[0] == 100  # more columns, not a taller image
    np.testing.assert_array_equal(out[:, :50], image)


def test_legend_nothing_present_and_bad_index() -> None:
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    np.testing.assert_array_equal(draw_legend(image, ["a"], palette(["a"]), []), image)
    with pytest.raises(ValueError, match="outside"):
        draw_legend(image, ["a"], palette(["a"]), [1])


# ---------------------------------------------------------------------------------- writers


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_label_png_is_8_bit_for_up_to_255_classes(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 254], [7, 7, 3]], dtype=np.int64)
    path = tmp_path / "l.png"
    write_label_png(path, labels, num_classes=255)
    assert Image.open(path).mode == "L"
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    assert _files(tmp_path) == ["l.png"]


def test_label_png_is_16_bit_for_300_classes(tmp_path: Path) -> None:
    labels = np.array([[0, 255, 256], [299, 298, 1]], dtype=np.int64)
    path = tmp_path / "l.png"
    write_label_png(path, labels, num_classes=300)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), labels)


def test_label_png_rejects_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        write_label_png(tmp_path / "l.png", np.array([[0, 3]]), num_classes=3)
    assert _files(tmp_path) == []


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    write_rgb_png(tmp_path / "o.png", image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), image)


def test_class_fractions() -> None:
    labels = np.array([[2, 2, 2], [0, 2, 0]], dtype=np.int64)
    fractions = class_fractions(labels, ["cat", "dog", "sky"])
    assert list(fractions) == ["sky", "cat"]  # only present, largest first
    assert fractions["sky"] == pytest.approx(4 / 6)
    assert sum(fractions.values()) == pytest.approx(1.0)
    random_labels = np.random.default_rng(0).integers(0, 7, (31, 17))
    assert sum(class_fractions(random_labels, list("abcdefg")).values()) == pytest.approx(1.0)


def test_write_json(tmp_path: Path) -> None:
    obj = {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(2), "p": tmp_path, "é": "ü"}
    write_json(tmp_path / "s.json", obj)
    back = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert back == {"n": 3, "x": 0.5, "a": [0, 1], "p": str(tmp_path), "é": "ü"}


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half of it")
        raise RuntimeError("disk full")
    assert _files(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    write_json(tmp_path / "s.json", {"version": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "s.json", {"version": object()})
    assert json.loads((tmp_path / "s.json").read_text()) == {"version": 1}
    assert _files(tmp_path) == ["s.json"]


def test_image_writer_failing_mid_way_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_write(path: Path, array: np.ndarray) -> None:
        path.write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise OSError("no space left on device")

    monkeypatch.setattr(writers, "_imwrite", half_write)
    with pytest.raises(OSError, match="no space"):
        write_label_png(tmp_path / "l.png", np.zeros((2, 2), dtype=np.int64), 2)
    with pytest.raises(OSError, match="no space"):
        write_rgb_png(tmp_path / "o.png", np.zeros((2, 2, 3), dtype=np.uint8))
    assert _files(tmp_path) == []


def test_interrupted_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "x.png") as temporary:
        temporary.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert _files(tmp_path) == []


def test_atomic_path_keeps_extension_and_folder(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "new" / "x.png") as temporary:
        assert temporary.parent == tmp_path / "new"
        assert temporary.suffix == ".png"
        temporary.write_bytes(b"ok")
    assert _files(tmp_path / "new") == ["x.png"]
