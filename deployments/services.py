"""Start and stop the local services: `python deployments/services.py up|down|status`.

up: a Prefect server (sqlite), a process work pool and a worker for it, the deployments of
`deployments/prefect.yaml`, and an MLflow tracking server on the embedded store. Everything
binds to 127.0.0.1 (see below). Each service is started in a process group of its own, its
PID written to `.services/<name>.pid` and its output to `.services/<name>.log`; `up` waits until each answers
its health check and prints the URLs. down: stops exactly those process groups.

Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000), WORKER_HEALTH_PORT (8085).

Everything listens on 127.0.0.1 only, unless FUNDAMENTALLM_BIND_HOST names another address
for the Prefect and MLflow servers (0.0.0.0: all interfaces; clients here still use 127.0.0.1).

Databases: sqlite files by default (Prefect's under PREFECT_HOME, MLflow's `mlflow.db` in the
store). FUNDAMENTALLM_PREFECT_DATABASE_URL and FUNDAMENTALLM_MLFLOW_DATABASE_URL put the Prefect
server and the MLflow server on PostgreSQL instead, one database each (both keep an
`alembic_version` table, so they cannot share one): plain `postgresql://user:password@host:port/db`
URLs, password percent-encoded. The Prefect server gets PREFECT_SERVER_DATABASE_CONNECTION_URL
with the asyncpg driver (`postgresql+asyncpg://`), the MLflow server MLFLOW_BACKEND_STORE_URI
with psycopg2 named (`postgresql+psycopg2://`: SQLAlchemy 2.1 would otherwise pick psycopg 3),
each through its environment only, never its command line; the password is printed as `***`.

Flow runs started by the worker send a heartbeat every 30 s (PREFECT_FLOWS_HEARTBEAT_FREQUENCY),
and `deployments/automations.py` installs the automation that marks a run Crashed when its
heartbeats stop (a killed worker or machine), so no run stays "Running" for ever.

Notifications: FUNDAMENTALLM_NOTIFY_URL (unset: off) names an http(s) webhook URL; `up` then
has `deployments/automations.py` install automations that POST JSON (`{"subject", "text"}`) to
it when a model's champion changes and when a train-pipeline run fails, crashes or times out.
The Prefect server sends them: a URL that refuses is logged in `prefect-server.log` and fails
no run. `up` prints the URL's scheme and host only (a webhook's path often holds its secret).

Prefect's own settings in the environment reach the server as they are: the scheduler creates
the first runs of a new or changed deployment's schedule within about 5 s (its "recent
deployments" loop), and tops up every PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS (60).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from fundamentallm.redact import mask_credentials

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("FUNDAMENTALLM_SERVICES_DIR", ROOT / ".services"))
BIN = Path(sys.executable).parent
POOL = "fundamentallm"
BIND = os.environ.get("FUNDAMENTALLM_BIND_HOST", "127.0.0.1")
"""Where the servers listen: loopback only, unless the user sets FUNDAMENTALLM_BIND_HOST (e.g. 0.0.0.0)."""
HOST = "127.0.0.1" if BIND in ("0.0.0.0", "::") else BIND
"""Where clients on this machine reach them."""


def _ports() -> dict[str, int]:
    return {
        "prefect": int(os.environ.get("PREFECT_PORT", "4200")),
        "mlflow": int(os.environ.get("MLFLOW_PORT", "5000")),
        "worker": int(os.environ.get("WORKER_HEALTH_PORT", "8085")),
    }


DATABASE_SETTINGS = {
    "prefect": ("FUNDAMENTALLM_PREFECT_DATABASE_URL", "postgresql+asyncpg"),
    "mlflow": ("FUNDAMENTALLM_MLFLOW_DATABASE_URL", "postgresql+psycopg2"),
}
"""Per server: the setting naming its PostgreSQL database, and the SQLAlchemy driver it is given
(whatever driver the URL names is replaced: Prefect needs asyncpg, MLflow's jobs support psycopg2)."""
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2")


def _database_urls() -> dict[str, str]:
    """The PostgreSQL URL each server is given (with its driver), for the servers whose setting is
    set; a server without one keeps its sqlite file."""
    urls, where = {}, {}
    for server, (setting, driver) in DATABASE_SETTINGS.items():
        value = os.environ.get(setting, "").strip()
        if not value:
            continue
        scheme, _, rest = value.partition("://")
        if scheme not in _POSTGRES_SCHEMES or not rest:
            raise SystemExit(
                f"{setting}={mask_credentials(value)}: expected a PostgreSQL URL, "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (unset it to keep sqlite)"
            )
        parsed = urllib.parse.urlsplit(f"{driver}://{rest}")
        try:
            port = parsed.port or 5432
        except ValueError:
            raise SystemExit(f"{setting}={mask_credentials(value)}: the port is not a number") from None
        if not parsed.path.strip("/"):
            raise SystemExit(f"{setting}={mask_credentials(value)}: name the database (postgresql://...:PORT/DATABASE)")
        urls[server] = f"{driver}://{rest}"
        where[server] = ((parsed.hostname or "").lower(), port, parsed.path.strip("/"))
    if len(where) == 2 and where["prefect"] == where["mlflow"]:
        raise SystemExit(
            "FUNDAMENTALLM_PREFECT_DATABASE_URL and FUNDAMENTALLM_MLFLOW_DATABASE_URL name the same database; "
            "give each server a database of its own (both keep an alembic_version table)"
        )
    return urls


NOTIFY_SETTING = "FUNDAMENTALLM_NOTIFY_URL"


def _notify_url() -> str | None:
    """FUNDAMENTALLM_NOTIFY_URL, checked before anything starts (automations.py checks it the same way)."""
    value = os.environ.get(NOTIFY_SETTING, "").strip()
    if not value:
        return None
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SystemExit(
            f"{NOTIFY_SETTING}: expected an http(s) URL with a host, such as https://hooks.example.com/..."
        )
    return value


def _shown_url(url: str) -> str:
    """`url` without credentials, path or query (a webhook URL's path is often its secret)."""
    parsed = urllib.parse.urlsplit(url)
    try:
        port = f":{parsed.port}" if parsed.port else ""
    except ValueError:
        port = ""
    rest = "/..." if parsed.path.strip("/") or parsed.query else ""
    return f"{parsed.scheme}://{parsed.hostname}{port}{rest}"


def _env() -> dict[str, str]:
    ports = _ports()
    sys.path.insert(0, str(ROOT))
    from fundamentallm.tracking import store_dir

    env = {k: v for k, v in os.environ.items() if k not in {s for s, _ in DATABASE_SETTINGS.values()}}
    env.update(
        {
            "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api",
            "PREFECT_SERVER_API_HOST": BIND,
            "PREFECT_SERVER_API_PORT": str(ports["prefect"]),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_WORKER_WEBSERVER_HOST": HOST,
            "PREFECT_WORKER_WEBSERVER_PORT": str(ports["worker"]),
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}",
            "FUNDAMENTALLM_MLRUNS": str(store_dir()),
            "GX_ANALYTICS_ENABLED": "false",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _started_at(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or ''."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _read_pid(name: str) -> tuple[int, str] | None:
    pid_file = STATE / f"{name}.pid"
    if not pid_file.exists():
        return None
    pid, _, started = pid_file.read_text().strip().partition(" ")
    return int(pid), started


def _alive(pid: int, started: str | None = None) -> bool:
    """True when `pid` runs and, given its recorded start time, is still the process we started.

    A child of this process that exited but was not yet reaped (a zombie) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        return False
    return started is None or not started or _started_at(pid) == started


def _start(name: str, command: list[str], env: dict[str, str]) -> int:
    recorded = _read_pid(name)
    if recorded and _alive(*recorded):
        print(f"{name}: already running (pid {recorded[0]})")
        return recorded[0]
    with open(STATE / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (STATE / f"{name}.pid").write_text(f"{proc.pid} {_started_at(proc.pid)}")
    return proc.pid


def _wait(name: str, url: str, pid: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise SystemExit(f"{name} exited; see {STATE / (name + '.log')}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{name} did not become healthy at {url} within {timeout:.0f}s; see {STATE / (name + '.log')}")


def _run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")


def up() -> None:
    from fundamentallm.tracking import TRAINING_VIEW

    databases = _database_urls()
    notify = _notify_url()
    STATE.mkdir(parents=True, exist_ok=True)
    env = _env()
    ports = _ports()
    store = Path(env["FUNDAMENTALLM_MLRUNS"])
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    # The database URLs reach the servers through their environment only: a command line is visible in `ps`.
    mlflow_env = {**env, "MLFLOW_BACKEND_STORE_URI": databases.get("mlflow", f"sqlite:///{store / 'mlflow.db'}")}
    prefect_env = dict(env)
    if "prefect" in databases:
        prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = databases["prefect"]
    mlflow = _start(
        "mlflow",
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            BIND,
            "--port",
            str(ports["mlflow"]),
            # Artifacts stay files the clients write and read themselves (no mlflow-artifacts:
            # URIs, which only a running server resolves): a model registered with the server up
            # loads with it down, from the same store, like one registered by `make run`.
            "--no-serve-artifacts",
            "--default-artifact-root",
            (store / "artifacts").as_uri(),
            "--workers",
            "1",
        ],
        mlflow_env,
    )
    prefect = _start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", BIND, "--port", str(ports["prefect"])],
        prefect_env,
    )
    _wait("prefect-server", f"http://{HOST}:{ports['prefect']}/api/health", prefect)
    _wait("mlflow", f"http://{HOST}:{ports['mlflow']}/health", mlflow)
    _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)
    _run([sys.executable, "deployments/automations.py"], env)
    worker = _start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--with-healthcheck"], env)
    _wait("worker", f"http://{HOST}:{ports['worker']}/health", worker)
    urls = {
        "prefect": f"http://{HOST}:{ports['prefect']}",
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
        "prefect_api": env["PREFECT_API_URL"],
    }
    (STATE / "urls.json").write_text(json.dumps(urls, indent=2))
    print(f"Prefect UI:  {urls['prefect']}\nMLflow UI:   {urls['mlflow']}/{TRAINING_VIEW}")
    prefect_db = mask_credentials(databases["prefect"]) if "prefect" in databases else "sqlite (PREFECT_HOME)"
    print(f"Databases:   Prefect {prefect_db}, MLflow {mask_credentials(mlflow_env['MLFLOW_BACKEND_STORE_URI'])}")
    print(
        "Deployments: train-pipeline/default (on demand), train-pipeline/nightly (03:00 UTC), "
        "train-sweep/default (on demand)"
    )
    if notify:
        print(f"Notifications: champion changes and failed train-pipeline runs, POSTed to {_shown_url(notify)}")
    else:
        print(f"Notifications: off (turn them on with {NOTIFY_SETTING}=https://... make up)")
    print(
        f"Use them from this shell with:\n  export PREFECT_API_URL={urls['prefect_api']} "
        f"MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']}"
    )
    print("  .venv/bin/prefect deployment run train-pipeline/default --param preset=cpu-quick")


def down() -> None:
    stopped = []
    for name in ("worker", "prefect-server", "mlflow"):
        recorded = _read_pid(name)
        if recorded is None:
            continue
        pid, started = recorded
        if _alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid, started):
                os.killpg(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10  # a killed process still has to exit: stopped means gone
                while _alive(pid, started) and time.monotonic() < deadline:
                    time.sleep(0.1)
            stopped.append(f"{name} (pid {pid})")
        (STATE / f"{name}.pid").unlink()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def status() -> None:
    for name in ("prefect-server", "mlflow", "worker"):
        recorded = _read_pid(name)
        state = "stopped"
        if recorded:
            state = f"running (pid {recorded[0]})" if _alive(*recorded) else f"dead (stale pid {recorded[0]})"
        print(f"{name}: {state}")


if __name__ == "__main__":
    actions = {"up": up, "down": down, "status": status}
    if len(sys.argv) != 2 or sys.argv[1] not in actions:
        raise SystemExit("usage: python deployments/services.py up|down|status")
    actions[sys.argv[1]]()
