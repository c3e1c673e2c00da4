"""Archives downloaded once into a cache, verified against their published checksum, and unpacked safely.

The cache is ``$SEPCONV_DATA`` if set, else the platform's user cache folder (``pooch.os_cache("sepconv")``:
``~/.cache/sepconv`` on Linux). pooch downloads (with retries, and a progress bar in a terminal) into a
temporary file beside the archive and moves it into place only once its checksum matches, so a wrong checksum,
a truncated body, an interrupted run or a full disk leaves no half-written file, and the next run downloads
again. The archive unpacks into a temporary folder that is renamed into place once complete; a member that
could land outside it (an absolute path, ``..``) or is not a plain file or folder (links, devices) rejects the
whole archive. Once the unpacked folder is there, later runs use it without the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from .._extras import require
from .data import DataError

__all__ = ["CACHE_VARIABLE", "cache_dir", "fetch_and_unpack"]

CACHE_VARIABLE = "SEPCONV_DATA"
RETRIES = 2  # pooch waits 1 s, then 2 s, between attempts


def cache_dir() -> Path:
    """``$SEPCONV_DATA``, else the platform's user cache folder for sepconv."""
    pooch = require("pooch", "experiment", "downloading a dataset")
    return Path(os.environ.get(CACHE_VARIABLE) or pooch.os_cache("sepconv"))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """pooch logs each attempt on stderr; the caller prints one line of its own instead."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(url: str, md5: str, archive: Path) -> None:
    pooch = require("pooch", "experiment", "downloading a dataset")
    fetcher = pooch.create(path=archive.parent, base_url="", registry={archive.name: f"md5:{md5}"},
                           urls={archive.name: url}, retry_if_failed=RETRIES)
    try:
        with _quiet(pooch.get_logger()):
            fetcher.fetch(archive.name, progressbar=sys.stderr.isatty())
    except Exception as error:  # network, HTTP status, checksum, disk: each leaves no file behind
        raise DataError(f"downloading {url} to {archive} failed ({type(error).__name__}: {_one_line(error)}); "
                        "nothing was kept, the next run downloads again") from None


def _safe_members(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            kind = "a link or special file" if not (member.isfile() or member.isdir()) else "outside the folder"
            raise DataError(f"{archive}: member {member.name!r} is {kind}; the archive is refused, nothing was "
                            "unpacked (delete it to download again)")
    return members


def _unpack(archive: Path, folder: str) -> Path:
    """Unpack ``archive`` (a tarball holding ``folder``) beside it; returns the unpacked ``folder``."""
    target = archive.parent / folder
    temporary = Path(tempfile.mkdtemp(dir=archive.parent, prefix=f".{folder}.", suffix=".tmp"))
    try:
        with tarfile.open(archive) as tar:
            members = _safe_members(archive, tar)
            # the data filter (Python >= 3.10.12) refuses the same members again, should the check above miss one
            tar.extractall(temporary, members=members,
                           **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if not (temporary / folder).is_dir():
            raise DataError(f"{archive} holds no {folder} folder; delete it to download again")
        if not target.is_dir():  # else another process (under torchrun) has unpacked it meanwhile
            os.replace(temporary / folder, target)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"cannot unpack {archive} ({type(error).__name__}: {_one_line(error)}); nothing was "
                        "unpacked, the next run tries again") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def fetch_and_unpack(url: str, md5: str, folder: str, echo=print) -> Path:
    """The folder ``folder`` of the tarball at ``url`` (MD5 ``md5``), unpacked in :func:`cache_dir`: from the cache
    if it is there, else downloaded, verified and unpacked first. Every failure is a one-line
    :class:`~sepconv.experiment.data.DataError` naming the URL or file."""
    cache = cache_dir()
    target = cache / folder
    if target.is_dir():
        return target
    archive = cache / PurePosixPath(url.split("?")[0]).name
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the data cache {cache} ({_one_line(error)}); set ${CACHE_VARIABLE} to a "
                        "writable folder") from None
    if not archive.is_file():
        echo(f"downloading {url} into {cache} (once; ${CACHE_VARIABLE} chooses the folder)")
    _download(url, md5, archive)  # a file already there is verified, and downloaded again if it does not match
    return _unpack(archive, folder)
