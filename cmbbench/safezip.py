"""Extracting a submitted ``.zip`` safely.

Every member is checked **before anything is extracted**: its name must be relative and stay
inside the destination (no absolute path, drive letter, ``..`` component or backslash tricks),
it must be a regular file or folder (no symbolic link or device), not encrypted, and the
archive's declared total uncompressed size and file count must be within the limits. A zip
that declares 10 GB is refused from its central directory alone. While extracting, the bytes
actually written are counted against each member's declared size (a lying header cannot
inflate past it).
"""

from __future__ import annotations

import logging
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InvalidSubmissionError

__all__ = ["MAX_FILES", "MAX_TOTAL_BYTES", "ZipPlan", "check_zip", "safe_extract"]

log = logging.getLogger(__name__)

#: Default limit on the declared total uncompressed size of a submission zip (bytes): 4 GiB.
MAX_TOTAL_BYTES = 4 * 1024 ** 3
#: Default limit on the number of members of a submission zip.
MAX_FILES = 20_000
_CHUNK = 1 << 20


@dataclass
class ZipPlan:
    """The checked members of an archive: ``(member, relative posix path)`` of files, folders,
    and the declared totals."""

    files: list[tuple[zipfile.ZipInfo, str]]
    folders: list[str]
    total_bytes: int


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _member_path(name: str, archive: Path) -> str:
    """The safe relative posix path of a member name, or raise."""
    raw = name.replace("\\", "/")
    if "\x00" in raw:
        raise InvalidSubmissionError(f"refused: member {name!r} has a NUL byte in its name",
                                     archive)
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise InvalidSubmissionError(f"refused: member {name!r} has an absolute path",
                                     archive)
    parts = [p for p in PurePosixPath(raw).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidSubmissionError(f"refused: member {name!r} leaves the folder (a '..' "
                                     "path component)", archive)
    return "/".join(parts)


def check_zip(path: str | Path, *, max_total_bytes: int = MAX_TOTAL_BYTES,
              max_files: int = MAX_FILES) -> ZipPlan:
    """Check every member of the archive without extracting anything.

    Raises
    ------
    InvalidSubmissionError
        Not a zip file, an unsafe member (path traversal, absolute path, link, device,
        encrypted), duplicate names, more than ``max_files`` members, or a declared total
        uncompressed size above ``max_total_bytes``; the message names the first problem.
    """
    archive = Path(path)
    if not archive.is_file():
        raise InvalidSubmissionError("zip file not found", archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidSubmissionError(f"not a readable zip archive ({exc})", archive) from None
    if len(infos) > max_files:
        raise InvalidSubmissionError(f"refused: {len(infos)} members, more than the limit of "
                                     f"{max_files}", archive)
    total = sum(int(i.file_size) for i in infos)
    if total > max_total_bytes:
        raise InvalidSubmissionError(
            f"refused: the archive declares {_fmt_bytes(total)} uncompressed, more than the "
            f"limit of {_fmt_bytes(max_total_bytes)} (nothing was extracted)", archive)
    files, folders, seen = [], [], set()
    for info in infos:
        mode = (info.external_attr >> 16) & 0xFFFF
        rel = _member_path(info.filename, archive)
        if info.flag_bits & 0x1:
            raise InvalidSubmissionError(f"refused: member {info.filename!r} is encrypted",
                                         archive)
        if mode and stat.S_ISLNK(mode):
            raise InvalidSubmissionError(f"refused: member {info.filename!r} is a symbolic "
                                         "link", archive)
        if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InvalidSubmissionError(f"refused: member {info.filename!r} is not a regular "
                                         "file or folder", archive)
        if not rel:
            continue
        key = rel.lower()
        if key in seen:
            raise InvalidSubmissionError(f"refused: member {rel!r} appears twice", archive)
        seen.add(key)
        if info.is_dir():
            folders.append(rel)
        else:
            files.append((info, rel))
    return ZipPlan(files=files, folders=folders, total_bytes=total)


def safe_extract(path: str | Path, dest: str | Path, *,
                 max_total_bytes: int = MAX_TOTAL_BYTES, max_files: int = MAX_FILES) -> Path:
    """Check (:func:`check_zip`), then extract the archive into ``dest`` (created; must be
    empty). A single top-level folder holding everything is returned as the content's root.

    Raises
    ------
    InvalidSubmissionError
        See :func:`check_zip`; also a member whose data exceeds its declared size or fails
        its CRC (the partial extraction is removed).
    """
    archive = Path(path)
    plan = check_zip(archive, max_total_bytes=max_total_bytes, max_files=max_files)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise InvalidSubmissionError("the extraction folder is not empty", out)
    root = out.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for rel in plan.folders:
                (root / rel).mkdir(parents=True, exist_ok=True)
            for info, rel in plan.files:
                target = (root / rel).resolve()
                if root not in target.parents:
                    raise InvalidSubmissionError(f"refused: member {info.filename!r} leaves "
                                                 "the folder", archive)
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as src, open(target, "xb") as dst:
                    while block := src.read(_CHUNK):
                        written += len(block)
                        if written > info.file_size:
                            raise InvalidSubmissionError(
                                f"refused: member {info.filename!r} holds more data than "
                                "it declares", archive)
                        dst.write(block)
    except InvalidSubmissionError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise InvalidSubmissionError(f"cannot extract the archive ({exc})", archive) from None
    entries = [p for p in root.iterdir() if p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root
