"""Files written atomically: a temporary file in the same folder, then ``os.replace``.

An interrupted write (Ctrl-C, a crash, a full disk) leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions open() would
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_save(obj, path) -> None:
    """``torch.save`` that never leaves a partial file."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def atomic_write_text(text: str, path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
