"""Files: written atomically, checkpoints loaded safely and checked against the digest they were saved with.

Writes go to a temporary file in the same folder, then ``os.replace``: an interrupted write (Ctrl-C, a crash, a
full disk) leaves the previous file, never half of a new one. A failed write is a :class:`WriteError` naming the
file. Checkpoints (:func:`save_checkpoint`) carry a SHA-256 digest of their content, so that
:func:`load_checkpoint` refuses a damaged file instead of resuming from it; they are read with
``torch.load(weights_only=True)``, which never runs pickled code, and every failure is one
:class:`CheckpointError` line that says what the file is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = ["WriteError", "CheckpointError", "PickledCheckpoint", "atomic_path", "atomic_save", "atomic_write_text",
           "save_checkpoint", "load_checkpoint", "payload_digest", "check_writable", "same_file",
           "machine_memory_bytes"]

DIGEST_KEY = "sha256"
# torch.save's legacy (pre-zip) files begin with this pickled magic number; newer ones are zip archives.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]


class WriteError(OSError):
    """A file that could not be written (read-only folder, full disk, ...); the message is one line naming it."""


class CheckpointError(ValueError):
    """A file that is not a readable, intact checkpoint; the message is one line naming it."""


class PickledCheckpoint(CheckpointError):
    """A PyTorch file that holds pickled Python objects besides tensors (loading them would run code)."""


def _reason(error: BaseException) -> str:
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    A failure to write (``OSError``, or the ``RuntimeError`` ``torch.save`` raises on a full disk) becomes a
    :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise WriteError(f"cannot write {path}: {_reason(error)}") from None
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions open() would
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError(f"cannot write {path}: {_reason(error)}") from None
        raise


def atomic_save(obj, path) -> None:
    """``torch.save`` that never leaves a partial file."""
    with atomic_path(path) as temporary:
        try:
            torch.save(obj, temporary)
        except RuntimeError as error:  # PyTorch's stream writer reports a full disk as a RuntimeError
            raise WriteError(f"cannot write {path}: {_reason(error)}") from None


def atomic_write_text(text: str, path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def _feed(hasher, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        hasher.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _feed(hasher, key)
            _feed(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(f"{type(value).__name__} {value!r};".encode())


def payload_digest(payload) -> str:
    """SHA-256 of a nested structure of dicts, lists, tuples, scalars and tensors (their bytes, dtype, shape)."""
    hasher = hashlib.sha256()
    _feed(hasher, payload)
    return hasher.hexdigest()


def save_checkpoint(payload: dict, path) -> None:
    """Save ``payload`` (a dict) atomically, together with its digest."""
    atomic_save({**payload, DIGEST_KEY: payload_digest(payload)}, path)


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        start = handle.read(len(_LEGACY_TORCH_MAGIC))
    return start == _LEGACY_TORCH_MAGIC or zipfile.is_zipfile(path)


def load_checkpoint(path, *, verify: bool = True):
    """``torch.load(path, weights_only=True)`` on the CPU, every failure one :class:`CheckpointError` line.

    ``verify``: the file must be a dict saved by :func:`save_checkpoint`, with the digest of its content; the
    digest is removed from the returned dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    if not _is_torch_file(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (a file written by torch.save)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PickledCheckpoint(f"{path} holds pickled Python objects besides tensors, which run code when "
                                "loaded") from None
    except Exception as error:  # a truncated or damaged archive: PyTorch's own words, on one line
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                              f"{_reason(error)[:200]})") from None
    if not verify:
        return content
    if not isinstance(content, dict) or DIGEST_KEY not in content:
        raise CheckpointError(f"{path} has no digest of its content: it was not saved by sepconv, or by an older "
                              "version")
    payload = {key: value for key, value in content.items() if key != DIGEST_KEY}
    if payload_digest(payload) != content[DIGEST_KEY]:
        raise CheckpointError(f"{path} is damaged: its content does not match the digest it was saved with")
    return payload


def same_file(first, second) -> bool:
    """Whether two paths name the same file: the same resolved path, or (both existing) the same inode."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(first, second)
    return False


def check_writable(path, what: str) -> None:
    """``ValueError`` unless ``path`` (a file or folder to create or replace) can be written: its nearest existing
    ancestor must be a writable folder. Checked before any work, so that nothing fails after it."""
    path = Path(os.path.abspath(path))
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path}: {ancestor} is a file, so no folder can be made there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write in {ancestor} (read-only or no permission)")


def machine_memory_bytes() -> int:
    """This machine's physical memory, for refusing work that clearly cannot fit before it starts."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
