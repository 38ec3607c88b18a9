"""Corpus sources: local files and directories, http(s) downloads and built-in corpora.

A source is named by one string:

- a path to a file, or to a directory read recursively (filtered by include/exclude globs);
- an ``http://`` or ``https://`` URL, downloaded once into a cache; a fragment
  ``#sha256=<hex>`` pins the content, checked before the file is used. Credentials in the
  URL (``https://user:token@host/file``) are sent as HTTP basic authentication and never
  shown: the document's source label, log lines and error messages name the URL as
  ``https://***@host/file``;
- a built-in corpus name: ``default`` (the English reference text CPython ships in
  ``pydoc_data.topics``, present wherever Python is), ``tinyshakespeare`` (the classic
  1,115,394-byte file, fetched from its well-known URL with its sha256 pinned) or ``enwik8``
  (the first 100,000,000 bytes of an English Wikipedia XML dump, from Matt Mahoney's Large
  Text Compression Benchmark: a zip downloaded once, its one member extracted into the cache
  and checked against the pinned size and sha256). ``tinyshakespeare=LOCATION`` and
  ``enwik8=LOCATION`` read them from a local path (for enwik8 the file or the zip) or another
  URL instead, still checked against the pinned hash. Write ``./default`` for a file that is
  called ``default``.

Resolution yields `RawDocument`s (a source label and the raw bytes) lazily, one at a time,
so a large directory is never held in memory at once; given `part_bytes`, a local file larger
than that is yielded as a `RawFile` (its path, not its bytes), which ingestion reads in parts.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fundamentallm import storage
from fundamentallm.errors import CorpusError, DownloadError
from fundamentallm.fsutil import atomic_path, sha256_file
from fundamentallm.redact import mask_credentials

log = logging.getLogger(__name__)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
# sha256 of the unzipped file `enwik8`. Not computed here (this project's machines cannot reach
# mattmahoney.net): it is the value stated, as the digest of the 100,000,000-byte file, in the
# code of four unrelated public repositories (one names it OFFICIAL_ENWIK8_SHA256, one gives
# it beside the zip's 547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc).
# The zip is not pinned: mirrors have re-packed it; the extracted file is what must not change.
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
ENWIK8_SPLIT_BYTES = (90_000_000, 5_000_000)
"""The standard enwik8 split: the first 90,000,000 bytes train, the next 5,000,000 validation,
the last 5,000,000 test (`EncodeConfig.split = "bytes"`)."""

BUILTIN_CORPORA: dict[str, str] = {
    "default": "English reference documentation shipped with CPython (pydoc_data.topics, ~465,000 characters, "
    "one document per topic); needs no download.",
    "tinyshakespeare": "Tiny Shakespeare, 1,115,394 characters (Karpathy's char-rnn); downloaded once and "
    "checked against its pinned sha256. tinyshakespeare=PATH_OR_URL reads a local copy.",
    "enwik8": "enwik8, the first 100,000,000 bytes of English Wikipedia (Hutter Prize / Large Text Compression "
    "Benchmark); the zip is downloaded once and the file checked against its pinned size and sha256. "
    "enwik8=PATH_OR_URL reads a local copy (the file or the zip). Its standard split is --split bytes.",
}

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RawDocument:
    """Undecoded content of one document and where it came from."""

    source: str
    data: bytes


@dataclass(frozen=True)
class RawFile:
    """A local file too large to read at once (over `part_bytes`): ingestion reads it in parts."""

    source: str
    path: Path
    size: int


@dataclass(frozen=True)
class SkippedSource:
    source: str
    reason: str


def is_url(spec: str) -> bool:
    return "://" in spec


def split_builtin(spec: str) -> tuple[str, str | None] | None:
    """Return (name, location override) when `spec` names a built-in corpus, else None."""
    name, sep, location = spec.partition("=")
    if name in BUILTIN_CORPORA:
        return name, (location if sep else None)
    return None


# Downloads ------------------------------------------------------------------------------


def _split_credentials(url: str) -> tuple[str, str | None]:
    """The URL without user:password, and the HTTP basic ``Authorization`` value they make (or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(pair).decode("ascii")


def parse_pinned_url(url: str) -> tuple[str, str | None]:
    """Split ``URL#sha256=<hex>`` into the URL and the lower-case hex digest (or None)."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return base, None
    key, _, value = fragment.partition("=")
    value = value.strip().lower()
    if key != "sha256" or not _SHA256_HEX.match(value):
        raise CorpusError(
            f"{mask_credentials(url)}: the URL fragment must be #sha256=<64 hex digits> to pin the content"
        )
    return base, value


def _cache_name(url: str) -> str:
    # Keyed by the whole URL, so two URLs with the same file name never share an entry;
    # the readable tail is sanitised so nothing from the URL can leave the cache directory.
    tail = Path(urllib.parse.urlsplit(url).path).name or "download"
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", tail).lstrip(".")[:80] or "download"
    return f"{hashlib.sha256(url.encode('utf-8')).hexdigest()[:16]}-{tail}"


def download(
    url: str,
    cache_dir: Path | str,
    *,
    sha256: str | None = None,
    max_bytes: int = 1 << 30,
    timeout_s: float = 60.0,
) -> Path:
    """Return a cached local copy of `url`, downloading it if absent.

    Only http(s) is accepted. The body is streamed into a temporary file, checked for
    truncation (against Content-Length), size (`max_bytes`) and, when given, `sha256`,
    then renamed into the cache; a failed download leaves nothing behind. Credentials in
    the URL are sent as basic authentication (never to a host it redirects to) and are
    masked in every message. A server error (5xx, 408, 425, 429) or a network failure raises
    `DownloadError`, worth a retry; any other refusal (404, 401, ...) a plain `CorpusError`.
    """
    label = mask_credentials(url)
    url, authorization = _split_credentials(url)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise CorpusError(f"{label}: only http:// and https:// URLs can be downloaded")
    # A remote cache (an fsspec URL) is used through its local mirror: fetched from when it
    # holds the file, added to after a good download.
    remote = storage.join(cache_dir, "downloads", _cache_name(url)) if storage.is_remote(cache_dir) else None
    target = storage.local_path(cache_dir) / "downloads" / _cache_name(url)
    if remote is not None and not target.is_file() and storage.exists(remote):
        storage.pull_file(remote, target)
    if target.is_file():
        if sha256 is None or sha256_file(target) == sha256:
            log.info("using cached download of %s (%s)", label, target)
            return target
        log.warning("cached copy of %s does not match the pinned sha256; downloading again", label)
    log.info("downloading %s", label)
    request = urllib.request.Request(url, headers={"User-Agent": "fundamentallm"})
    if authorization:
        request.add_unredirected_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, atomic_path(target) as tmp:
            expected = response.headers.get("Content-Length")
            expected_bytes = int(expected) if expected and expected.isdigit() else None
            if expected_bytes is not None and expected_bytes > max_bytes:
                raise CorpusError(
                    f"{label}: {expected_bytes:,} bytes is more than the {max_bytes:,}-byte download limit"
                )
            digest = hashlib.sha256()
            received = 0
            with open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    received += len(block)
                    if received > max_bytes:
                        raise CorpusError(f"{label}: more than the {max_bytes:,}-byte download limit")
                    digest.update(block)
                    out.write(block)
            if expected_bytes is not None and received != expected_bytes:
                raise DownloadError(f"{label}: truncated download, got {received:,} of {expected_bytes:,} bytes")
            actual = digest.hexdigest()
            if sha256 is not None and actual != sha256:
                raise CorpusError(f"{label}: sha256 mismatch, expected {sha256}, got {actual}")
    except urllib.error.HTTPError as exc:
        transient = exc.code >= 500 or exc.code in (408, 425, 429)
        raise (DownloadError if transient else CorpusError)(
            f"{label}: download failed with HTTP {exc.code} {exc.reason}"
        ) from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"{label}: cannot download ({exc.reason})") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"{label}: download failed ({exc})") from exc
    if remote is not None:
        storage.push_file(target, remote)
    return target


# Built-in corpora -----------------------------------------------------------------------


def _default_corpus() -> Iterator[RawDocument]:
    try:
        from pydoc_data.topics import topics  # CPython's own reference text, in the standard library
    except ImportError as exc:  # some distributions split pydoc_data into its own package
        raise CorpusError(
            "the built-in 'default' corpus needs the standard library module pydoc_data, "
            "which this Python installation lacks; give a file, directory or URL instead"
        ) from exc
    for name in sorted(topics):
        yield RawDocument(f"builtin:default/{name}", topics[name].encode("utf-8"))


def _tinyshakespeare(
    location: str | None, cache_dir: Path | str, max_bytes: int, timeout_s: float
) -> Iterator[RawDocument]:
    if location is None or is_url(location):
        url = location or TINYSHAKESPEARE_URL
        path = download(url, cache_dir, sha256=TINYSHAKESPEARE_SHA256, max_bytes=max_bytes, timeout_s=timeout_s)
        data = path.read_bytes()
    else:
        data = _read_file(Path(location), max_bytes)
        actual = hashlib.sha256(data).hexdigest()
        if actual != TINYSHAKESPEARE_SHA256:
            raise CorpusError(
                f"{location}: not the Tiny Shakespeare file (sha256 {actual}, expected {TINYSHAKESPEARE_SHA256})"
            )
    yield RawDocument("builtin:tinyshakespeare", data)


def _extract_enwik8(archive: Path, target: Path) -> None:
    """Extract the member ``enwik8`` of `archive` into `target` atomically, streaming (never whole in memory)."""
    try:
        with (
            zipfile.ZipFile(archive) as zf,
            zf.open("enwik8") as member,
            atomic_path(target) as tmp,
            open(tmp, "wb") as out,
        ):
            while block := member.read(1 << 22):
                out.write(block)
    except KeyError as exc:
        raise CorpusError(f"{archive}: the zip holds no file named enwik8") from exc
    except zipfile.BadZipFile as exc:
        raise CorpusError(f"{archive}: not a readable zip ({exc})") from exc


def _check_enwik8(path: Path, label: str) -> None:
    size = path.stat().st_size
    if size != ENWIK8_BYTES:
        raise CorpusError(f"{label}: not the enwik8 file ({size:,} bytes, expected {ENWIK8_BYTES:,})")
    actual = sha256_file(path)
    if actual != ENWIK8_SHA256:
        raise CorpusError(f"{label}: not the enwik8 file (sha256 {actual}, expected {ENWIK8_SHA256})")


def enwik8_path(location: str | None, cache_dir: Path | str, max_bytes: int, timeout_s: float) -> Path:
    """The checked local path of the enwik8 file: `location` when it is the file itself, else
    extracted (once, into the cache) from the zip at `location` or at `ENWIK8_URL`."""
    if location is not None and not is_url(location):
        path = Path(location)
        if not path.is_file():
            raise CorpusError(f"{location}: no such file")
        if not zipfile.is_zipfile(path):
            _check_enwik8(path, location)
            return path
        archive, label = path, location
    else:
        url = location or ENWIK8_URL
        archive, label = download(url, cache_dir, max_bytes=max_bytes, timeout_s=timeout_s), mask_credentials(url)
    target = storage.local_path(cache_dir) / "downloads" / f"enwik8-{ENWIK8_SHA256[:16]}"
    if not target.is_file():
        _extract_enwik8(archive, target)
        try:
            _check_enwik8(target, label)
        except CorpusError:
            target.unlink()
            raise
    return target


# Local files ----------------------------------------------------------------------------


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CorpusError(f"{path}: {size:,} bytes is more than the {max_bytes:,}-byte file limit")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CorpusError(f"{path}: no such file or directory") from exc
    except PermissionError as exc:
        raise CorpusError(f"{path}: permission denied") from exc
    except IsADirectoryError as exc:
        raise CorpusError(f"{path}: is a directory") from exc
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _local(source: str, path: Path, max_bytes: int, part_bytes: int | None) -> RawDocument | RawFile:
    """A local file as a `RawFile` when it is larger than `part_bytes`, else its bytes."""
    if part_bytes is not None:
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # _read_file says why
        if part_bytes < size <= max_bytes:
            return RawFile(source, path, size)
    return RawDocument(source, _read_file(path, max_bytes))


def _matches(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def iter_directory(
    root: Path, include: tuple[str, ...], exclude: tuple[str, ...]
) -> Iterator[tuple[Path, SkippedSource | None]]:
    """Walk `root` recursively in sorted order, following links but never a loop.

    Yields (path, None) for each file to read and (path, SkippedSource) for entries that
    cannot be walked; excluded entries are passed over silently, as the user asked.
    """
    seen: set[tuple[int, int]] = set()

    def walk(directory: Path, rel: str) -> Iterator[tuple[Path, SkippedSource | None]]:
        try:
            info = directory.stat()
        except OSError as exc:
            yield directory, SkippedSource(str(directory), f"cannot open directory ({exc.strerror or exc})")
            return
        key = (info.st_dev, info.st_ino)
        if key in seen:
            yield directory, SkippedSource(str(directory), "directory already visited (symbolic link loop)")
            return
        seen.add(key)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            yield directory, SkippedSource(str(directory), f"cannot list directory ({exc.strerror or exc})")
            return
        for entry in entries:
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            path = Path(entry.path)
            if _matches(child_rel, entry.name, exclude):
                continue
            try:
                is_dir = entry.is_dir()  # follows symbolic links
                is_file = entry.is_file()
            except OSError as exc:
                yield path, SkippedSource(str(path), f"cannot stat ({exc.strerror or exc})")
                continue
            if is_dir:
                yield from walk(path, child_rel)
            elif is_file:
                if _matches(child_rel, entry.name, include):
                    yield path, None
            elif entry.is_symlink():
                yield path, SkippedSource(str(path), "broken symbolic link")
            else:
                yield path, SkippedSource(str(path), "not a regular file")

    yield from walk(root, "")


def iter_source(
    spec: str,
    *,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (".*",),
    cache_dir: Path | str | None = None,
    max_file_bytes: int = 1 << 30,
    max_download_bytes: int = 1 << 30,
    download_timeout_s: float = 60.0,
    part_bytes: int | None = None,
) -> Iterator[RawDocument | RawFile | SkippedSource]:
    """Yield the raw documents of one source, and a `SkippedSource` for each entry left out.

    With `part_bytes`, a local file (downloads included) larger than that comes as a `RawFile`.
    Raises `CorpusError` when the source itself is unusable (missing path, failed download).
    """
    cache_dir = cache_dir or storage.default_cache_dir()
    builtin = split_builtin(spec)
    if builtin is not None:
        name, location = builtin
        if name == "default":
            if location is not None:
                raise CorpusError("the built-in 'default' corpus takes no location")
            yield from _default_corpus()
        elif name == "enwik8":
            path = enwik8_path(location, cache_dir, max_download_bytes, download_timeout_s)
            yield _local("builtin:enwik8", path, ENWIK8_BYTES, part_bytes)
        else:
            yield from _tinyshakespeare(location, cache_dir, max_download_bytes, download_timeout_s)
        return
    if is_url(spec):
        url, pinned = parse_pinned_url(spec)
        path = download(url, cache_dir, sha256=pinned, max_bytes=max_download_bytes, timeout_s=download_timeout_s)
        yield _local(mask_credentials(url), path, max_download_bytes, part_bytes)
        return
    path = Path(spec)
    if path.is_dir():
        found = False
        for member, skipped in iter_directory(path, include, exclude):
            if skipped is not None:
                if member == path:  # the source directory itself cannot be read: say why, not "no files"
                    raise CorpusError(f"{path}: {skipped.reason}")
                yield skipped
                continue
            found = True
            try:
                yield _local(str(member), member, max_file_bytes, part_bytes)
            except CorpusError as exc:
                # One unreadable file in a directory is reported and passed over; the
                # directory as a whole fails later only if nothing usable remains.
                yield SkippedSource(str(member), str(exc).removeprefix(f"{member}: "))
        if not found:
            raise CorpusError(f"{path}: directory holds no files matching {', '.join(include)}")
        return
    if not path.exists() and not path.is_symlink():
        hint = ""
        if "=" in spec and spec.partition("=")[0] not in BUILTIN_CORPORA:
            hint = f" (built-in corpora: {', '.join(BUILTIN_CORPORA)})"
        raise CorpusError(f"{path}: no such file or directory{hint}")
    yield _local(str(path), path, max_file_bytes, part_bytes)


def fingerprint(
    sources: tuple[str, ...], include: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = (".*",)
) -> str | None:
    """A digest of what the sources hold, without normalising it, for caching ingestion.

    Files are hashed by content (never by path or time alone); the built-in corpora by their
    pinned hash or their text. None when the content cannot be known without downloading
    (an http(s) source without a pinned sha256) or a source is missing: such a run is not
    cached, and ingestion itself reports the problem.
    """
    digest = hashlib.sha256()
    for spec in sources:
        digest.update(f"source:{spec}\n".encode())
        builtin = split_builtin(spec)
        if builtin is not None:
            if builtin[0] == "tinyshakespeare":
                digest.update(TINYSHAKESPEARE_SHA256.encode())
            elif builtin[0] == "enwik8":
                digest.update(ENWIK8_SHA256.encode())
            else:
                for document in _default_corpus():
                    digest.update(hashlib.sha256(document.data).digest())
            continue
        if is_url(spec):
            _, pinned = parse_pinned_url(spec)
            if pinned is None:
                return None
            digest.update(pinned.encode())
            continue
        path = Path(spec)
        if path.is_file():
            digest.update(sha256_file(path).encode())
        elif path.is_dir():
            for member, skipped in iter_directory(path, include, exclude):
                digest.update(f"{member.relative_to(path).as_posix()}\n".encode())
                if skipped is None:
                    try:
                        digest.update(sha256_file(member).encode())
                    except OSError:
                        return None
        else:
            return None
    return digest.hexdigest()
