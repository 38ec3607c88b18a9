"""Atomic file output and content hashing.

Every artifact is first written under a temporary name in its final directory and then
renamed into place, so a reader sees either the whole file or none of it, even when the
writer is killed. Directories of several files are built in a temporary sibling
directory and published with one `rename`.

The threat handled is a process killed mid-write (SIGKILL, OOM, Ctrl-C), not power
loss: files are not fsync'ed, which would cost more than the rest of a data run.

Temporary names carry the writer's PID and host (``.tmp-<pid>@<host>~...``); the next
writer in the same directory removes those whose process is gone (`sweep_stale`), so a
killed run leaves nothing behind for long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"
"""Names starting with this are unfinished output; readers ignore them."""

log = logging.getLogger(__name__)
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
_OWNER = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)@([^~]+)~")


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}@{_HOST}~"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: str | os.PathLike[str]) -> list[str]:
    """Remove temporary files and directories in `directory` left by dead processes of this host."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        owner = _OWNER.match(entry.name)
        if owner is None or owner.group(2) != _HOST or _pid_alive(int(owner.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        removed.append(entry.path)
    if removed:
        log.info("removed %d unfinished file(s) left by killed runs in %s", len(removed), directory)
    return removed


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(value: Any) -> str:
    return sha256_bytes(canonical_json(value).encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    tmp = final.with_name(f"{_temp_prefix()}{uuid.uuid4().hex[:12]}~{final.name}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`, removed afterwards unless published.

    Build the content inside it, then call `publish_dir(staging, final)`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix()}{final.name}-", dir=final.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staging: Path, final: str | os.PathLike[str]) -> bool:
    """Rename the finished `staging` directory to `final`.

    Returns False, leaving `final` untouched, when another writer published it first;
    content-addressed directories with the same name hold the same content, so the
    caller can use the existing one.
    """
    final = Path(final)
    try:
        os.rename(staging, final)
    except OSError:
        if final.is_dir():
            return False
        raise
    return True
