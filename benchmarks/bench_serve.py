"""Benchmark of the registered sampling model served by ``mlflow models serve`` under load.

    python benchmarks/bench_serve.py                              # train a small model, serve it, 240 requests x 3
    python benchmarks/bench_serve.py --preset cpu-quick --steps 20   # the 2-minute preset's shape (3 x 160)
    python benchmarks/bench_serve.py --model models:/fundamentallm-char@champion   # a model already registered

Without ``--model`` it trains a preset (``debug`` by default) for a few steps on the
built-in ``default`` corpus and registers it as ``serve-bench`` in a private, temporary
MLflow store (never the project's ``mlruns/``). With ``--model`` it serves that URI from the
store ``MLFLOW_TRACKING_URI`` (or the embedded one) points at.

It starts ``mlflow models serve -m URI --env-manager local --host 127.0.0.1`` on a free
port, waits for ``/ping``, then sends ``--requests`` POST /invocations requests from
``--threads`` threads, each of 1 to 3 prompts (varied, one with a character outside the
vocabulary, one empty) with ``max_new_tokens`` and a seed, and checks every answer: HTTP
200, one string per prompt, exactly ``max_new_tokens`` characters, all of them from the
model's vocabulary (or U+FFFD, what the unknown id decodes to), and the same text for the
same prompt and seed. It prints requests/s and latency p50/p90/p99 per load phase and
their medians over ``--repeats`` phases; any wrong answer makes it exit non-zero.

Latency is measured by the client, from the request's first byte to the whole answer,
one fresh loopback connection per request. The tests (tests/test_reliability_serve.py)
use the same helpers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# This tree's package, not the installed one (an editable install points at another checkout when this
# runs from a worktree), in this process and in the processes it starts.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
HOST = "127.0.0.1"
PROMPTS = (
    "The ",
    "the king",
    "and the ",
    "Once upon a time",
    "",  # an empty prompt: the sampler starts from a newline
    "caf\u00e9 \u2603 ",  # characters outside a plain-English vocabulary: read as the unknown id
    "A" * 200,  # longer than the debug preset's 32-character context: the window slides
    "while seven wizards quietly judge",
)


# ---------------------------------------------------------------- a small registered model


def build_dataset(out: Path, source: str = "default") -> Path:
    """Ingest and encode `source` (the built-in corpus by default) under `out`; the dataset path."""
    from fundamentallm.config import EncodeConfig, IngestConfig
    from fundamentallm.data.encode import encode
    from fundamentallm.data.ingest import ingest

    docs = ingest(IngestConfig(sources=(source,)), out)
    return Path(encode(docs.path, EncodeConfig(), out).path)


def train_and_register(
    dataset: Path, run_dir: Path, name: str, *, preset: str = "debug", steps: int = 40, experiment: str = "serve"
) -> str:
    """Train `preset` for `steps` steps and register it as a new version of `name`, in the store
    `fundamentallm.tracking` points at (set ``FUNDAMENTALLM_MLRUNS`` first for a private one).
    Returns ``models:/<name>@champion`` when the new version is champion (a first version
    is), else ``models:/<name>/<version>``."""
    from fundamentallm.presets import preset as make_preset
    from fundamentallm.registry import log_model, register
    from fundamentallm.tracking import tracked_run
    from fundamentallm.train import train

    config = make_preset(preset)
    config = config.replace(
        train=config.train.replace(
            max_steps=steps,
            time_budget_s=0.0,
            eval_interval=steps,
            checkpoint_interval=steps,
            compile=False,
        )
    )
    result = train(dataset, config, run_dir)
    with tracked_run(experiment, f"{name}-{preset}-{steps}", {"purpose": "serving benchmark"}) as tracker:
        log_model(tracker, result.best_checkpoint, "The ")
        record = register(
            tracker,
            name,
            val_bpc=result.best_val_loss / math.log(2),
            dataset_id=Path(dataset).name,
            tags={"preset": preset},
            description=f"{preset}, {steps} steps, for the serving benchmark",
        )
    if not record.champion:
        return record.model_uri
    return f"models:/{name}@champion"


def model_alphabet(model_uri: str) -> frozenset[str]:
    """Every character the model can produce: its vocabulary and U+FFFD (the unknown id)."""
    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.data.vocab import UNK_CHAR
    from fundamentallm.registry import download_checkpoint

    vocab = load_checkpoint(download_checkpoint(model_uri)).vocab
    return frozenset(vocab.chars) | {UNK_CHAR}


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 120.0) -> tuple[int, str]:
    """One HTTP request on a fresh loopback connection: (status, body text)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", errors="replace")
    finally:
        conn.close()


def invoke(port: int, prompts: Sequence[str], params: dict[str, Any], timeout: float = 120.0) -> tuple[int, str]:
    """POST /invocations in MLflow's ``{"inputs": [...], "params": {...}}`` format."""
    body = json.dumps({"inputs": list(prompts), "params": params}).encode("utf-8")
    return request(port, "POST", "/invocations", body, timeout)


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


@contextmanager
def serve(
    model_uri: str, log: Path, *, tracking_uri: str, port: int = 0, deadline_s: float = 180.0
) -> Iterator[Server]:
    """Run ``mlflow models serve`` on 127.0.0.1 until the block ends; stopped in every case
    (SIGTERM to its process group, SIGKILL after 15 s)."""
    port = port or free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli)] if mlflow_cli.is_file() else [sys.executable, "-m", "mlflow"]
    command += ["models", "serve", "-m", model_uri, "--env-manager", "local", "--host", HOST, "--port", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    # The CLI starts `uvicorn` through the shell's PATH: this interpreter's bin directory first
    # (an unactivated virtualenv is not on PATH).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    server = Server(process, port, log)
    try:
        wait_ready(server, deadline_s)
        yield server
    finally:
        stop(process)


def wait_ready(server: Server, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.process.returncode}:\n{server.log_tail()}")
        try:
            status, _ = request(server.port, "GET", "/ping", timeout=5)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not answer /ping within {deadline_s:.0f} s:\n{server.log_tail()}")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop the server's process group (the CLI and the uvicorn it starts): SIGTERM, then
    SIGKILL to whatever is left after `grace_s`; returns once no process of the group is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with suppress(subprocess.TimeoutExpired):
                process.wait(0.1)
            if process.returncode is not None and not group_members(process.pid):
                return
    raise RuntimeError(f"processes {group_members(process.pid)} of the server's group outlived SIGKILL")


def listening_addresses(port: int) -> list[str]:
    """Local addresses of the sockets listening on `port`, from /proc/net/tcp and tcp6 (hex, as the kernel writes)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


# ---------------------------------------------------------------- load


@dataclass
class Phase:
    requests: int
    seconds: float
    latencies: list[float]
    problems: list[str] = field(default_factory=list)
    texts: dict[tuple[str, int], set[str]] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]


def plan(requests: int) -> list[tuple[list[str], int]]:
    """The requests of a load phase: 1 to 3 prompts each and a seed, varied deterministically."""
    return [([PROMPTS[(i + j * 3) % len(PROMPTS)] for j in range(1 + i % 3)], i % 5) for i in range(requests)]


def check_answer(
    status: int, body: str, prompts: Sequence[str], max_new_tokens: int, alphabet: frozenset[str]
) -> tuple[list[str], list[str]]:
    """(problems, texts) of one answer."""
    if status != 200:
        return [f"HTTP {status}: {body[:300]}"], []
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError):
        return [f"not a predictions answer: {body[:300]}"], []
    if not isinstance(predictions, list) or len(predictions) != len(prompts):
        return [f"{len(prompts)} prompts but predictions {str(predictions)[:300]}"], []
    problems = []
    for text in predictions:
        if not isinstance(text, str) or len(text) != max_new_tokens:
            problems.append(f"prediction {text!r} is not a string of {max_new_tokens} characters")
        elif not set(text) <= alphabet:
            problems.append(f"prediction {text!r} has characters outside the vocabulary: {set(text) - alphabet}")
    return problems, predictions


def load(port: int, requests: int, threads: int, max_new_tokens: int, alphabet: frozenset[str]) -> Phase:
    """Send `requests` requests from `threads` threads and check every answer."""
    work = plan(requests)

    def one(item: tuple[list[str], int]) -> tuple[float, int, str]:
        prompts, seed = item
        started = time.perf_counter()
        try:
            status, body = invoke(port, prompts, {"max_new_tokens": max_new_tokens, "seed": seed})
        except OSError as exc:
            status, body = 0, f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - started, status, body

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(one, work))
    phase = Phase(requests, time.perf_counter() - started, [a[0] for a in answers])
    for (prompts, seed), (_, status, body) in zip(work, answers, strict=True):
        problems, texts = check_answer(status, body, prompts, max_new_tokens, alphabet)
        phase.problems += [f"prompts {prompts!r} seed {seed}: {p}" for p in problems]
        for prompt, text in zip(prompts, texts, strict=False):
            phase.texts.setdefault((prompt, seed), set()).add(text)
    for (prompt, seed), seen in phase.texts.items():
        if len(seen) > 1:
            phase.problems.append(f"prompt {prompt!r} seed {seed} gave {len(seen)} different texts: {sorted(seen)}")
    return phase


# ---------------------------------------------------------------- the script


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a registered or logged model URI to serve (default: train one)")
    parser.add_argument("--preset", default="debug", help="preset to train when no --model is given")
    parser.add_argument("--steps", type=int, default=40, help="training steps when no --model is given")
    parser.add_argument("--source", default="default", help="corpus to train on when no --model is given")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="load phases; figures are their medians")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if args.requests < 2 or args.threads < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        parser.error("--requests must be at least 2, --threads, --repeats and --max-new-tokens at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp_path = Path(tmp)
        if args.model is None:
            os.environ["FUNDAMENTALLM_MLRUNS"] = str(tmp_path / "mlruns")
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        from fundamentallm.tracking import tracking_uri

        model_uri = args.model
        if model_uri is None:
            started = time.perf_counter()
            dataset = build_dataset(tmp_path / "data", args.source)
            model_uri = train_and_register(
                dataset, tmp_path / "run", "serve-bench", preset=args.preset, steps=args.steps
            )
            print(
                f"trained {args.preset} for {args.steps} steps on {args.source} and registered {model_uri} "
                f"in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
        alphabet = model_alphabet(model_uri)
        started = time.perf_counter()
        with serve(model_uri, tmp_path / "server.log", tracking_uri=tracking_uri(), port=args.port) as server:
            print(
                f"serving {model_uri} on {HOST}:{server.port} (ready in {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
            status, body = invoke(server.port, ["The "], {"max_new_tokens": 4})  # warm-up, not counted
            if status != 200:
                print(f"warm-up request failed: HTTP {status}: {body[:500]}", file=sys.stderr)
                return 1
            phases = []
            for repeat in range(args.repeats):
                phase = load(server.port, args.requests, args.threads, args.max_new_tokens, alphabet)
                phases.append(phase)
                print(
                    f"phase {repeat + 1}: {phase.requests} requests, {args.threads} threads, "
                    f"max_new_tokens {args.max_new_tokens}: {phase.requests_per_s:.1f} requests/s, "
                    f"latency p50 {phase.percentile(50) * 1000:.0f} ms, p90 {phase.percentile(90) * 1000:.0f} ms, "
                    f"p99 {phase.percentile(99) * 1000:.0f} ms; wrong answers: {len(phase.problems)}",
                    flush=True,
                )
                for problem in phase.problems[:10]:
                    print(f"  {problem}", file=sys.stderr)
    figures = {
        "model": model_uri,
        "requests": args.requests,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "requests_per_s": statistics.median(p.requests_per_s for p in phases),
        "p50_ms": statistics.median(p.percentile(50) for p in phases) * 1000,
        "p90_ms": statistics.median(p.percentile(90) for p in phases) * 1000,
        "p99_ms": statistics.median(p.percentile(99) for p in phases) * 1000,
        "wrong_answers": sum(len(p.problems) for p in phases),
    }
    print(
        f"median of {args.repeats}: {figures['requests_per_s']:.1f} requests/s, "
        f"latency p50 {figures['p50_ms']:.0f} ms, p90 {figures['p90_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms; "
        f"every answer checked, wrong answers: {figures['wrong_answers']}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["wrong_answers"] else 0


if __name__ == "__main__":
    sys.exit(main())
