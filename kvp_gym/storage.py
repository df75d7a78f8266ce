"""Where kvp-gym keeps its files, and how it writes them safely.

Every file kvp-gym produces is written through :func:`atomic_path`: the data goes to a temporary name beside
the target and is renamed into place only when complete, so a crash never leaves a half-written file under
the final name.

Imports nothing from kvp_gym: every room that writes files builds on it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """The user cache folder: ``$KVP_GYM_CACHE`` if set, else ``~/.cache/kvp-gym`` (created on first use)."""
    root = Path(os.environ.get("KVP_GYM_CACHE") or Path.home() / ".cache" / "kvp-gym")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block ends without error.

    Works for files and folders. On an exception the temporary path is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            shutil.rmtree(target)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes; computed again only when its size or modification time changed."""
    info = os.stat(path)
    return _sha256(str(Path(path).resolve()), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime in the key: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
