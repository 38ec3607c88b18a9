"""`deployments/services.py status` and `down` (what `make down` runs) on stand-in processes:
which services run, the SIGKILL fallback for a process that ignores SIGTERM, and the guard
against a recorded PID that now belongs to another process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import services_command

# Stands in for a service: says when it is ready (its SIGTERM handling installed), then waits.
STAND_IN = (
    "import signal, sys, time\n"
    "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def _start_time(pid: int) -> str:
    # Field 22 of /proc/PID/stat; the command name (field 2) may hold spaces, so count after its ')'.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


@pytest.fixture
def state(tmp_path):
    env = {**os.environ, "FUNDAMENTALLM_SERVICES_DIR": str(tmp_path / "services")}
    (tmp_path / "services").mkdir()
    procs: list[subprocess.Popen] = []

    def stand_in(name: str | None, sigterm: str = "default", started: str | None = None) -> subprocess.Popen:
        """A process group standing in for service `name` (its pid file written unless name is None)."""
        proc = subprocess.Popen(
            [sys.executable, "-c", STAND_IN, sigterm], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        procs.append(proc)
        assert proc.stdout.readline() == "ready\n"
        if name is not None:
            recorded = started if started is not None else _start_time(proc.pid)
            (tmp_path / "services" / f"{name}.pid").write_text(f"{proc.pid} {recorded}")
        return proc

    yield env, tmp_path / "services", stand_in
    for proc in procs:
        proc.kill()
        proc.wait()


def _status(env) -> dict[str, str]:
    lines = services_command("status", env).splitlines()
    return dict(line.split(": ", 1) for line in lines)


def test_status_names_each_service_running_stopped_or_dead(state):
    env, _, stand_in = state
    assert _status(env) == {"prefect-server": "stopped", "mlflow": "stopped", "worker": "stopped"}
    worker = stand_in("worker")
    gone = stand_in("mlflow")
    gone.kill()
    gone.wait()  # reaped: its pid names no process now
    assert _status(env) == {
        "prefect-server": "stopped",
        "mlflow": f"dead (stale pid {gone.pid})",
        "worker": f"running (pid {worker.pid})",
    }


def test_a_recorded_pid_now_used_by_another_process_is_neither_reported_nor_killed(state):
    env, services, stand_in = state
    # The pid file names a live process, but with another start time: the service died and the
    # pid was given to an unrelated process since.
    other = stand_in("prefect-server", started=str(int(_start_time(os.getpid())) - 1))
    assert _status(env)["prefect-server"] == f"dead (stale pid {other.pid})"
    assert services_command("down", env).strip() == "stopped: nothing was running"
    assert other.poll() is None  # untouched
    assert not (services / "prefect-server.pid").exists()


@pytest.mark.reliability
def test_down_kills_a_service_that_ignores_sigterm(state):
    env, services, stand_in = state
    polite, stubborn = stand_in("mlflow"), stand_in("worker", "ignore")
    printed = services_command("down", env)  # SIGTERM, then SIGKILL after 20 s for the stubborn one
    assert printed.strip() == f"stopped: worker (pid {stubborn.pid}), mlflow (pid {polite.pid})"
    assert stubborn.wait(timeout=10) == -9 and polite.wait(timeout=10) == -15
    assert list(services.glob("*.pid")) == []
