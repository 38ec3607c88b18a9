"""Shared fixtures: tiny corpora written by the test itself, never the network or ../shared."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Under CI=true a skip is a failure unless its test is listed here: CI installs Chromium and
# PostgreSQL itself, so their absence is a broken CI, not a reason to skip. Each entry says why
# that test may still skip in CI; the reason is printed at the end of the session.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
SKIPS_ALLOWED_IN_CI = {
    "tests/test_reliability_crash.py::test_a_full_disk_gives_a_clear_error_and_corrupts_nothing": (
        "mounting a tmpfs needs more than root in a container (CAP_SYS_ADMIN); the kernel may refuse it"
    ),
}

# Tests marked `avx512` run AVX-512 code (the C kernels of fundamentallm/native.py), which a CPU
# without it cannot: there they skip, in CI too, and the model uses PyTorch's operators instead, which
# the unmarked tests cover on every machine.
AVX512_SKIP = "runs AVX-512 code (fundamentallm/native.py's kernels), and PyTorch runs this CPU below AVX-512"
AVX512_ALLOWED = "a CPU without AVX-512 cannot run the kernels; PyTorch's operators do that work there"
# Tests marked `amx` run the attention kernel on the tile units (Intel Xeons since Sapphire Rapids): they skip,
# in CI too, where the CPU has none (or PyTorch runs it below AVX-512), and the model's attention is
# `_SlicedAttention` there, which the `avx512` and unmarked tests cover. A CPU that has them runs the tests,
# so a kernel that does not build or is refused the tile units there fails.
AMX_SKIP = "runs the attention kernel on AMX tile units, which this CPU lacks (or PyTorch runs it below AVX-512)"
AMX_ALLOWED = "a CPU without AMX cannot run the tile kernel; _SlicedAttention does that work there"


def skip_or_fail(reason: str) -> None:
    """Skip the test saying why, or under CI=true fail it: CI provides what it needs."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: CI installs this, so its absence is a broken CI)", pytrace=False)
    pytest.skip(reason)


# Hang guards per marker (pytest-timeout; pyproject's `timeout = 600` covers the rest): generous,
# several times what each kind takes on a loaded 2-core machine, so only a hang reaches them.
TIMEOUT_BY_MARKER = {"heavy": 900, "flow": 900, "reliability": 1800, "postgres": 1800, "e2e": 1800}


# Two (or more) test processes: `make test` runs `pytest -n auto` (pytest-xdist). A test runs in
# the process of its module (module-scoped fixtures are built once), and the modules that share
# `shared_stack` share one process (one set of services, one PostgreSQL cluster): the scheduler
# below. The groups go out heaviest first, by their heaviest marker (services before flows before
# training), so the long end-to-end groups start at once rather than last. Each process gets an
# equal share of the CPUs for PyTorch (OMP_NUM_THREADS, inherited by the servers and trainers a
# test starts): two processes of two threads on two cores would fight over them.
SHARED_STACK_MODULES = ("tests/test_postgres.py", "tests/test_reliability_services.py")
GROUP_WEIGHT_BY_MARKER = {"e2e": 100, "postgres": 100, "reliability": 30, "flow": 20, "heavy": 10}

if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cpus // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def process_group(nodeid: str) -> str:
    """The group of tests that run in one process: the test's module, or the shared services'."""
    module = nodeid.split("::")[0]
    return "shared-stack" if module in SHARED_STACK_MODULES else module


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: ignored where it is not installed
def pytest_xdist_make_scheduler(config, log):
    """Whole groups per process, in the order the processes collected them (heaviest first)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return process_group(nodeid)

    config.option.loadscopereorder = False  # keep the order below, not "most tests first"
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """A hang guard per marker; in a pytest-xdist process, the heaviest groups first."""
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        limits = [s for name, s in TIMEOUT_BY_MARKER.items() if item.get_closest_marker(name) is not None]
        if limits:
            item.add_marker(pytest.mark.timeout(max(limits)))
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    weight: dict[str, int] = {}
    for item in items:
        marks = [w for name, w in GROUP_WEIGHT_BY_MARKER.items() if item.get_closest_marker(name) is not None]
        weight[process_group(item.nodeid)] = max(weight.get(process_group(item.nodeid), 0), *marks, 1)
    items.sort(key=lambda item: -weight[process_group(item.nodeid)])  # stable: a group keeps its order


def pytest_runtest_setup(item):
    """Skip a test marked `avx512` where PyTorch does not run this CPU at AVX-512, one marked `amx` where the
    CPU has no AMX tile units too."""
    avx512, amx = item.get_closest_marker("avx512") is not None, item.get_closest_marker("amx") is not None
    if avx512 or amx:
        from fundamentallm.native import cpu_has_amx, cpu_runs_avx512

        if avx512 and not cpu_runs_avx512():
            pytest.skip(AVX512_SKIP)
        if amx and not (cpu_runs_avx512() and cpu_has_amx()):
            pytest.skip(AMX_SKIP)


def run_suite_with_this_conftest(root: Path, modules: dict[str, str], *args: str, ci: str | None = None):
    """Run pytest (with `args`) on a throwaway suite in `root`: this conftest.py and `modules`
    (name -> source) in root/tests; CI set to `ci`, or unset. Returns the finished process."""
    import shutil
    import subprocess
    import sys

    tests = root / "tests"
    tests.mkdir(exist_ok=True)
    shutil.copy(Path(__file__), tests / "conftest.py")
    for name, source in modules.items():
        (tests / f"{name}.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "OMP_NUM_THREADS")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(root), *args, "."],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


_ci_skips: list[tuple[str, str, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true turn a skip of a test not in SKIPS_ALLOWED_IN_CI (or an `avx512` test's, below
    AVX-512, or an `amx` test's, without AMX) into a failure."""
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    allowed = SKIPS_ALLOWED_IN_CI.get(item.nodeid)
    if allowed is None and item.get_closest_marker("avx512") is not None and AVX512_SKIP in reason:
        allowed = AVX512_ALLOWED
    if allowed is None and item.get_closest_marker("amx") is not None and AMX_SKIP in reason:
        allowed = AMX_ALLOWED
    # for the summary, in this process or (under pytest-xdist) the controller's
    report.user_properties.append(("ci_skip", (reason, allowed or "")))
    if allowed is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, and this test is not in SKIPS_ALLOWED_IN_CI: {reason}"


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == "ci_skip":
            _ci_skips.append((report.nodeid, *value))


def pytest_terminal_summary(terminalreporter):
    if _ci_skips:
        terminalreporter.section("skips under CI=true")
        for nodeid, reason, allowed in _ci_skips:
            verdict = f"allowed: {allowed}" if allowed else "NOT ALLOWED (counted as a failure)"
            terminalreporter.write_line(f"{nodeid}: {reason}\n    {verdict}")


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


class InterruptAt:
    """A training callback that sends this process SIGINT at a given step, as Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_step(self, step, metrics):
        import os
        import signal

        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_eval(self, step, metrics):
        pass

    def on_end(self, result):
        pass


def _poison_training_forward(monkeypatch, poisoned_call, poison) -> None:
    """Pass the training loss through `poison` on the forward passes for which `poisoned_call(n)`
    is true (n counts training forward passes from 1)."""
    from fundamentallm import model as model_module

    original = model_module.CharTransformer.forward
    calls = {"n": 0}

    def forward(self, ids, targets=None, caches=None, **kwargs):
        logits, loss = original(self, ids, targets, caches, **kwargs)
        if targets is not None and self.training:
            calls["n"] += 1
            if poisoned_call(calls["n"]):
                loss = poison(loss)
        return logits, loss

    monkeypatch.setattr(model_module.CharTransformer, "forward", forward)


def poison_training_loss(monkeypatch, poisoned_call) -> None:
    """Make the training loss NaN on the forward passes for which `poisoned_call(n)` is true
    (n counts training forward passes from 1)."""
    _poison_training_forward(monkeypatch, poisoned_call, lambda loss: loss * float("nan"))


def poison_gradients(monkeypatch, poisoned_call) -> None:
    """Make the gradients infinite, the loss staying finite, on the training forward passes for
    which `poisoned_call(n)` is true (n counts training forward passes from 1)."""
    import torch

    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    _poison_training_forward(monkeypatch, poisoned_call, InfiniteGradient.apply)


def sample_checkpoint(
    checkpoint: str | Path, prompts: list[str], precision: str = "fp32", **params: object
) -> list[str]:
    """What sampling the checkpoint file directly on the CPU gives for `prompts`, one text each,
    with the registered model's default settings where `params` gives none: a registered, loaded
    or served model of that checkpoint must answer exactly this (in fp32; `fundamentallm sample`
    uses precision "auto")."""
    import torch

    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.mlflow_model import DEFAULT_PARAMS
    from fundamentallm.runtime import resolve_precision
    from fundamentallm.sample import SampleConfig, Sampler

    cpu = torch.device("cpu")
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    sampler = Sampler(ckpt.build_model(cpu), ckpt.vocab, cpu, resolve_precision(precision, cpu))
    settings = {**DEFAULT_PARAMS, **params}
    config = SampleConfig(
        max_new_tokens=int(settings["max_new_tokens"]),
        temperature=float(settings["temperature"]),
        top_k=int(settings["top_k"]),
        top_p=float(settings["top_p"]),
        seed=int(settings["seed"]),
        unknown="unk",
    )
    return [sampler.generate(prompt, config)[0] for prompt in prompts]


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
    """A loopback TCP port that is free now, for a server started later to bind.

    Chosen at random below the kernel's ephemeral range: a port from ``bind(0)`` lies in that
    range, where any outgoing connection (or another test's ``bind(0)``) may take it between this
    call and the server's bind; below it only a server told that very port can, and with about
    20,000 to choose from two tests rarely pick the same one."""
    import random
    import socket

    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    rng = random.SystemRandom()
    for _ in range(100 if low > 12000 else 0):
        port = rng.randrange(10000, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def refusing_port():
    """A loopback port that refuses connections for the whole test: bound by this process and
    never listened on, so nothing else can take it (unlike a port closed again, or port 9)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


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


def write_corpus(directory: Path, seed: int, files: int = 4, words: int = 2500) -> Path:
    """`files` documents of prose in `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"{i}.txt").write_text(prose(seed + i, words), encoding="utf-8")
    return directory


def client_env(env: dict[str, str], ports: dict[str, int]) -> tuple[dict[str, str], str, str]:
    """The environment of a client of the services, the Prefect API URL and the MLflow URL."""
    api = f"http://127.0.0.1:{ports['PREFECT_PORT']}/api"
    mlflow_url = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
    return {**env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url}, api, mlflow_url


def wait_for_flow_run(api: str, flow_run_id: str, states: set[str], timeout: float) -> dict:
    """Poll the Prefect API at `api` until the flow run's state type is one of `states`; a hang
    guard, not a timed assertion: it fails only after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        run = get_json(f"{api}/flow_runs/{flow_run_id}")
        if run["state"] and run["state"]["type"] in states:
            return run
        assert time.monotonic() < deadline, f"flow run still {run['state']} after {timeout:.0f} s"
        time.sleep(2)


def deployment_params(root: Path, corpus: Path, model_name: str, experiment: str) -> dict:
    """train-pipeline parameters for a quick run (debug preset) with data and runs under `root`."""
    return {
        "preset": "debug",
        "sources": [str(corpus)],
        "prompts": ["the "],
        "model_name": model_name,
        "experiment": experiment,
        "data_dir": str(root / "data"),
        "runs_dir": str(root / "runs"),
    }


def run_deployment(env: dict[str, str], params: dict, *, watch: bool = True, timeout: float = 900):
    """`prefect deployment run train-pipeline/default --param ...` (with --watch: until it ends);
    returns the finished command and the flow run's id."""
    import json
    import re
    import subprocess
    import sys

    command = [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "train-pipeline/default"]
    if watch:
        command += ["--watch", "--watch-timeout", str(int(timeout))]
    for key, value in params.items():
        command += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)


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


# A throwaway PostgreSQL cluster, for the tests marked `postgres` --------------------------------


class PostgresCluster:
    """A PostgreSQL cluster in a temporary directory: a superuser reached over its unix socket
    (trust, only its OS user and root can open the socket directory), and `user`/`password`
    owning the databases `prefect` and `mlflow`, reached over TCP on 127.0.0.1 with the password."""

    def __init__(self, bin_dir: Path, root: Path, port: int, run_as: list[str]):
        import secrets

        self.bin_dir, self.root, self.port, self.run_as = bin_dir, root, port, run_as
        self.host = "127.0.0.1"
        self.user = "fundamentallm"
        # '@' and '/' must be percent-encoded in a URL: the settings must cope with that.
        self.password = f"pw-{secrets.token_hex(8)}@/x"

    def url(self, database: str) -> str:
        """A plain ``postgresql://`` URL to `database`, password percent-encoded."""
        import urllib.parse

        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{self.user}:{password}@{self.host}:{self.port}/{database}"

    def command(self, *args: str, timeout: float = 120) -> str:
        """Run a PostgreSQL program from `bin_dir` as the cluster's OS user; returns its output."""
        import subprocess

        proc = subprocess.run(
            [*self.run_as, str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def sql(self, database: str, query: str) -> list[list[str]]:
        """Rows of `query`, run by the superuser in `database` (psql over the unix socket)."""
        out = self.command(
            "psql",
            *("-h", str(self.root / "socket"), "-p", str(self.port), "-U", "postgres", "-d", database),
            *("-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-F", "\t", "-c", query),
        )
        return [line.split("\t") for line in out.splitlines() if line]


@pytest.fixture(scope="session")
def postgres_cluster():
    """Debian's PostgreSQL (`apt-get install postgresql`; .ci/run installs it), started for the
    session on a free loopback port in a temporary directory, then stopped and removed. Skips,
    saying why, where the server binaries are missing or the cluster cannot start; under CI=true
    it fails instead."""
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile

    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name.split(".")[0])
    )
    if not found:
        skip_or_fail(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql"
        )
    bin_dir = found[-1].parent
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as Debian's `postgres` user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            skip_or_fail("running as root and there is no `postgres` OS user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if runuser is None:
            skip_or_fail("running as root without `runuser` to start PostgreSQL as the `postgres` user")
        run_as = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="fundamentallm-pg-"))  # not under pytest's root-only 0700 tmp
    (root / "socket").mkdir()
    if run_as:
        for path in (root, root / "socket"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    cluster = PostgresCluster(bin_dir, root, free_port(), run_as)
    data = root / "data"
    started = False
    try:
        try:
            cluster.command(
                "initdb",
                *("-D", str(data), "-U", "postgres", "--no-locale", "-E", "UTF8"),
                *("--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"),
            )
            options = (
                f"-p {cluster.port} -k {root / 'socket'} -c listen_addresses={cluster.host} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            cluster.command(
                "pg_ctl", "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", "60", "-o", options, "start"
            )
            started = True
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            log = root / "postgres.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            skip_or_fail(f"could not start a PostgreSQL cluster with {bin_dir}: {exc}\n{tail}")
        cluster.sql("postgres", f"CREATE ROLE {cluster.user} LOGIN PASSWORD '{cluster.password}'")
        for database in ("prefect", "mlflow"):
            cluster.sql("postgres", f"CREATE DATABASE {database} OWNER {cluster.user}")
        yield cluster
    finally:
        if started:
            cluster.command("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_stack(request, tmp_path_factory):
    """One set of services (`make up`) shared by the end-to-end tests that need no fresh one:
    on the session's PostgreSQL cluster where it can run (so the pipeline is exercised on the
    shared-services set-up), else on sqlite, saying so; under CI=true never on sqlite (the cluster
    fixture fails instead of skipping). The heartbeat window is the shipped 90 s (three of the
    30 s heartbeats, Prefect's shortest): a heartbeat late by up to a minute on a loaded machine
    does not mark a healthy run Crashed."""
    extra = {"FUNDAMENTALLM_ZOMBIE_AFTER_S": "90"}
    try:
        cluster = request.getfixturevalue("postgres_cluster")
    except pytest.skip.Exception as exc:
        print(f"shared services on sqlite: {exc}")
    else:
        extra["FUNDAMENTALLM_PREFECT_DATABASE_URL"] = cluster.url("prefect")
        extra["FUNDAMENTALLM_MLFLOW_DATABASE_URL"] = cluster.url("mlflow")
    yield from start_services(tmp_path_factory.mktemp("shared-stack"), **extra)


class RecordingTracker:
    """A tracker that keeps what it is given."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[str, str | None]] = []

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path).name, artifact_path))

    def log_dataset(self, dataset):
        pass
