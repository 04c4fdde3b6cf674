"""Shared helpers of the dataset converters: command line, progress, atomic writes, safe extraction.

Every ``prepare_*.py`` script beside this file builds its command line with ``make_parser``,
lists its inputs with ``list_inputs`` (a missing folder is a one-line error naming it), turns
each input into a ``Job`` and hands the jobs to ``run_jobs``, which shows a progress bar and
skips jobs whose outputs all exist (so a second run does nothing and an interrupted run
resumes). Outputs are written through ``ovseg.vis.writers.atomic_path``: a temporary file in
the destination folder renamed over the destination, so a kill never leaves a half file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import lzma
import os
import shutil
import stat
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import IO

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from ovseg.errors import OvsegError
from ovseg.vis.writers import atomic_path

DATASETS_ENV = "OVSEG_DATASETS"
# exit status of a command whose input is missing or wrong (argparse uses 2 for bad flags too)
EXIT_INPUT_ERROR = 2
# exit status when writing fails (disk full, permissions): not the user's input at fault
EXIT_WRITE_ERROR = 1


class PrepareError(OvsegError):
    """A converter's input is missing or wrong; the command prints it as one line, exits 2."""


def default_root() -> Path:
    """The datasets root: ``$OVSEG_DATASETS`` where set, else ``./datasets``."""
    return Path(os.environ.get(DATASETS_ENV) or "datasets")


def make_parser(
    description: str, splits: Sequence[str] = ("val", "train")
) -> argparse.ArgumentParser:
    """The flags every converter shares: ``--root``, ``--split`` (first of ``splits`` by default)
    and ``--overwrite``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"datasets root (default: ${DATASETS_ENV}, else ./datasets)",
    )
    parser.add_argument("--split", choices=list(splits), default=splits[0], help="split to convert")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="convert again even where the output files exist (default: skip them)",
    )
    return parser


def resolve_root(args: argparse.Namespace) -> Path:
    """``--root`` if given, else ``default_root()``."""
    return Path(args.root) if args.root is not None else default_root()


def run_command(
    parser: argparse.ArgumentParser,
    convert: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv`` and run ``convert``; a ``PrepareError`` or ``OSError`` becomes one line.

    Returns:
        0 on success, 2 for a missing or wrong input, 1 when writing failed.
    """
    args = parser.parse_args(argv)
    try:
        convert(args)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    return 0


# ---------------------------------------------------------------------------------- inputs


def require_dir(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a folder, else a ``PrepareError`` naming it and how to get it."""
    if not path.is_dir():
        raise PrepareError(f"{what} not found: expected the folder {path} ({hint})")
    return path


def require_file(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a file, else a ``PrepareError`` naming it and how to get it."""
    if not path.is_file():
        raise PrepareError(f"{what} not found: expected the file {path} ({hint})")
    return path


def list_inputs(folder: Path, pattern: str, what: str, hint: str) -> list[Path]:
    """The files under ``folder`` (recursively) whose names match ``pattern``, sorted.

    Raises:
        PrepareError: when the folder is missing or holds no matching file.
    """
    require_dir(folder, what, hint)
    files = sorted(path for path in folder.rglob(pattern) if path.is_file())
    if not files:
        raise PrepareError(f"{what} not found: no {pattern} files under {folder} ({hint})")
    return files


# ---------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One unit of work: ``convert()`` writes every file in ``outputs``."""

    outputs: tuple[Path, ...]
    convert: Callable[[], None]


def run_jobs(jobs: Sequence[Job], description: str, overwrite: bool = False) -> tuple[int, int]:
    """Run the jobs with a progress bar, skipping those whose outputs all exist.

    The final files are only ever created by an atomic rename, so an existing output is
    complete; checking existence is enough to resume an interrupted run.

    Returns:
        (jobs run, jobs skipped).
    """
    written = skipped = 0
    for job in tqdm(jobs, desc=description, unit="file", dynamic_ncols=True):
        if not overwrite and all(path.is_file() for path in job.outputs):
            skipped += 1
            continue
        job.convert()
        written += 1
    print(f"{description}: converted {written}, skipped {skipped} already done")
    return written, skipped


# ---------------------------------------------------------------------------------- writers


def _imwrite(path: Path, array: np.ndarray) -> None:
    # cv2.imwrite reports failure by returning False, not by raising
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")


def write_uint8_png(path: Path, labels: np.ndarray) -> None:
    """Write (H, W) uint8 labels as a single-channel PNG, atomically."""
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(
            f"labels have shape {labels.shape}, dtype {labels.dtype}; want (H, W) uint8"
        )
    with atomic_path(path) as temporary:
        _imwrite(temporary, np.ascontiguousarray(labels))


def write_uint16_tif(path: Path, labels: np.ndarray) -> None:
    """Write (H, W) uint16 labels as a 16-bit TIFF, atomically, and check it reads back 16-bit.

    The read-back check is why this exists: a label file that silently became 8-bit would
    break every class above 255 (and the 65535 ignore value) without any error.
    """
    if labels.ndim != 2 or labels.dtype != np.uint16:
        raise ValueError(
            f"labels have shape {labels.shape}, dtype {labels.dtype}; want (H, W) uint16"
        )
    labels = np.ascontiguousarray(labels)
    with atomic_path(path) as temporary:
        _imwrite(temporary, labels)
        back = cv2.imread(str(temporary), cv2.IMREAD_UNCHANGED)
        if back is None or back.dtype != np.uint16 or not np.array_equal(back, labels):
            raise OSError(f"{path} did not read back as the uint16 labels just written")


def write_jpeg(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) RGB or (H, W) gray uint8 image as JPEG, atomically.

    PIL's encoder at its default quality (75) is what the reference ADE-847 preparation
    used, so images re-saved here match the ones published numbers were measured on.
    """
    with atomic_path(path) as temporary:
        Image.fromarray(image).save(temporary, format="JPEG")


def write_text(path: Path, text: str) -> None:
    """Write a small UTF-8 text file, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def read_label_image(path: Path) -> np.ndarray:
    """Read a single-channel 8-bit label PNG as an (H, W) uint8 array, unchanged."""
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise PrepareError(f"cannot read the label image {path}")
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise PrepareError(
            f"{path} has shape {labels.shape} and dtype {labels.dtype}; expected a "
            "single-channel 8-bit label image"
        )
    return labels


def remap_label_png(source: Path, output: Path, table: np.ndarray) -> None:
    """Read an 8-bit label PNG, map every value ``v`` to ``table[v]``, write it atomically."""
    write_uint8_png(output, table[read_label_image(source)])


def lookup_table(mapping: dict[int, int], size: int, fill: int, dtype: type) -> np.ndarray:
    """A (size,) array, ``mapping[k]`` at ``k`` and ``fill`` elsewhere: ``table[labels]`` maps."""
    table = np.full(size, fill, dtype=dtype)
    for source, target in mapping.items():
        table[source] = target
    return table


# ---------------------------------------------------------------------------------- archives

# what reading a damaged, truncated or mislabelled archive raises (gzip and bz2: OSError)
_ARCHIVE_READ_ERRORS = (
    zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
    NotImplementedError, UnicodeDecodeError, OSError,
)


def _damaged(archive: Path, error: BaseException, member: str = "") -> PrepareError:
    """The one-line error for an archive that cannot be read (at ``member``, if known)."""
    text = str(error).strip()
    reason = text.splitlines()[0].rstrip(":") if text else type(error).__name__
    kind = "zip" if archive.name.lower().endswith(".zip") else "tar"
    where = f" at member {member!r}" if member else ""
    return PrepareError(
        f"{archive} is not a readable {kind} archive{where} ({reason}); it is damaged, "
        "truncated or another file under this name: download it again"
    )


@dataclass(frozen=True)
class _Member:
    """One archive entry, reduced to what extraction needs."""

    parts: tuple[str, ...]  # path inside the archive, split and normalised
    kind: str  # "file", "dir", "symlink" or "hardlink"
    size: int
    link: str  # symlink target (relative to its folder) or hardlink source (archive path)
    open: Callable[[], IO[bytes]] | None  # file contents (regular files only)


def _is_absolute(path: str) -> bool:
    # backslashes and drive letters too: an archive made on Windows may carry them
    return path.startswith(("/", "\\")) or bool(PureWindowsPath(path).drive)


def _path_steps(path: str) -> list[str]:
    """The components of an archive path, ``\\`` taken as ``/``, empty and ``.`` dropped."""
    return [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]


def _split_member_name(name: str) -> tuple[str, ...]:
    """Split an archive path; raise if it is absolute or climbs with ``..``."""
    if _is_absolute(name):
        raise PrepareError(f"refusing archive member {name!r}: absolute path")
    parts = tuple(_path_steps(name))
    if ".." in parts:
        raise PrepareError(f"refusing archive member {name!r}: '..' escapes the target folder")
    return parts


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        parts = _split_member_name(info.filename)
        mode = info.external_attr >> 16
        if info.is_dir():
            yield _Member(parts, "dir", 0, "", None)
        elif stat.S_ISLNK(mode):
            # a zip stores a symlink as a small file whose contents are the target
            target = archive.read(info).decode("utf-8")
            yield _Member(parts, "symlink", 0, target, None)
        else:
            yield _Member(parts, "file", info.file_size, "", lambda info=info: archive.open(info))


def _tar_members(archive: tarfile.TarFile) -> Iterator[_Member]:
    for info in archive.getmembers():
        parts = _split_member_name(info.name)
        if info.isdir():
            yield _Member(parts, "dir", 0, "", None)
        elif info.issym():
            yield _Member(parts, "symlink", 0, info.linkname, None)
        elif info.islnk():
            yield _Member(parts, "hardlink", 0, info.linkname, None)
        elif info.isreg():
            yield _Member(parts, "file", info.size, "", lambda info=info: archive.extractfile(info))
        else:
            raise PrepareError(f"refusing archive member {info.name!r}: not a file, folder or link")


def _is_inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _check_members(members: Sequence[_Member], target: Path) -> None:
    """Refuse the whole archive if any member would land or point outside ``target``.

    Paths were already checked for absolute names and ``..``; here links are: a link
    target must stay inside, no member may pass through a link the archive itself
    creates (that is how ``d -> .`` followed by ``d/../x`` escapes), and folders that
    already exist on disk are resolved, so a symlink already there cannot redirect a write.
    """
    root = os.path.realpath(target)
    # nothing is created while checking, so resolved folders can be cached (archives with
    # many thousand files share few folders)
    realpath = functools.lru_cache(maxsize=None)(os.path.realpath)
    links = {member.parts for member in members if member.kind in ("symlink", "hardlink")}
    for member in members:
        name = "/".join(member.parts)
        for depth in range(1, len(member.parts)):
            if member.parts[:depth] in links:
                raise PrepareError(f"refusing archive member {name!r}: it passes through a link")
        if member.parts:
            parent = realpath(os.path.join(root, *member.parts[:-1]))
            if not _is_inside(os.path.join(parent, member.parts[-1]), root):
                raise PrepareError(
                    f"refusing archive member {name!r}: an existing link on disk redirects it "
                    f"outside {target}"
                )
        if member.kind not in ("symlink", "hardlink"):
            continue
        if _is_absolute(member.link):
            raise PrepareError(
                f"refusing archive member {name!r}: link to the absolute path {member.link!r}"
            )
        # a symlink target is relative to the link's folder, a hard link's to the archive root
        start = member.parts[:-1] if member.kind == "symlink" else ()
        # walk the link target one component at a time so '..' after a link is caught
        walked = list(start)
        steps = _path_steps(member.link)
        for index, step in enumerate(steps):
            if step == "..":
                if not walked:
                    raise PrepareError(
                        f"refusing archive member {name!r}: link to {member.link!r} points "
                        f"outside {target}"
                    )
                walked.pop()
                continue
            walked.append(step)
            if index < len(steps) - 1 and tuple(walked) in links:
                raise PrepareError(f"refusing archive member {name!r}: link through a link")
        resolved = os.path.realpath(os.path.join(root, *walked))
        if not _is_inside(resolved, root):
            raise PrepareError(
                f"refusing archive member {name!r}: link to {member.link!r} points outside {target}"
            )


def _same_size_file(path: Path, size: int) -> bool:
    # a complete earlier extraction has the right size; atomic writes never leave a short one
    return path.is_file() and not path.is_symlink() and path.stat().st_size == size


def _make_dirs(folder: Path, created: list[Path]) -> None:
    """``mkdir -p folder``, adding the folders it creates to ``created`` (outermost first)."""
    missing = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
    folder.mkdir(parents=True, exist_ok=True)
    created.extend(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    """Undo an extraction that failed: remove what it created, innermost first."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only when empty: never a folder that held files before
            else:
                path.unlink()


def _copy_member(source: IO[bytes], sink: IO[bytes], archive: Path, name: str) -> None:
    """Copy a member's data; reading errors (a damaged archive) become a PrepareError, while
    writing errors (a full disk) stay what they are."""
    while True:
        try:
            block = source.read(1 << 20)
        except _ARCHIVE_READ_ERRORS as error:
            raise _damaged(archive, error, name) from None
        if not block:
            return
        sink.write(block)


def _extract_member(member: _Member, target: Path, archive: Path, created: list[Path]) -> None:
    destination = target.joinpath(*member.parts)
    if member.kind == "dir":
        _make_dirs(destination, created)
        return
    _make_dirs(destination.parent, created)
    existed = os.path.lexists(destination)
    if member.kind == "symlink":
        if destination.is_symlink() and os.readlink(destination) == member.link:
            return
        if destination.is_symlink() or destination.is_file():
            destination.unlink()
        os.symlink(member.link, destination)
        if not existed:
            created.append(destination)
        return
    if member.kind == "hardlink":
        # a copy, not os.link, so it is written atomically and skipped on a rerun like any file
        source = target.joinpath(*_split_member_name(member.link))
        if _same_size_file(destination, source.stat().st_size):
            return
        with atomic_path(destination) as temporary:
            shutil.copyfile(source, temporary)
        if not existed:
            created.append(destination)
        return
    if _same_size_file(destination, member.size):
        return
    assert member.open is not None
    name = "/".join(member.parts)
    try:
        opened = member.open()
    except _ARCHIVE_READ_ERRORS as error:
        raise _damaged(archive, error, name) from None
    with opened as source, atomic_path(destination) as temporary:
        with open(temporary, "wb") as sink:
            _copy_member(source, sink, archive, name)
    if not existed:
        created.append(destination)


@contextlib.contextmanager
def _archive_members(archive: Path) -> Iterator[list[_Member]]:
    """The members of an open ``.zip`` or ``.tar[.gz|.bz2|.xz]``, readable inside the block."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        open_archive, list_members = functools.partial(zipfile.ZipFile, archive), _zip_members
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        open_archive = functools.partial(tarfile.open, archive, "r:*")
        list_members = _tar_members
    else:
        raise PrepareError(
            f"cannot extract {archive}: expected a .zip, .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz"
        )
    # listing reads a zip's central directory and walks a whole tar: a text file under an
    # archive's name, or a truncated download, fails here, before anything is written
    try:
        opened = open_archive()
    except _ARCHIVE_READ_ERRORS as error:
        raise _damaged(archive, error) from None
    with opened:
        try:
            members = list(list_members(opened))
        except _ARCHIVE_READ_ERRORS as error:
            raise _damaged(archive, error) from None
        yield members


def extract_archive(archive: Path, target: Path) -> int:
    """Extract a ``.zip`` or ``.tar[.gz|.bz2|.xz]`` into ``target``, safely and resumably.

    Every member is checked before anything is written: an absolute path, a ``..``
    component, a link pointing outside ``target`` or a member passing through a link makes
    the whole archive a ``PrepareError`` with nothing extracted. A file that is not an
    archive, or a damaged or truncated one, is a ``PrepareError`` too; when the damage shows
    only while extracting (a member's data fails its CRC), or writing fails (a full disk),
    what this call created is removed again. Files already extracted (same size) are skipped,
    so an interrupted (Ctrl-C) extraction resumes; each file is written atomically.

    Returns:
        the number of members in the archive.
    """
    require_file(archive, "archive", "check the path given to --archive")
    try:
        with _archive_members(archive) as members:
            _check_members(members, target)
            created: list[Path] = []
            try:
                _make_dirs(target, created)
                for member in tqdm(members, desc=f"extracting {archive.name}", unit="file"):
                    _extract_member(member, target, archive, created)
            except Exception:
                # not on Ctrl-C: an interrupted extraction keeps its files to resume from
                _remove_created(created)
                raise
    except PrepareError as error:
        if str(archive) in str(error):
            raise
        raise PrepareError(f"{archive}: {error}") from None  # which archive refused
    return len(members)
