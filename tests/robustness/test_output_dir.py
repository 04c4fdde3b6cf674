"""tools/train_net.py with an output_dir it cannot write: one ``error:`` line and exit 2 before
any process starts, nothing created (issue 23, reliability)."""

from __future__ import annotations

import errno
import os

import pytest

from ovseg.errors import WriteError
from ovseg.io import ensure_writable_dir
from tests.helpers import load_script
from tests.robustness.scripts import files_under, one_error_line

CONFIG = "configs/tiny/linear_probe_tiny.yaml"


@pytest.fixture(scope="module")
def train_net():
    return load_script("tools/train_net.py")


def _run(train_net, capsys, output_dir, *extra: str) -> tuple[int, str]:
    code = train_net.main(["--config-file", CONFIG, *extra, "output_dir", str(output_dir)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval-only"])
def test_an_existing_file_as_output_dir(train_net, capsys, tmp_path, eval_only):
    output = tmp_path / "run"
    output.write_text("not a folder")
    code, err = _run(train_net, capsys, output, *(["--eval-only"] if eval_only else []))
    assert code == 2
    assert f"output_dir {output} is a file, not a folder" in one_error_line(err)
    assert output.read_text() == "not a folder"


def test_an_output_dir_below_a_file(train_net, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = _run(train_net, capsys, tmp_path / "file" / "run")
    assert code == 2
    assert f"cannot create output_dir {tmp_path / 'file' / 'run'}" in one_error_line(err)
    assert files_under(tmp_path) == ["file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders; the simulated cases below "
                    "cover the error path")
def test_a_read_only_output_dir(train_net, capsys, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    output.chmod(0o500)
    try:
        code, err = _run(train_net, capsys, output)
    finally:
        output.chmod(0o700)
    assert code == 2
    assert f"output_dir {output} is not writable" in one_error_line(err)
    assert files_under(output) == []


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (errno.EACCES, "is not writable (Permission denied)"),
        (errno.EROFS, "is not writable (Read-only file system)"),
        (errno.ENOSPC, "no space left on device"),
    ],
    ids=["read-only-folder", "read-only-mount", "disk-full"],
)
def test_a_folder_that_refuses_files(train_net, capsys, tmp_path, monkeypatch, number, expected):
    # what a read-only folder does to a user who is not root, whoever runs the tests
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if ".ovseg-write-test-" in os.fspath(path):
            raise OSError(number, os.strerror(number), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    output = tmp_path / "new" / "run"
    code, err = _run(train_net, capsys, output)
    assert code == 2
    line = one_error_line(err)
    assert expected in line and str(output) in line
    assert files_under(tmp_path) == []  # the folders the check created are gone again


def test_the_python_check_is_a_write_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError) as info:
        ensure_writable_dir(tmp_path / "file", "output folder")
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)
    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert files_under(tmp_path) == ["a", "a/b", "file"]  # no probe file left
