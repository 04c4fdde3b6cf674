"""The web demo's logic without a browser: caches, downscaling, downloads, messages, configs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ovseg.errors import ConfigError, ImageReadError, VocabularyError
from ovseg.methods import METHODS
from tests.web.conftest import REPO, TINY_CLOC, TINY_DENSE_CLIP


@pytest.fixture
def demo(web, tmp_path: Path):
    # a small working size keeps these tests quick; downscaling has its own test
    web_demo = web.WebDemo(max_side=200, output_dir=tmp_path / "downloads")
    yield web_demo
    web_demo.close()


def _count_image_forwards(model) -> list[int]:
    """A one-item list counting the CLIP image-encoder forwards of ``model`` from now on."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    model.clip.register_forward_hook(count)
    return calls


def test_a_new_vocabulary_on_the_same_image_runs_no_encoder(web, demo, photo_file, monkeypatch):
    spec = web.ModelSpec(TINY_DENSE_CLIP)
    first = demo.segment(photo_file, "cat, wall; background, floor", spec)
    assert first.timing.model is not None and first.timing.encode is not None
    model, build_seconds = demo.model(spec)
    assert build_seconds is None  # built once, by the first request
    image_forwards = _count_image_forwards(model)
    text_calls = []
    encode_text = model.clip.encode_text
    monkeypatch.setattr(model.clip, "encode_text",
                        lambda prompts: text_calls.append(prompts) or encode_text(prompts))

    second = demo.segment(photo_file, "car, road; street", spec)
    assert image_forwards == [0]
    assert second.timing.model is None and second.timing.encode is None
    assert "cached (no encoder forward)" in second.timing.markdown()
    assert [row[0] for row in second.areas] != [] and {row[0] for row in second.areas} == {
        "car", "road"}
    assert text_calls  # a new vocabulary needs its text classifier once ...

    text_calls.clear()
    demo.segment(photo_file, "car, road; street", spec)
    assert image_forwards == [0] and text_calls == []  # ... and is kept per vocabulary


def test_another_image_is_encoded_again(web, demo, photo_file, tmp_path):
    spec = web.ModelSpec(TINY_DENSE_CLIP)
    demo.segment(photo_file, "cat, wall", spec)
    flipped = tmp_path / "flipped.png"
    Image.open(photo_file).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    image_forwards = _count_image_forwards(demo.model(spec)[0])
    assert demo.segment(flipped, "cat, wall", spec).timing.encode is not None
    assert image_forwards[0] > 0


def test_large_images_are_downscaled_with_a_note(web, tmp_path):
    demo = web.WebDemo(max_side=64, output_dir=tmp_path / "downloads")
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((100, 200, 3), 128, dtype=np.uint8)).save(path)
    image = demo.load_image(path)
    assert image.pixels.shape == (32, 64, 3) and image.scale == pytest.approx(0.32)
    assert "200x100" in image.note and "64x32" in image.note
    result = demo.segment(path, "cat, dog", web.ModelSpec(TINY_DENSE_CLIP))
    assert result.label_map.shape == (32, 64, 3)
    assert "Note: wide.png is 200x100; it was downscaled to 64x32" in result.message

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(small)
    assert demo.load_image(small).note == "" and demo.load_image(small).scale == 1.0


@pytest.mark.parametrize("vocabulary", ["", "   ", None])
def test_an_empty_vocabulary_is_one_message(web, demo, photo_file, vocabulary):
    with pytest.raises(VocabularyError) as caught:
        demo.segment(photo_file, vocabulary, web.ModelSpec(TINY_DENSE_CLIP))
    message = web.error_message(caught.value)
    assert message.startswith("**Error**: the vocabulary is empty")
    assert "\n" not in message and "Traceback" not in message


def test_no_image_or_not_an_image_is_one_message(web, demo, tmp_path):
    spec = web.ModelSpec(TINY_DENSE_CLIP)
    with pytest.raises(ImageReadError, match="no image: upload one"):
        demo.segment(None, "cat", spec)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageReadError) as caught:
        demo.segment(text, "cat", spec)
    message = web.error_message(caught.value)
    # named as the user knows it, not by the server's upload path
    assert message.startswith("**Error**: ") and "notes.png" in message
    assert str(tmp_path) not in message and "\n" not in message


def test_a_bug_is_one_line_on_the_page_and_a_traceback_in_the_log(web, caplog):
    try:
        raise KeyError("lost")
    except KeyError as error:
        message = web.error_message(error)
    assert message.startswith("**Error** (unexpected") and "KeyError: 'lost'" in message
    assert "\n" not in message
    assert any(record.exc_info for record in caplog.records)


def test_bad_config_fields_are_one_message(web, demo, photo_file):
    with pytest.raises(ConfigError, match="model.inference.no_such_key"):
        demo.segment(photo_file, "cat", web.ModelSpec.from_page(
            TINY_DENSE_CLIP, "", "model.inference.no_such_key 3", None))
    with pytest.raises(ConfigError, match="no config chosen"):
        web.ModelSpec.from_page(None, "", "", None)
    with pytest.raises(ConfigError, match="overrides"):
        web.ModelSpec.from_page(TINY_DENSE_CLIP, "", 'model.name "dense_clip', None)


def test_downloads_are_the_demo_cli_formats(web, demo, photo_file):
    result = demo.segment(photo_file, "cat, wall, floor", web.ModelSpec(TINY_DENSE_CLIP))
    labels = cv2.imread(str(result.labels_png), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint8 and labels.shape == result.label_map.shape[:2]
    assert labels.max() < 3
    summary = json.loads(result.summary_json.read_text())
    assert summary["image"] == "cat.png" and summary["classes"] == ["cat", "wall", "floor"]
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)
    assert [row[0] for row in result.areas][: len(summary["fractions"])] == list(
        summary["fractions"])
    assert sum(row[2] for row in result.areas) == labels.size
    # the overlay carries the legend beside the image
    assert result.overlay.shape[0] >= labels.shape[0]
    assert result.overlay.shape[1] > labels.shape[1]


def test_area_rows_list_absent_classes_last(web):
    labels = np.array([[1, 1, 1], [1, 0, 0]])
    assert web.area_rows(labels, ["cat", "dog", "sky"]) == [
        ["dog", 66.67, 4], ["cat", 33.33, 2], ["sky", 0.0, 0]]


def test_region_prompts_of_a_downscaled_image(web, tmp_path):
    demo = web.WebDemo(max_side=64, output_dir=tmp_path / "downloads")
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((100, 200, 3), 90, dtype=np.uint8)).save(path)
    prompts = web.RegionPrompts().add_click((150, 80), web.POINT_MODE)
    prompts = prompts.add_click((120, 90), web.BOX_MODE)
    assert prompts.corner == [120.0, 90.0] and "click the opposite corner" in prompts.describe()
    prompts = prompts.add_click((20, 10), web.BOX_MODE)
    assert prompts.boxes == [[20.0, 10.0, 120.0, 90.0]] and prompts.corner is None

    # the point (150, 80) lies outside the 64x32 image unless scaled with it (a PromptError)
    result = demo.classify_regions(path, "cat, dog; puppy", web.ModelSpec(TINY_CLOC), prompts)
    # listed in the uploaded file's pixels, as they were clicked
    assert [row[0] for row in result.rows] == ["box (20, 10, 120, 90)", "point (150, 80)"]
    assert all(row[1].count(",") == 1 for row in result.rows)  # top 2 of 2 classes
    assert result.image.shape == (32, 64, 3)
    assert result.message == "Classified 2 regions."


def test_region_prompts_need_a_method_with_them(web, demo, photo_file):
    prompts = web.RegionPrompts().add_click((5, 5), web.POINT_MODE)
    with pytest.raises(ConfigError, match="takes no point or box prompts"):
        demo.classify_regions(photo_file, "cat", web.ModelSpec(TINY_DENSE_CLIP), prompts)
    with pytest.raises(ConfigError, match="no region prompt yet"):
        demo.classify_regions(photo_file, "cat", web.ModelSpec(TINY_CLOC), web.RegionPrompts())


def test_models_are_kept_per_spec_and_the_oldest_goes(web, tmp_path):
    demo = web.WebDemo(max_models=1, output_dir=tmp_path / "downloads")
    tiny, other = web.ModelSpec(TINY_DENSE_CLIP), web.ModelSpec(TINY_CLOC)
    model, seconds = demo.model(tiny)
    assert seconds is not None and demo.model(tiny) == (model, None)
    demo.model(other)
    rebuilt, seconds = demo.model(tiny)
    assert rebuilt is not model and seconds is not None


def test_the_page_lists_every_registered_2d_method_with_its_configs(web):
    choices = web.list_configs()
    two_d = [name for name in METHODS if name != "clip2scene"]
    assert list(choices) == two_d
    assert web.left_off_methods() == ["clip2scene"]
    assert choices["dense_clip"][0].startswith("tiny/")  # runnable without weights: first
    assert TINY_CLOC in choices["cloc"] and "tiny/trident_tiny.yaml" in choices["trident"]
    every = [name for names in choices.values() for name in names]
    assert not [name for name in every if "train" in Path(name).stem]
    assert web.takes_region_prompts("cloc") and not web.takes_region_prompts("dense_clip")
    assert web.has_refinement("trident") and not web.has_refinement("cloc")


def test_config_names_are_relative_to_the_configs_folder(web):
    assert web.config_name(str(REPO / "configs" / TINY_CLOC)) == TINY_CLOC
    assert web.config_name(TINY_CLOC) == TINY_CLOC


def test_the_command_line_binds_to_this_machine_without_a_public_link(web):
    args = web.build_parser().parse_args(["--config-file", TINY_DENSE_CLIP,
                                          "model.inference.short_side", "64"])
    assert args.host == "127.0.0.1" and args.share is False
    assert args.opts == ["model.inference.short_side", "64"]
