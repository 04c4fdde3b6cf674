"""The dataset converters given a file that is not what it claims to be: an archive that is text,
empty, truncated or damaged, one whose members escape the target folder, a ``.sens`` stream
that is not one. Each is one ``error:`` line naming the file, exit 2, and nothing extracted or
exported (issue 23, reliability)."""

from __future__ import annotations

import errno
import gzip
import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.scannet import build_scannet_scene, sens_bytes
from tests.helpers import load_script
from tests.robustness.scripts import files_under, one_error_line

ade847 = load_script("datasets/prepare_ade20k_847.py")
prepare_scannet = load_script("datasets/prepare_scannet.py")
import _prepare_common as common  # noqa: E402 (on the path once a prepare script is loaded)

ARCHIVE_NAME = "ADE20K_2021_17_01"
# a big member after a small one: damage in it shows only once the small one is extracted
SMALL, BIG = b"alpha" * 100, os.urandom(1 << 17)


def _members() -> dict[str, bytes]:
    return {f"{ARCHIVE_NAME}/index.txt": SMALL, f"{ARCHIVE_NAME}/images/big.bin": BIG}


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in _members().items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar_bytes(mode: str = "w:gz", links: tuple[tuple[str, str], ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in _members().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def _zip_with_bad_crc() -> bytes:
    data = bytearray(_zip_bytes())
    start = data.find(b"images/big.bin") + 200  # inside the big member's compressed data
    data[start : start + 64] = bytes(64)
    return bytes(data)


def _zip_with(name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{ARCHIVE_NAME}/ok.txt", b"ok")
        archive.writestr(zipfile.ZipInfo(name), b"evil")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("file_name", "make", "expected"),
    [
        ("ADE20K_2021_17_01.zip", lambda: b"this is a text file, not a zip\n",
         "is not a readable zip archive (File is not a zip file)"),
        ("ADE20K_2021_17_01.zip", lambda: b"", "is not a readable zip archive"),
        ("ADE20K_2021_17_01.zip", lambda: _zip_bytes()[: len(_zip_bytes()) // 2],
         "is not a readable zip archive"),
        ("ADE20K_2021_17_01.zip", _zip_with_bad_crc,
         f"at member '{ARCHIVE_NAME}/images/big.bin' (Bad CRC-32"),
        ("ADE20K_2021_17_01.tar.gz", lambda: b"this is a text file, not a tar\n",
         "is not a readable tar archive"),
        ("ADE20K_2021_17_01.tar.gz", lambda: gzip.compress(b"gzip, but no tar inside " * 40),
         "is not a readable tar archive"),
        ("ADE20K_2021_17_01.tar.gz", lambda: _tar_bytes()[: len(_tar_bytes()) // 2],
         "is not a readable tar archive"),
        ("ADE20K_2021_17_01.tar", lambda: _tar_bytes("w")[: len(_tar_bytes("w")) // 2],
         "is not a readable tar archive (unexpected end of data)"),
        ("ADE20K_2021_17_01.zip", lambda: _zip_with("../escaped.txt"),
         "refusing archive member '../escaped.txt'"),
        ("ADE20K_2021_17_01.zip", lambda: _zip_with("/tmp/ovseg-robustness-escaped.txt"),
         "absolute path"),
        ("ADE20K_2021_17_01.tar.gz", lambda: _tar_bytes(links=((f"{ARCHIVE_NAME}/out", "../.."),)),
         "points outside"),
        ("ADE20K_2021_17_01.tar.gz", lambda: _tar_bytes(links=((f"{ARCHIVE_NAME}/etc", "/etc"),)),
         "link to the absolute path '/etc'"),
    ],
    ids=["zip-text", "zip-empty", "zip-truncated", "zip-bad-crc", "tar-gz-text",
         "tar-gz-no-tar-inside", "tar-gz-truncated", "tar-truncated", "zip-member-dotdot",
         "zip-member-absolute", "tar-symlink-parent", "tar-symlink-absolute"],
)
def test_a_bad_archive_is_one_line_and_extracts_nothing(tmp_path, capsys, file_name, make,
                                                        expected):
    archive = tmp_path / "downloads" / file_name
    archive.parent.mkdir()
    archive.write_bytes(make())
    root = tmp_path / "datasets"
    assert ade847.main(["--root", str(root), "--archive", str(archive)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(archive) in line and expected in line
    assert files_under(root) == []  # not even the datasets root was left behind
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/ovseg-robustness-escaped.txt").exists()


def test_a_full_disk_while_extracting_removes_what_was_extracted(tmp_path, capsys, monkeypatch):
    archive = tmp_path / f"{ARCHIVE_NAME}.zip"
    archive.write_bytes(_zip_bytes())
    root = tmp_path / "datasets"
    (root / "other").mkdir(parents=True)  # the user's: must stay
    real_copy = common._copy_member

    def copy_until_full(source, sink, archive_path, name):
        if name.endswith("big.bin"):
            sink.write(source.read(1000))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(source, sink, archive_path, name)

    monkeypatch.setattr(common, "_copy_member", copy_until_full)
    assert ade847.main(["--root", str(root), "--archive", str(archive)]) == 1
    line = one_error_line(capsys.readouterr().err)
    big = root / ARCHIVE_NAME / "images" / "big.bin"
    assert line.startswith(f"error: no space left on device while writing {big};")
    assert files_under(root) == ["other"]


# --------------------------------------------------------------------------- .sens


def _sens_with_frame_count(count: int):
    def make(scene) -> bytes:
        data = bytearray(sens_bytes(scene))
        (name_length,) = struct.unpack_from("<Q", data, 4)
        struct.pack_into("<Q", data, 12 + name_length + 4 * 64 + 8 + 20, count)
        return bytes(data)

    return make


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda scene: b"ply\nformat ascii 1.0\nthis is no sensor stream\n",
         "is not a ScanNet .sens stream of version 4"),
        (lambda scene: b"", "is truncated: it ends inside the header"),
        (lambda scene: struct.pack("<IQ", 4, 1 << 40) + b"x" * 100,
         "is not a ScanNet .sens stream (sensor name of"),
        (lambda scene: sens_bytes(scene)[:300], "is truncated: it ends inside the header"),
        (_sens_with_frame_count(1000), "is truncated"),
    ],
    ids=["sens-text", "sens-empty", "sens-huge-name", "sens-header-cut", "sens-frame-count-lies"],
)
def test_a_bad_sens_stream_is_one_line_and_exports_nothing(tmp_path, capsys, make, expected):
    scene = build_scannet_scene(tmp_path / "scannet", num_frames=2, frame_step=1, layouts=(),
                                depth_size=(48, 64))
    sens = scene.scene_dir / f"{scene.scene_id}.sens"
    sens.write_bytes(make(scene))
    before = files_under(tmp_path)
    assert prepare_scannet.main(["--root", str(tmp_path), "--every", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(sens) in line and expected in line
    assert files_under(tmp_path) == before
