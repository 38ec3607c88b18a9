"""Shared fixtures: tiny corpora written by the test itself, never the network or ../shared."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fundamentallm.config import DataConfig

WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
    "and",
    "the",
    "king",
    "speaks",
    "of",
    "love",
    "war",
    "and",
    "the",
    "sea",
    "to",
    "his",
    "fool",
)


def prose(seed: int, words: int = 400) -> str:
    """Deterministic English-like text: lines of random words with punctuation."""
    rng = random.Random(seed)
    lines = []
    while words > 0:
        n = min(words, rng.randint(5, 12))
        line = " ".join(rng.choice(WORDS) for _ in range(n))
        lines.append(line.capitalize() + rng.choice([".", ",", "!", "?", ";"]))
        words -= n
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A directory of five small text documents (about 12,000 characters in all)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        (root / f"doc{i}.txt").write_text(prose(i), encoding="utf-8")
    (root / "sub" / "doc4.txt").write_text(prose(4), encoding="utf-8")
    return root


def small_config(*sources: str | Path, **encode: object) -> DataConfig:
    """Settings for tiny corpora: a short context so small splits validate."""
    return DataConfig.from_dict(
        {
            "ingest": {"sources": [str(s) for s in sources]},
            "validation": {"context_length": 32},
            "encode": {"shard_tokens": 4096, **encode},
        }
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """An encoded dataset of about 60,000 characters of prose (contiguous split 90/5/5)."""
    from fundamentallm.config import EncodeConfig, IngestConfig
    from fundamentallm.data.encode import encode
    from fundamentallm.data.ingest import ingest

    root = tmp_path_factory.mktemp("tiny")
    (root / "corpus").mkdir()
    for i in range(6):
        (root / "corpus" / f"{i}.txt").write_text(prose(100 + i, 2000), encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(root / "corpus"),)), root / "out")
    return Path(encode(docs.path, EncodeConfig(), root / "out").path)


def debug_config(**train: object):
    """The debug preset with train settings replaced."""
    from fundamentallm.presets import preset

    config = preset("debug")
    return config.replace(train=config.train.replace(**train))


def poison_training_loss(monkeypatch, poisoned_call) -> None:
    """Make the training loss NaN on the forward passes for which `poisoned_call(n)` is true
    (n counts training forward passes from 1)."""
    from fundamentallm import model as model_module

    original = model_module.CharTransformer.forward
    calls = {"n": 0}

    def forward(self, ids, targets=None, caches=None):
        logits, loss = original(self, ids, targets, caches)
        if targets is not None and self.training:
            calls["n"] += 1
            if poisoned_call(calls["n"]):
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.CharTransformer, "forward", forward)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One temporary Prefect API for every flow test, with its own PREFECT_HOME."""
    import os

    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """A private embedded MLflow store (sqlite + artifacts) for the session."""
    import os

    store = tmp_path_factory.mktemp("mlruns")
    saved = {k: os.environ.get(k) for k in ("FUNDAMENTALLM_MLRUNS", "MLFLOW_TRACKING_URI")}
    os.environ["FUNDAMENTALLM_MLRUNS"] = str(store)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield store
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# Real services on loopback ports, for the end-to-end tests ------------------------------

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, payload: dict | None = None) -> dict:
    """GET `url` (or POST `payload` as JSON) and decode the JSON answer."""
    import json
    import urllib.request

    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def services_command(action: str, env: dict[str, str]) -> str:
    """Run `deployments/services.py ACTION` (what `make up` / `make down` run); returns its output."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "deployments/services.py", action],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"services.py {action} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def start_services(state_dir: Path, **extra_env: str):
    """Start the Prefect server, worker and MLflow server on free ports in `state_dir`; yields
    (env, ports, what `up` printed); stops them, and checks each started process is gone."""
    import os

    ports = {"PREFECT_PORT": free_port(), "MLFLOW_PORT": free_port(), "WORKER_HEALTH_PORT": free_port()}
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "FUNDAMENTALLM_SERVICES_DIR": str(state_dir / "services"),
        "FUNDAMENTALLM_MLRUNS": str(state_dir / "mlruns"),
        "PREFECT_HOME": str(state_dir / "prefect-home"),
        **extra_env,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    started: dict[str, int] = {}
    try:
        printed = services_command("up", env)
        started = {p.stem: int(p.read_text().split()[0]) for p in (state_dir / "services").glob("*.pid")}
        yield env, ports, printed
    finally:
        # Services restarted by a test wrote new pid files: stop whatever they name now.
        started.update({p.stem: int(p.read_text().split()[0]) for p in (state_dir / "services").glob("*.pid")})
        services_command("down", env)
        for name, pid in started.items():
            status = Path(f"/proc/{pid}/status")
            assert not status.exists() or "zombie" in status.read_text().lower(), f"{name} (pid {pid}) still runs"
