"""Real servers under trouble: two pipelines at once, the MLflow server lost mid-run, the
Prefect worker killed mid-run. Every run ends in a state that says what happened, nothing
is left RUNNING in MLflow, and the champion alias ends on the best model."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import (
    client_env,
    deployment_params,
    get_json,
    run_deployment,
    services_command,
    wait_for_flow_run,
    write_corpus,
)

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
LONG = ["train.max_steps=0", "train.time_budget_s=300"]  # a run that is still training when it is hit


@pytest.fixture
def stack(shared_stack):
    return shared_stack  # conftest: on PostgreSQL where it can run, with a 90 s heartbeat window


def _listening(port: int) -> set[str]:
    """Addresses on which something listens on TCP `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            if len(address) == 8:
                found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::1" if address == "0" * 24 + "01000000" else address)
    return found


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_service(state_dir: Path, name: str) -> None:
    """SIGKILL a service started by `make up`, with its process group and every process under it."""
    pid = int((state_dir / f"{name}.pid").read_text().split()[0])
    victims = [pid, *_descendants(pid)]
    os.killpg(pid, signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


class Stack:
    def __init__(self, env: dict[str, str], ports: dict[str, int], root: Path):
        self.client_env, self.api, self.mlflow = client_env(env, ports)
        self.env = env
        self.state_dir = Path(env["FUNDAMENTALLM_SERVICES_DIR"])
        self.root = root

    def submit(self, params: dict) -> str:
        return run_deployment(self.client_env, params, watch=False, timeout=120)[1]

    def flow_run(self, flow_run_id: str) -> dict:
        return get_json(f"{self.api}/flow_runs/{flow_run_id}")

    def wait(self, flow_run_id: str, states: set[str], timeout: float) -> dict:
        return wait_for_flow_run(self.api, flow_run_id, states, timeout)

    def wait_training(self, flow_run_id: str, timeout: float = 300) -> Path:
        """The run directory, once training has logged its first metrics."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list((self.root / "runs").glob(f"*-{flow_run_id[:8]}/metrics.jsonl"))
            if found and found[0].stat().st_size:
                return found[0].parent
            run = self.flow_run(flow_run_id)
            assert run["state"]["type"] not in FINAL, f"flow run ended before training: {run['state']}"
            time.sleep(1)
        raise AssertionError(f"training did not start within {timeout:.0f} s")

    def mlflow_runs(self, experiment: str) -> dict[str, dict]:
        """MLflow runs of `experiment` by Prefect flow-run id."""
        exp = get_json(f"{self.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
        runs = get_json(
            f"{self.mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]}
        )["runs"]
        by_flow_run = {}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            by_flow_run[tags["prefect.flow_run_id"]] = {"status": run["info"]["status"], "tags": tags}
        return by_flow_run

    def versions(self, name: str) -> dict[str, float]:
        found = get_json(f"{self.mlflow}/api/2.0/mlflow/model-versions/search?filter=name%3D%27{name}%27")
        return {
            v["version"]: float({t["key"]: t["value"] for t in v["tags"]}["val_bpc"])
            for v in found.get("model_versions", [])
        }

    def champion(self, name: str) -> str:
        alias = get_json(f"{self.mlflow}/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion")
        return alias["model_version"]["version"]


def test_concurrent_runs_lost_tracking_server_and_killed_worker(stack, tmp_path):
    env, ports, _ = stack
    s = Stack(env, ports, tmp_path)
    for name, port in ports.items():
        assert _listening(port) == {"127.0.0.1"}, f"{name} listens on {_listening(port)}"

    corpus = write_corpus(tmp_path / "corpus", seed=400)
    base = deployment_params(tmp_path, corpus, "rel-char", "rel")

    # 1. Two pipelines at once on the same corpus and store: a short one and a longer, better one.
    short = s.submit({**base, "overrides": ["train.max_steps=30"]})
    longer = s.submit({**base, "overrides": ["train.max_steps=250"]})
    for flow_run_id in (short, longer):
        assert s.wait(flow_run_id, FINAL, timeout=600)["state"]["type"] == "COMPLETED"
    mlflow_runs = s.mlflow_runs("rel")
    assert {mlflow_runs[r]["status"] for r in (short, longer)} == {"FINISHED"}
    versions = s.versions("rel-char")
    assert sorted(versions) == ["1", "2"]
    assert versions[s.champion("rel-char")] == min(versions.values())
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 2 and all((d / "best.pt").is_file() and (d / "latest.pt").is_file() for d in run_dirs)
    datasets = [m.parent for m in (tmp_path / "data").rglob("manifest.json")]
    assert len(datasets) == 1, datasets  # one content-addressed dataset, written once, shared
    assert not list((tmp_path / "data").rglob(".tmp-*"))

    # 2. The MLflow server dies mid-run: the run fails (it does not hang) and says why.
    lost_tracking = s.submit({**base, "overrides": LONG})
    s.wait_training(lost_tracking)
    _kill_service(s.state_dir, "mlflow")
    run = s.wait(lost_tracking, FINAL, timeout=600)  # a hang guard, not a speed check
    assert run["state"]["type"] == "FAILED", run["state"]
    assert f"MLflow tracking server {s.mlflow} is unreachable" in run["state"]["message"]
    services_command("up", env)  # brings the MLflow server back; the others still run

    # 3. The worker is killed (with the flow run's process) mid-run: the run is marked Crashed.
    lost_worker = s.submit({**base, "overrides": LONG})
    s.wait_training(lost_worker)
    _kill_service(s.state_dir, "worker")
    run = s.wait(lost_worker, FINAL, timeout=600)  # a hang guard: the 90 s window, then the automation
    assert run["state"]["type"] == "CRASHED", run["state"]
    assert "no heartbeat" in run["state"]["message"]
    services_command("up", env)  # a new worker

    # 4. The next run to start closes the MLflow run a broken run could not close: the run of step 3
    # closed step 2's; a new one closes step 3's, and completes.
    mlflow_runs = s.mlflow_runs("rel")
    assert mlflow_runs[lost_tracking]["status"] == "FAILED"
    assert mlflow_runs[lost_worker]["status"] == "RUNNING"
    fresh = s.submit(base)
    assert s.wait(fresh, FINAL, timeout=600)["state"]["type"] == "COMPLETED"
    mlflow_runs = s.mlflow_runs("rel")
    assert mlflow_runs[fresh]["status"] == "FINISHED"
    assert mlflow_runs[lost_tracking]["status"] == "FAILED"
    assert "ended Failed" in mlflow_runs[lost_tracking]["tags"]["failure_reason"]
    assert mlflow_runs[lost_worker]["status"] == "FAILED"
    assert "ended Crashed" in mlflow_runs[lost_worker]["tags"]["failure_reason"]
    versions = s.versions("rel-char")
    assert sorted(versions) == ["1", "2", "3"]  # the broken runs registered nothing
    assert versions[s.champion("rel-char")] == min(versions.values())
