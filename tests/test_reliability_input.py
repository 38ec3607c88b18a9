"""Bad corpus input: one table of cases, each run through `fundamentallm prepare`, some through the flow.

Every case builds its input under tmp_path (URLs are served by a local HTTP server on
127.0.0.1) and states what must happen:

- refused input: the exit status and the one `error:` line, which names the file or URL and
  the reason; nothing is kept (no documents, shard, manifest, vocabulary, temporary file or
  downloaded file);
- accepted input: the text kept (the exact documents), each file skipped with its reason
  (in the command's output and in the ingest report), the warnings a lenient decoding gives.

Through the `train-pipeline` flow (the session's temporary Prefect API, the debug preset) a
refused input fails the flow run with the same reason, closes the MLflow run as FAILED with a
`failure_reason`, and leaves no shard, manifest, vocabulary, checkpoint or registered model.
URL credentials (``http://user:token@host/...``) are sent as basic authentication and appear
nowhere: not in output, files, MLflow params, tags or artifacts, Prefect artifacts or logs.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.server
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import prose
from typer.testing import CliRunner

from fundamentallm.cli import app

pytestmark = pytest.mark.reliability

USER, TOKEN, WRONG_TOKEN = "reader", "s3cret-T0ken-4f1c", "wr0ng-T0ken-9b2e"
SECRETS = (TOKEN, WRONG_TOKEN)
NOBODY = 65534
TEXT = prose(1, 600)  # about 3,500 characters: enough for every split at context length 32
SETTINGS: dict[str, str] = {}  # data settings every case shares (the context comes from the model)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The local HTTP server --------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[bytes, int | None, str | None]] = {}  # noqa: RUF012 (reset per test)
    redirects: dict[str, str] = {}  # noqa: RUF012
    requests: list[tuple[str, str | None]] = []  # noqa: RUF012

    def do_GET(self) -> None:
        authorization = self.headers.get("Authorization")
        self.requests.append((self.path, authorization))
        if self.path in self.redirects:
            self._answer(302, b"", {"Location": self.redirects[self.path]})
            return
        if self.path not in self.routes:
            self._answer(404, b"not found")
            return
        body, length, required = self.routes[self.path]
        if required is not None and authorization != required:
            self._answer(401, b"who are you?", {"WWW-Authenticate": 'Basic realm="corpus"'})
            return
        self._answer(200, body, length=length)

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Server:
    host: str  # 127.0.0.1:PORT

    @property
    def base(self) -> str:
        return f"http://{self.host}"

    def serve(self, path: str, body: bytes, *, length: int | None = None, auth: tuple[str, str] | None = None) -> str:
        """Serve `body` at `path` (with a false Content-Length, or behind basic authentication); its URL."""
        required = None
        if auth is not None:
            required = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        _Handler.routes[path] = (body, length, required)
        return self.base + path

    def with_credentials(self, path: str, token: str = TOKEN) -> str:
        return f"http://{USER}:{token}@{self.host}{path}"

    def masked(self, path: str) -> str:
        return f"http://***@{self.host}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    _Handler.routes = {}
    _Handler.redirects = {}
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()


# The cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    sources: list[str]
    kept: dict[str, str] = field(default_factory=dict)
    """Accepted input: source label -> sha256 of the exact text the documents table must hold."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Source label -> regex of the reason it is reported skipped (output and ingest report)."""


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, Server], Input]
    error: str | None = None
    """Refused input: regex for the whole error line (without 'error: '); {dir}, {url}, {masked}
    stand for the case's directory, the server's URL and the URL with credentials masked."""
    settings: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    """Regexes of log lines the command must print (same placeholders)."""
    unprivileged: bool = False
    """Run as an ordinary user (uid 65534 when the tests run as root), so file modes hold."""
    cli: bool = True
    flow: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else 1


def _write(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


def missing(tmp: Path, server: Server) -> Input:
    return Input([str(tmp / "nope.txt")])


def empty_file(tmp: Path, server: Server) -> Input:
    return Input([str(_write(tmp / "empty.txt", b""))])


def empty_directory(tmp: Path, server: Server) -> Input:
    (tmp / "void").mkdir()
    return Input([str(tmp / "void")])


def only_binary(tmp: Path, server: Server) -> Input:
    _write(tmp / "bins" / "a.bin", b"\x7fELF\x00\x00binary")
    _write(tmp / "bins" / "b.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    return Input([str(tmp / "bins")])


def mixed(tmp: Path, server: Server) -> Input:
    root = tmp / "mixed"
    a = _write(root / "a.txt", TEXT)
    b = _write(root / "notes" / "b.md", prose(2, 300))
    png = _write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    blob = _write(root / "notes" / "blob.dat", bytes(range(1, 32)) * 40 + b"some text")
    return Input(
        [str(root)],
        kept={str(a): sha(TEXT), str(b): sha(prose(2, 300))},
        skipped={str(png): r"binary file \(NUL byte at offset 8\)", str(blob): r"binary file \(\d+% control bytes\)"},
    )


def nul_byte(tmp: Path, server: Server) -> Input:
    return Input([str(_write(tmp / "nul.txt", TEXT[:120] + "\x00" + TEXT[120:]))])


def invalid_utf8(tmp: Path, server: Server) -> Input:
    path = _write(tmp / "bad.txt", b"na\xefve " + TEXT.encode())
    return Input([str(path)], kept={str(path): sha("na\ufffdve " + TEXT)})


def invalid_utf8_fallback(tmp: Path, server: Server) -> Input:
    path = _write(tmp / "bad.txt", b"na\xefve " + TEXT.encode())
    return Input([str(path)], kept={str(path): sha("na\u00efve " + TEXT)})


LATIN1 = "Caf\u00e9 cr\u00e8me, na\u00efve \u00a7 \u00bd\n" + TEXT


def latin1(tmp: Path, server: Server) -> Input:
    path = _write(tmp / "latin1.txt", LATIN1.encode("latin-1"))
    return Input([str(path)], kept={str(path): sha(LATIN1)})


def utf16_bom(tmp: Path, server: Server) -> Input:
    text = LATIN1.replace("\n", "\r\n")  # as Windows Notepad writes it
    le = _write(tmp / "utf16" / "le.txt", "\ufeff".encode("utf-16-le") + text.encode("utf-16-le"))
    be = _write(tmp / "utf16" / "be.txt", "\ufeff".encode("utf-16-be") + ("\u03b1\u03b2 " + text).encode("utf-16-be"))
    return Input([str(tmp / "utf16")], kept={str(be): sha("\u03b1\u03b2 " + LATIN1), str(le): sha(LATIN1)})


BIG_BLOCK = "The quick brown fox jumps over the lazy dog; " * 23_302  # about 1 MiB, one line
BIG_BLOCKS = 200


def one_line_200mb(tmp: Path, server: Server) -> Input:
    path = tmp / "big.txt"
    block = BIG_BLOCK.encode()
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for _ in range(BIG_BLOCKS):
            out.write(block)
            digest.update(block)
    assert path.stat().st_size >= 200_000_000 and b"\n" not in block
    return Input([str(path)], kept={str(path): digest.hexdigest()})


def tiny_files(tmp: Path, server: Server) -> Input:
    root = tmp / "tiny"
    root.mkdir()
    kept = {}
    for i in range(10_000):
        text = f"note {i}: the fox and the dog.\n"
        (root / f"{i:05d}.txt").write_text(text)
        kept[str(root / f"{i:05d}.txt")] = sha(text)
    return Input([str(root)], kept=kept)


def symlink_loop(tmp: Path, server: Server) -> Input:
    root = tmp / "loop"
    a = _write(root / "a.txt", TEXT)
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp / "gone.txt")
    return Input(
        [str(root)],
        kept={str(a): sha(TEXT)},
        skipped={
            str(root / "sub" / "up"): r"directory already visited \(symbolic link loop\)",
            str(root / "dangling"): r"broken symbolic link",
        },
    )


def unreadable_file(tmp: Path, server: Server) -> Input:
    return Input([str(_write(tmp / "locked.txt", TEXT, mode=0))])


def unreadable_in_directory(tmp: Path, server: Server) -> Input:
    root = tmp / "some"
    ok = _write(root / "ok.txt", TEXT)
    locked = _write(root / "locked.txt", prose(3), mode=0)
    _write(root / "shut" / "x.txt", prose(4))
    (root / "shut").chmod(0)
    return Input(
        [str(root)],
        kept={str(ok): sha(TEXT)},
        skipped={str(locked): r"permission denied", str(root / "shut"): r"cannot list directory \(Permission denied\)"},
    )


def unreadable_directory(tmp: Path, server: Server) -> Input:
    _write(tmp / "shut" / "x.txt", TEXT)
    (tmp / "shut").chmod(0)
    return Input([str(tmp / "shut")])


def url_404(tmp: Path, server: Server) -> Input:
    return Input([server.base + "/missing.txt"])


def url_truncated(tmp: Path, server: Server) -> Input:
    return Input([server.serve("/cut.txt", TEXT.encode()[:1000], length=5000)])


def url_wrong_sha256(tmp: Path, server: Server) -> Input:
    url = server.serve("/pinned.txt", TEXT.encode())
    return Input([f"{url}#sha256={sha('another text')}"])


def url_with_credentials(tmp: Path, server: Server, text: str = TEXT) -> Input:
    server.serve("/private.txt", text.encode(), auth=(USER, TOKEN))
    return Input([server.with_credentials("/private.txt")], kept={server.masked("/private.txt"): sha(text)})


def url_wrong_credentials(tmp: Path, server: Server) -> Input:
    server.serve("/private.txt", TEXT.encode(), auth=(USER, TOKEN))
    return Input([server.with_credentials("/private.txt", WRONG_TOKEN)])


def mixed_and_private_url(tmp: Path, server: Server) -> Input:
    local, remote = mixed(tmp, server), url_with_credentials(tmp, server, prose(5, 600))
    return Input(local.sources + remote.sources, {**local.kept, **remote.kept}, local.skipped)


HINT = r"; convert the file to UTF-8, or choose encoding policy 'replace' or 'fallback'"

CASES: dict[str, Case] = {
    "nonexistent path": Case(missing, error=r"{dir}/nope\.txt: no such file or directory", flow=True),
    "empty file": Case(empty_file, error=r"no usable text in {dir}/empty\.txt: {dir}/empty\.txt: empty file"),
    "empty directory": Case(empty_directory, error=r"{dir}/void: directory holds no files matching \*", flow=True),
    "only binary files": Case(
        only_binary,
        error=r"no usable text in {dir}/bins: {dir}/bins/a\.bin: binary file \(NUL byte at offset 4\); "
        r"{dir}/bins/b\.png: binary file \(NUL byte at offset 8\)",
    ),
    "text and binary files mixed": Case(mixed),
    "NUL byte in a text file": Case(
        nul_byte, error=r"no usable text in {dir}/nul\.txt: {dir}/nul\.txt: binary file \(NUL byte at offset 120\)"
    ),
    "invalid UTF-8, strict": Case(
        invalid_utf8,
        error=r"{dir}/bad\.txt: invalid UTF-8 at byte offset 2 \(invalid continuation byte: ef\)" + HINT,
        flow=True,
    ),
    "invalid UTF-8, replace": Case(
        invalid_utf8,
        settings={"ingest.encoding_policy": "replace"},
        warnings=(r"WARNING +{dir}/bad\.txt: invalid UTF-8 at byte offset 2; replaced with U\+FFFD",),
    ),
    "invalid UTF-8, fallback": Case(
        invalid_utf8_fallback,
        settings={"ingest.encoding_policy": "fallback"},
        warnings=(r"WARNING +{dir}/bad\.txt: invalid UTF-8 at byte offset 2; read as Windows-1252 instead",),
    ),
    "Latin-1 file, strict": Case(
        latin1, error=r"{dir}/latin1\.txt: invalid UTF-8 at byte offset 3 \(invalid continuation byte: e9\)" + HINT
    ),
    "Latin-1 file, fallback": Case(
        latin1,
        settings={"ingest.encoding_policy": "fallback"},
        warnings=(r"WARNING +{dir}/latin1\.txt: invalid UTF-8 at byte offset 3; read as Windows-1252 instead",),
    ),
    "UTF-16 with BOM (LE and BE, CRLF)": Case(utf16_bom),
    "a single 200 MB line": Case(one_line_200mb),
    "ten thousand tiny files": Case(tiny_files),
    "symbolic link loop": Case(symlink_loop),
    "unreadable file": Case(unreadable_file, error=r"{dir}/locked\.txt: permission denied", unprivileged=True),
    "unreadable file and directory in a directory": Case(unreadable_in_directory, unprivileged=True),
    "unreadable directory": Case(
        unreadable_directory, error=r"{dir}/shut: cannot list directory \(Permission denied\)", unprivileged=True
    ),
    "URL returning 404": Case(url_404, error=r"{url}/missing\.txt: download failed with HTTP 404 Not Found", flow=True),
    "URL with a truncated body": Case(
        url_truncated, error=r"{url}/cut\.txt: truncated download, got 1,000 of 5,000 bytes"
    ),
    "URL with the wrong sha256": Case(
        url_wrong_sha256,
        error=r"{url}/pinned\.txt: sha256 mismatch, expected " + sha("another text") + ", got " + sha(TEXT),
    ),
    "URL with credentials": Case(url_with_credentials),
    "URL with wrong credentials": Case(
        url_wrong_credentials, error=r"{masked}/private\.txt: download failed with HTTP 401 Unauthorized", flow=True
    ),
    "mixed directory and a URL with credentials": Case(mixed_and_private_url, cli=False, flow=True),
}


def expand(pattern: str, tmp: Path, server: Server) -> str:
    return (
        pattern.replace("{dir}", re.escape(str(tmp)))
        .replace("{url}", re.escape(server.base))
        .replace("{masked}", re.escape(f"http://***@{server.host}"))
    )


# Helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invoked:
    """What a CliRunner result the tests read holds, carried back from a child process."""

    exit_code: int
    output: str
    stdout: str
    stderr: str
    exception: str | None
    """The exception the command raised (other than SystemExit), as text; None when there was none."""


def invoke_unprivileged(tmp: Path, args: list[str]) -> Invoked:
    """`fundamentallm ARGS` (in-process, CliRunner) as an ordinary user, so that mode 000 really
    denies access.

    As root (where file modes do not apply) it runs in a forked child that drops to uid and gid
    65534 with no supplementary groups, so the credentials of this process (every thread of it)
    never change; `tmp` is opened to that user and its parents made traversable while it runs,
    then restored. As any other user it runs here. The child inherits the modules already
    imported (`imports_done`): user 65534 may be unable to read the Python installation.
    """
    if os.geteuid() != 0:
        return _invoked(args)
    import select
    import signal

    modes: dict[Path, int] = {}
    try:
        for path in (tmp, *tmp.parents):
            mode = path.stat().st_mode & 0o7777
            wanted = 0o777 if path == tmp else mode | 0o001
            if wanted != mode:
                modes[path] = mode
                path.chmod(wanted)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop privileges for good, run, report, exit without cleanup
            code = 1
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                data = json.dumps(_invoked(args).__dict__).encode()
                code = 0
            except BaseException as exc:
                data = json.dumps({"child failed": repr(exc)}).encode()
            finally:
                with os.fdopen(write, "wb") as pipe:
                    pipe.write(data)
                os._exit(code)
        os.close(write)
        chunks = []
        with os.fdopen(read, "rb") as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], 300)  # a hang guard
                if not ready:
                    os.kill(pid, signal.SIGKILL)
                    raise AssertionError("the unprivileged command did not finish within 300 s")
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        os.waitpid(pid, 0)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    report = json.loads(b"".join(chunks))
    assert "child failed" not in report, report
    return Invoked(**report)


def _invoked(args: list[str]) -> Invoked:
    result = runner.invoke(app, args)
    exception = None if result.exception is None or isinstance(result.exception, SystemExit) else result.exception
    return Invoked(
        result.exit_code, result.output, result.stdout, result.stderr, repr(exception) if exception else None
    )


def files_under(*roots: Path) -> list[Path]:
    return sorted(p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def assert_no_secret(text: str | bytes, where: str) -> None:
    data = text.encode("utf-8") if isinstance(text, str) else text
    for secret in SECRETS:
        assert secret.encode() not in data, f"credentials leaked into {where}"


def assert_no_secret_in_files(*roots: Path) -> None:
    for path in files_under(*roots):
        assert_no_secret(str(path), "a file name")
        if path.is_file():
            assert_no_secret(path.read_bytes(), str(path))


def documents_of(path: str | Path) -> dict[str, str]:
    """source -> sha256 of the text, from a documents table (a large file's parts are consecutive rows, in order)."""
    table = pq.read_table(path, columns=["source", "text"])
    sources = table.column("source").to_pylist()
    texts = table.column("text")
    digests: dict[str, hashlib._Hash] = {}
    for i, source in enumerate(sources):
        digests.setdefault(source, hashlib.sha256()).update(texts[i].as_buffer().to_pybytes())
    return {source: digest.hexdigest() for source, digest in digests.items()}


def check_kept_and_skipped(built: Input, documents_path: str | Path, report_path: str | Path, output: str | None):
    kept = documents_of(documents_path)
    assert kept.keys() == built.kept.keys(), sorted(set(kept) ^ set(built.kept))[:10]
    wrong = [source for source, digest in kept.items() if digest != built.kept[source]]
    assert not wrong, f"text not kept as written: {wrong[:5]}"
    report = json.loads(Path(report_path).read_text())
    assert report["documents"] == len(built.kept)
    reported = {item["source"]: item["reason"] for item in report["skipped"]}
    assert reported.keys() == built.skipped.keys(), reported
    for source, pattern in built.skipped.items():
        assert re.fullmatch(pattern, reported[source]), (source, reported[source])
    if output is not None:  # one plain line per kind of reason with its count, never wrapped
        lines = output.splitlines()
        kinds = collections.Counter(reason.split(" (", 1)[0] for reason in reported.values())
        for kind, count in kinds.items():
            start = f"WARNING  skipped {count} {'file' if count == 1 else 'files'}, {kind}: "
            assert sum(line.startswith(start) for line in lines) == 1, (start, output[-3000:])
        assert sum("WARNING  skipped" in line for line in lines) == len(kinds), output[-3000:]


# Through the command line -----------------------------------------------------------------

runner = CliRunner()


def prepare_args(sources: list[str], out: Path, settings: dict[str, str]) -> list[str]:
    args = ["-v", "prepare", "--no-progress", "--no-data-docs", "--json", *sources, "--out", str(out)]
    args += ["--context-length", "32"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def imports_done(tmp_path_factory) -> None:
    """Run `prepare` once to success and once to an error, as the current user, before a case drops privileges.

    The user 65534 may be unable to read the Python installation (here it lives under /root), so
    every module the command imports lazily (Great Expectations, pandas, ...) is imported first.
    """
    root = tmp_path_factory.mktemp("imports")
    _write(root / "corpus" / "a.txt", TEXT)
    _write(root / "corpus" / "b.bin", b"\x00\x01")
    assert runner.invoke(app, prepare_args([str(root / "corpus")], root / "out", SETTINGS)).exit_code == 0
    assert runner.invoke(app, prepare_args([str(root / "missing")], root / "out", SETTINGS)).exit_code == 1


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.cli])
def test_prepare(name: str, tmp_path: Path, server: Server, request: pytest.FixtureRequest):
    case = CASES[name]
    built = case.build(tmp_path, server)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = prepare_args(built.sources, out, {**SETTINGS, "ingest.cache_dir": str(cache), **case.settings})
    if case.unprivileged:
        request.getfixturevalue("imports_done")
        result = invoke_unprivileged(tmp_path, args)
    else:
        result = _invoked(args)

    output = result.output
    assert result.exit_code == case.exit_code, output[-3000:]
    assert "Traceback" not in output
    assert result.exception is None, result.exception
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    for pattern in case.warnings:
        assert re.search(expand(pattern, tmp_path, server), output, re.MULTILINE), output[-3000:]
    if case.error is not None:
        assert len(errors) == 1, output[-3000:]
        assert re.fullmatch("error: " + expand(case.error, tmp_path, server), errors[0]), errors[0]
        assert files_under(out, cache) == [], "a refused input must leave nothing behind"
    else:
        assert errors == [], output[-3000:]
        record = json.loads(result.stdout)
        docs = record["documents"]
        check_kept_and_skipped(built, docs["path"], docs["report_path"], result.stderr)
        manifest = json.loads(Path(record["dataset"]["manifest_path"]).read_text())
        separator = len(manifest["config"]["document_separator"])
        assert sum(record["dataset"]["tokens"].values()) == docs["characters"] + separator * (docs["documents"] - 1)
        assert manifest["documents"] == {"count": docs["documents"], "characters": docs["characters"]}
    assert_no_secret(output, "the command's output")
    assert_no_secret_in_files(out, cache)
    for path, authorization in _Handler.requests:
        assert TOKEN not in path and WRONG_TOKEN not in path, "credentials must not travel in the request line"
        if authorization is not None:
            assert authorization.startswith("Basic ")


def test_credentials_are_sent_as_basic_authentication_and_not_across_redirects(tmp_path: Path, server: Server):
    built = url_with_credentials(tmp_path, server)
    open_text = prose(6, 600)
    server.serve("/open.txt", open_text.encode())
    _Handler.redirects["/moved.txt"] = server.base + "/open.txt"
    moved = server.with_credentials("/moved.txt")
    cache = f"ingest.cache_dir={tmp_path / 'cache'}"
    args = ["prepare", "--no-progress", "--no-data-docs", *built.sources, moved, "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--set", cache, "--context-length", "32", "--json"])
    assert result.exit_code == 0, result.output
    expected = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
    assert _Handler.requests == [("/private.txt", expected), ("/moved.txt", expected), ("/open.txt", None)]
    kept = documents_of(json.loads(result.stdout)["documents"]["path"])
    assert kept == {server.masked("/private.txt"): sha(TEXT), server.masked("/moved.txt"): sha(open_text)}


# Through the flow -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_env(prefect_api, mlflow_store):
    return {
        "preset": "debug",
        "overrides": ["train.max_steps=10", "train.eval_interval=10", "train.checkpoint_interval=10"],
        "prompts": ["the "],
        "model_name": "reliability-input",
        "experiment": "reliability-input",
        "sample": {"max_new_tokens": 20, "num_samples": 1},
    }


def _mlflow_run(flow_run_id: Any):
    from fundamentallm.tracking import client, experiment_id

    mlflow_client = client()
    runs = mlflow_client.search_runs(
        [experiment_id(mlflow_client, "reliability-input")],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert len(runs) == 1
    return mlflow_client, runs[0]


def _prefect_texts(flow_run_id: Any) -> tuple[list[str], list[str]]:
    """The flow run's artifacts (data and description) and log messages."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [f"{a.key} {a.data} {a.description}" for a in artifacts], [log.message for log in logs]


@pytest.mark.flow
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.flow])
def test_flow(name: str, tmp_path: Path, server: Server, flow_env: dict[str, Any]):
    from flows.train_pipeline import train_pipeline
    from fundamentallm.config import DataConfig, parse_override

    case = CASES[name]
    built = case.build(tmp_path, server)
    data_dir, runs_dir, cache = tmp_path / "data", tmp_path / "runs", tmp_path / "cache"
    settings = {**SETTINGS, "ingest.cache_dir": str(cache), **case.settings}
    changes = dict(parse_override(f"{key}={value}") for key, value in settings.items())  # as `--set` reads them
    data = DataConfig().with_overrides({**changes, "encode.shard_tokens": 1 << 16})
    state = train_pipeline(
        **flow_env,
        sources=built.sources,
        data=data,
        data_dir=str(data_dir),
        runs_dir=str(runs_dir),
        return_state=True,
    )
    flow_run_id = state.state_details.flow_run_id
    mlflow_client, run = _mlflow_run(flow_run_id)
    versions = mlflow_client.search_model_versions(f"run_id = '{run.info.run_id}'")
    artifacts, logs = _prefect_texts(flow_run_id)

    if case.error is not None:
        assert state.is_failed(), state
        pattern = expand(case.error, tmp_path, server)
        assert re.search(pattern, state.message), state.message
        assert run.info.status == "FAILED"
        assert re.search(pattern, run.data.tags["failure_reason"]), run.data.tags["failure_reason"]
        assert versions == [], "a failed run must register no model"
        leftovers = [p for p in files_under(data_dir, runs_dir, cache)]
        assert leftovers == [], f"a failed run left {leftovers}"
        assert any(re.search(pattern, line) for line in logs), logs
        if built.sources[0].startswith("http"):
            assert len(_Handler.requests) == 1, f"refused downloads are not retried: {_Handler.requests}"
    else:
        assert state.is_completed(), state.message
        summary = state.result()
        assert run.info.status == "FINISHED"
        assert [str(v.version) for v in versions] == [str(summary["registration"]["version"])]
        (documents,) = data_dir.glob("documents/*/documents.parquet")
        check_kept_and_skipped(built, documents, documents.parent / "ingest-report.json", None)
        assert (Path(summary["dataset"]) / "manifest.json").is_file()
        downloaded = mlflow_client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
        assert {"data", "model", "config"} <= {p.name for p in Path(downloaded).iterdir()}
        assert_no_secret_in_files(Path(downloaded), data_dir, runs_dir, cache)
        assert_no_secret(json.dumps(summary), "the flow's result")

    assert_no_secret(state.message or "", "the flow state's message")
    assert_no_secret(json.dumps(run.data.params), "MLflow params")
    assert_no_secret(json.dumps(run.data.tags), "MLflow tags")
    for text in artifacts:
        assert_no_secret(text, "a Prefect artifact")
    for line in logs:
        assert_no_secret(line, "a Prefect log line")
    for entry in mlflow_client.list_artifacts(run.info.run_id):
        assert_no_secret(entry.path, "an MLflow artifact path")
