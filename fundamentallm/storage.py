"""Remote storage for datasets, run directories and the download cache, through fsspec.

A location is a local path or an fsspec URL (``s3://bucket/runs``, ``gs://...``, ``file:///...``,
``memory://...``; S3 and GCS need ``pip install s3fs`` / ``gcsfs``). Work always happens on local
disk, in a mirror of the remote location under the cache directory
(``~/.cache/fundamentallm/mirror``, or ``$FUNDAMENTALLM_CACHE_DIR/mirror``), and is copied up
when it is complete; readers copy down what the mirror lacks. So the rest of the library keeps
its local, atomic file handling, and object stores (which have no rename) never show a half
dataset:

- a directory is pushed file by file with its commit file (a dataset's ``manifest.json``) last,
  and a remote directory without its commit file counts as absent;
- a single file (a checkpoint) is one upload, which object stores make visible whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fundamentallm.errors import FundamentaLLMError


class StorageError(FundamentaLLMError):
    """A remote location cannot be read or written."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL whose filesystem is not this machine's (``file://`` counts as remote: it
    may be a network mount, and it is how the cross-process tests stand in for a bucket)."""
    text = str(location)
    return "://" in text and not re.match(r"^[A-Za-z]:\\", text)


def join(location: str | os.PathLike[str], *parts: str) -> str:
    text = str(location)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *parts])
    return str(Path(text, *parts))


def _fs(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: no filesystem for this URL ({exc})") from exc


def default_cache_dir() -> Path | str:
    """``$FUNDAMENTALLM_CACHE_DIR`` (a path, or an fsspec URL such as ``s3://bucket/cache``), else
    ``$XDG_CACHE_HOME/fundamentallm`` or ``~/.cache/fundamentallm``."""
    env = os.environ.get("FUNDAMENTALLM_CACHE_DIR")
    if env:
        return env if "://" in env else Path(env)
    return local_cache_dir()


def local_cache_dir() -> Path:
    """The cache on this machine: ``$FUNDAMENTALLM_CACHE_DIR`` when it is a path, else the XDG default."""
    env = os.environ.get("FUNDAMENTALLM_CACHE_DIR")
    if env and "://" not in env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fundamentallm"


def mirror_root() -> Path:
    """``$FUNDAMENTALLM_MIRROR_DIR``, else ``mirror/`` in the local cache directory."""
    env = os.environ.get("FUNDAMENTALLM_MIRROR_DIR")
    return Path(env) if env else local_cache_dir() / "mirror"


def local_mirror(url: str) -> Path:
    """The local place that stands for remote `url`: the mirror keeps the remote tree's shape, so
    the mirror of ``URL/best.pt`` is the mirror of ``URL`` joined with ``best.pt``."""
    protocol, _, rest = url.partition("://")
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    safe = [re.sub(r"[^A-Za-z0-9._=-]", "_", p)[:120] for p in parts]
    return mirror_root().joinpath(re.sub(r"[^a-z0-9+.-]", "_", protocol.lower()) or "url", *safe)


def local_path(location: str | os.PathLike[str]) -> Path:
    """Where to work on `location`: itself when local, its mirror when remote."""
    return local_mirror(str(location)) if is_remote(location) else Path(location)


def exists(location: str | os.PathLike[str]) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    fs, path = _fs(str(location))
    try:
        return bool(fs.exists(path))
    except OSError as exc:
        raise StorageError(f"{location}: cannot be reached ({exc})") from exc


def push_file(local: str | os.PathLike[str], url: str) -> None:
    """Upload one local file to `url` (one write: whole or absent on object stores)."""
    fs, path = _fs(url)
    try:
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(str(local), path)
    except OSError as exc:
        raise StorageError(f"{url}: cannot upload {local} ({exc})") from exc


def pull_file(url: str, local: str | os.PathLike[str]) -> Path:
    """Download `url` to `local`, atomically (a temporary name, then a rename)."""
    from fundamentallm.fsutil import atomic_path

    fs, path = _fs(url)
    try:
        with atomic_path(local) as tmp:
            fs.get_file(path, str(tmp))
    except FileNotFoundError as exc:
        raise StorageError(f"{url}: not found") from exc
    except OSError as exc:
        raise StorageError(f"{url}: cannot download ({exc})") from exc
    return Path(local)


def push_dir(local: str | os.PathLike[str], url: str, commit: str | None = None) -> None:
    """Upload the files of directory `local` to `url`, the file named `commit` last."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))
    files.sort(key=lambda p: p.relative_to(local).as_posix() == commit)
    for file in files:
        push_file(file, join(url, *file.relative_to(local).parts))


def pull_dir(url: str, local: str | os.PathLike[str], commit: str | None = None) -> Path:
    """Download remote directory `url` into `local` (published as a whole when complete).

    With `commit`, a remote directory lacking that file is refused as unfinished.
    """
    from fundamentallm.fsutil import publish_dir, staging_dir

    fs, root = _fs(url)
    root = root.rstrip("/")
    try:
        found = [p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith(".tmp-")]
    except OSError as exc:
        raise StorageError(f"{url}: cannot be listed ({exc})") from exc
    names = {p[len(root) + 1 :] for p in found}
    if not names:
        raise StorageError(f"{url}: not found (or empty)")
    if commit and commit not in names:
        raise StorageError(f"{url}: unfinished (no {commit}); it is being written, or its writer failed")
    local = Path(local)
    with staging_dir(local) as stage:
        for name in sorted(names):
            target = stage.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{root}/{name}", str(target))
            except OSError as exc:
                raise StorageError(f"{url}/{name}: cannot download ({exc})") from exc
        if local.exists():
            import shutil

            shutil.rmtree(local)
        publish_dir(stage, local)
    return local


def fetch(location: str | os.PathLike[str]) -> Path:
    """A local copy of the file at `location`: itself when local; when remote, downloaded afresh
    into the mirror (a remote checkpoint of the same name may have changed since)."""
    if not is_remote(location):
        return Path(location)
    return pull_file(str(location), local_mirror(str(location)))


def publish_dataset(dataset_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], data_dir: str) -> str:
    """Copy the dataset `dataset_dir` (inside the local `work_dir`) to the same place under the
    remote `data_dir`, its manifest last; a no-op when it is there already (datasets are
    content-addressed). Returns the remote dataset's URL, or `dataset_dir` itself when `data_dir`
    is local (the dataset is where training reads it)."""
    if not is_remote(data_dir):
        return str(dataset_dir)
    relative = Path(dataset_dir).resolve().relative_to(Path(work_dir).resolve())
    url = join(data_dir, *relative.parts)
    if not exists(join(url, "manifest.json")):
        push_dir(dataset_dir, url, commit="manifest.json")
    return url
