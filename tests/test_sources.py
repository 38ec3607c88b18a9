"""Source resolution: directories, downloads from a local HTTP server, built-in corpora."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from fundamentallm.data import sources
from fundamentallm.data.sources import (
    TINYSHAKESPEARE_SHA256,
    RawDocument,
    RawFile,
    SkippedSource,
    download,
    fingerprint,
    iter_source,
    parse_pinned_url,
)
from fundamentallm.errors import CorpusError


def collect(spec: str, **kwargs) -> tuple[list[RawDocument], list[SkippedSource]]:
    docs, skipped = [], []
    for item in iter_source(spec, **kwargs):
        (docs if isinstance(item, RawDocument) else skipped).append(item)
    return docs, skipped


def test_directory_is_walked_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.md").write_text("c")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / ".hidden.txt").write_text("h")
    docs, skipped = collect(str(tmp_path))
    assert [Path(d.source).relative_to(tmp_path).as_posix() for d in docs] == ["a.txt", "b/z.txt", "c.md"]
    assert skipped == []


def test_include_and_exclude_globs(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "drop").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("a")
    (tmp_path / "keep" / "b.log").write_text("b")
    (tmp_path / "drop" / "c.txt").write_text("c")
    docs, _ = collect(str(tmp_path), include=("*.txt",), exclude=("drop",))
    assert [Path(d.source).name for d in docs] == ["a.txt"]
    docs, _ = collect(str(tmp_path), include=("keep/*",), exclude=())
    assert [Path(d.source).name for d in docs] == ["a.txt", "b.log"]


def test_symlink_loop_is_reported_not_followed_forever(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)
    (tmp_path / "d" / "dangling").symlink_to(tmp_path / "missing.txt")
    docs, skipped = collect(str(tmp_path / "d"))
    assert [Path(d.source).name for d in docs] == ["a.txt"]
    reasons = {Path(s.source).name: s.reason for s in skipped}
    assert "symbolic link loop" in reasons["loop"]
    assert reasons["dangling"] == "broken symbolic link"


def test_unreadable_file_in_directory_is_skipped_with_reason(tmp_path, monkeypatch):
    (tmp_path / "ok.txt").write_text("fine")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    docs, skipped = collect(str(tmp_path))
    assert [Path(d.source).name for d in docs] == ["ok.txt"]
    assert skipped == [SkippedSource(str(locked), "permission denied")]
    with pytest.raises(CorpusError, match=r"locked\.txt: permission denied"):
        collect(str(locked))


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file or directory"):
        collect(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty: directory holds no files"):
        collect(str(tmp_path / "empty"))


def test_file_size_limit(tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 100)
    with pytest.raises(CorpusError, match="more than the 10-byte file limit"):
        collect(str(big), max_file_bytes=10)


def test_default_builtin_corpus_is_cpython_reference_text():
    docs, skipped = collect("default")
    assert skipped == []
    assert len(docs) > 50
    assert all(d.source.startswith("builtin:default/") for d in docs)
    total = sum(len(d.data.decode("utf-8")) for d in docs)
    assert total > 300_000


# HTTP -----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes, int | None]]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        status, body, length = self.routes.get(self.path, (404, b"not found", None))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    _Handler.routes = {}
    _Handler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_is_cached(server, tmp_path):
    base, handler = server
    handler.routes["/a.txt"] = (200, b"hello corpus", None)
    first = download(f"{base}/a.txt", tmp_path)
    second = download(f"{base}/a.txt", tmp_path)
    assert first == second and first.read_bytes() == b"hello corpus"
    assert handler.hits == ["/a.txt"]
    assert first.parent == tmp_path / "downloads"


def test_pinned_sha256_is_checked(server, tmp_path):
    base, handler = server
    body = b"pinned content"
    handler.routes["/p.txt"] = (200, body, None)
    good = hashlib.sha256(body).hexdigest()
    docs, _ = collect(f"{base}/p.txt#sha256={good}", cache_dir=tmp_path)
    assert docs == [RawDocument(f"{base}/p.txt", body)]
    with pytest.raises(CorpusError, match="sha256 mismatch"):
        download(f"{base}/p.txt", tmp_path / "other", sha256="0" * 64)
    assert not any((tmp_path / "other").rglob("*.txt")), "a rejected download must leave nothing behind"


def test_http_errors_truncation_and_size_limit(server, tmp_path):
    base, handler = server
    with pytest.raises(CorpusError, match="HTTP 404"):
        download(f"{base}/missing.txt", tmp_path)
    handler.routes["/short.txt"] = (200, b"only part", 1000)
    with pytest.raises(CorpusError, match="truncated download, got 9 of 1,000 bytes"):
        download(f"{base}/short.txt", tmp_path)
    handler.routes["/big.txt"] = (200, b"x" * 5000, None)
    with pytest.raises(CorpusError, match="download limit"):
        download(f"{base}/big.txt", tmp_path, max_bytes=100)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_unreachable_host_and_bad_schemes(tmp_path, refusing_port):
    with pytest.raises(CorpusError, match="cannot download"):
        download(f"http://127.0.0.1:{refusing_port}/x.txt", tmp_path, timeout_s=2)
    with pytest.raises(CorpusError, match="only http:// and https://"):
        download("ftp://example.com/x.txt", tmp_path)
    with pytest.raises(CorpusError, match="#sha256=<64 hex digits>"):
        parse_pinned_url("http://x/y#md5=abc")


def test_cache_names_cannot_escape_the_cache(server, tmp_path):
    base, handler = server
    handler.routes["/..%2F..%2Fevil"] = (200, b"data", None)
    path = download(f"{base}/..%2F..%2Fevil", tmp_path)
    assert path.parent == tmp_path / "downloads"


def test_tinyshakespeare_location_is_checked_against_the_pinned_hash(server, tmp_path):
    base, handler = server
    handler.routes["/input.txt"] = (200, b"not shakespeare", None)
    with pytest.raises(CorpusError, match="sha256 mismatch"):
        collect(f"tinyshakespeare={base}/input.txt", cache_dir=tmp_path)
    fake = tmp_path / "fake.txt"
    fake.write_bytes(b"not shakespeare")
    with pytest.raises(CorpusError, match=f"not the Tiny Shakespeare file .*expected {TINYSHAKESPEARE_SHA256}"):
        collect(f"tinyshakespeare={fake}")


def test_a_remote_download_cache_serves_other_machines(server, tmp_path, monkeypatch):
    """A cache at an fsspec URL: the first download is copied up; a machine with an empty local
    mirror (another mirror directory here) then gets the file from the cache, not the server."""
    base, handler = server
    handler.routes["/shared.txt"] = (200, b"shared corpus", None)
    cache = f"memory://cache-{tmp_path.name}"
    monkeypatch.setenv("FUNDAMENTALLM_MIRROR_DIR", str(tmp_path / "machine-a"))
    first = download(f"{base}/shared.txt", cache)
    assert first.read_bytes() == b"shared corpus" and first.is_relative_to(tmp_path / "machine-a")
    monkeypatch.setenv("FUNDAMENTALLM_MIRROR_DIR", str(tmp_path / "machine-b"))
    second = download(f"{base}/shared.txt", cache)
    assert second.read_bytes() == b"shared corpus" and second.is_relative_to(tmp_path / "machine-b")
    assert handler.hits == ["/shared.txt"]  # downloaded once, from the server


@pytest.fixture
def small_enwik8(monkeypatch, tmp_path) -> tuple[bytes, Path]:
    """A stand-in for enwik8 (the real file is 100 MB and behind the network): its size and sha256
    pinned in place of the real ones, and a zip holding it under the real member name."""
    body = "<page><title>Caf\u00e9</title>\u2014 text</page>\n".encode() * 200
    monkeypatch.setattr(sources, "ENWIK8_BYTES", len(body))
    monkeypatch.setattr(sources, "ENWIK8_SHA256", hashlib.sha256(body).hexdigest())
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", body)
    return body, archive


def test_enwik8_from_its_zip_by_url_local_zip_or_file(small_enwik8, server, tmp_path):
    body, archive = small_enwik8
    base, handler = server
    handler.routes["/enwik8.zip"] = (200, archive.read_bytes(), None)
    (doc,), _ = collect(f"enwik8={base}/enwik8.zip", cache_dir=tmp_path / "cache")
    assert doc == RawDocument("builtin:enwik8", body)
    (again,), _ = collect(f"enwik8={base}/enwik8.zip", cache_dir=tmp_path / "cache")
    assert again == doc and handler.hits == ["/enwik8.zip"]  # downloaded and extracted once
    (local,), _ = collect(f"enwik8={archive}", cache_dir=tmp_path / "other-cache")
    plain = tmp_path / "enwik8"
    plain.write_bytes(body)
    (direct,), _ = collect(f"enwik8={plain}", cache_dir=tmp_path / "other-cache")
    assert local == direct == doc
    # Larger than the part size, it comes as a file for ingestion to read in parts.
    (parted,) = iter_source(f"enwik8={plain}", cache_dir=tmp_path / "cache", part_bytes=1024)
    assert parted == RawFile("builtin:enwik8", plain, len(body))


def test_enwik8_is_checked_against_the_pinned_size_and_sha256(small_enwik8, tmp_path):
    body, _ = small_enwik8
    shorter = tmp_path / "short"
    shorter.write_bytes(body[:-1])
    with pytest.raises(CorpusError, match=f"not the enwik8 file \\({len(body) - 1:,} bytes, expected {len(body):,}\\)"):
        collect(f"enwik8={shorter}", cache_dir=tmp_path)
    altered = tmp_path / "altered"
    altered.write_bytes(body.replace(b"Caf", b"caf"))
    with pytest.raises(CorpusError, match=f"not the enwik8 file \\(sha256 .*, expected {sources.ENWIK8_SHA256}\\)"):
        collect(f"enwik8={altered}", cache_dir=tmp_path)
    wrong_zip, other_zip = tmp_path / "wrong.zip", tmp_path / "other.zip"
    with zipfile.ZipFile(wrong_zip, "w") as zf:
        zf.writestr("enwik8", body.replace(b"Caf", b"caf"))
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("enwik9", body)
    with pytest.raises(CorpusError, match="not the enwik8 file \\(sha256"):
        collect(f"enwik8={wrong_zip}", cache_dir=tmp_path / "cache")
    with pytest.raises(CorpusError, match="holds no file named enwik8"):
        collect(f"enwik8={other_zip}", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").rglob("*enwik8*")) == []  # nothing unchecked is left in the cache


def test_enwik8_fingerprint_is_its_pinned_hash(monkeypatch):
    # Known without a download (so an ingestion of it can be cached): the pin stands for the content.
    before = fingerprint(("enwik8",))
    assert before is not None
    monkeypatch.setattr(sources, "ENWIK8_SHA256", "0" * 64)
    assert fingerprint(("enwik8",)) != before
