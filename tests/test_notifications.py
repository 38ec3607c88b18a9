"""Notifications and schedules on real servers: one stack (`make up`) whose FUNDAMENTALLM_NOTIFY_URL
is a small HTTP server in this test that records what is POSTed to it. A champion change and a
failed run each arrive there; a URL that refuses fails no run; without the URL there is no
notification automation; and a deployment's schedule fires a run that the worker completes."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import (
    client_env,
    deployment_params,
    get_json,
    run_deployment,
    services_command,
    start_services,
    wait_for_flow_run,
    write_corpus,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
QUICK = ["train.max_steps=20"]
CHAMPION_AUTOMATION = "fundamentallm: notify when a champion changes"
FAILED_AUTOMATION = "fundamentallm: notify when a train-pipeline run fails"
SECRET = "T000-secret-token"  # a webhook URL's path is often its secret: `make up` must not print it


class Recorder:
    """An HTTP server on 127.0.0.1 that answers 200 to every POST and keeps its JSON body."""

    def __init__(self):
        self.posts: list[dict] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with recorder._lock:
                    recorder.posts.append(json.loads(body) if body else {})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{SECRET}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        with self._lock:
            return [f"{post.get('subject')}\n{post.get('text')}" for post in self.posts]

    def wait_for(self, *needles: str, timeout: float = 120) -> str:
        """The first POST (subject and text) that contains every one of `needles`."""
        deadline = time.monotonic() + timeout  # a hang guard, not a timing requirement
        while time.monotonic() < deadline:
            for text in self.texts():
                if all(needle in text for needle in needles):
                    return text
            time.sleep(1)
        raise AssertionError(f"no POST containing {needles} within {timeout:.0f} s; received: {self.texts()}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def recorder():
    server = Recorder()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stack(recorder, tmp_path_factory):
    yield from start_services(tmp_path_factory.mktemp("notify-stack"), FUNDAMENTALLM_NOTIFY_URL=recorder.url)


class Api:
    def __init__(self, stack, root: Path):
        env, ports, self.printed = stack
        self.env = env
        self.client_env, self.api, _ = client_env(env, ports)
        self.server_log = Path(env["FUNDAMENTALLM_SERVICES_DIR"]) / "prefect-server.log"
        self.root = root

    def params(self, model_name: str, **extra) -> dict:
        corpus = write_corpus(self.root / "corpus", seed=500)
        return {**deployment_params(self.root, corpus, model_name, "notify"), **extra}

    def submit(self, params: dict) -> str:
        return run_deployment(self.client_env, params, watch=False, timeout=120)[1]

    def flow_run(self, flow_run_id: str) -> dict:
        return get_json(f"{self.api}/flow_runs/{flow_run_id}")

    def wait(self, flow_run_id: str, states: set[str] = FINAL, timeout: float = 600) -> dict:
        return wait_for_flow_run(self.api, flow_run_id, states, timeout)

    def automations(self) -> set[str]:
        return {a["name"] for a in get_json(f"{self.api}/automations/filter", {})}

    def install_automations(self, **env: str) -> str:
        """Re-run `deployments/automations.py` (what `make up` runs) with `env` over the stack's."""
        environment = {**self.client_env, **env}
        environment = {k: v for k, v in environment.items() if v is not None}
        proc = subprocess.run(
            [sys.executable, "deployments/automations.py"],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout


@pytest.fixture
def api(stack, tmp_path):
    return Api(stack, tmp_path)


def test_up_says_where_notifications_go(api, recorder):
    port = recorder.server.server_address[1]
    assert f"Notifications: champion changes and failed train-pipeline runs, POSTed to http://127.0.0.1:{port}/..." in (
        api.printed
    )
    assert SECRET not in api.printed
    assert {CHAMPION_AUTOMATION, FAILED_AUTOMATION} <= api.automations()
    # The URL is one of the block's secrets: the API shows it only when asked for secrets.
    block = get_json(f"{api.api}/block_documents/filter", {"block_types": {"slug": {"any_": ["custom-webhook"]}}})
    assert [b["name"] for b in block] == ["fundamentallm-notify"] and SECRET not in json.dumps(block)


def test_champion_change_is_posted(api, recorder):
    flow_run_id = api.submit(api.params("notify-char", overrides=QUICK))
    run = api.wait(flow_run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    text = recorder.wait_for("notify-char", "version none -> 1", run["name"])
    assert "Validation bits per character: new " in text and "old champion n/a" in text


def test_failed_run_is_posted(api, recorder):
    flow_run_id = api.submit(api.params("notify-failed", sources=[str(api.root / "no-such-corpus")]))
    run = api.wait(flow_run_id)
    assert run["state"]["type"] == "FAILED", run["state"]
    text = recorder.wait_for(f"train-pipeline run {run['name']} Failed", "no-such-corpus")
    assert f"/runs/flow-run/{flow_run_id}" in text  # a link to the run in the Prefect UI


def test_a_refusing_url_fails_nothing(api, recorder, refusing_port):
    refusing = f"http://127.0.0.1:{refusing_port}/hook"  # nothing listens there
    try:
        printed = services_command("up", {**api.env, "FUNDAMENTALLM_NOTIFY_URL": refusing})
        assert f"POSTed to {refusing.removesuffix('/hook')}/..." in printed
        seen = len(recorder.texts())
        log_start = api.server_log.stat().st_size
        flow_run_id = api.submit(api.params("refused-char", overrides=QUICK))
        run = api.wait(flow_run_id)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        # The champion moved, so the server tried to notify: it logs the refused connection.
        deadline = time.monotonic() + 120
        while "ConnectError" not in api.server_log.read_text(errors="replace")[log_start:]:
            assert time.monotonic() < deadline, "the server logged no failed notification"
            time.sleep(1)
        assert not any("refused-char" in text for text in recorder.texts()[seen:])
    finally:
        api.install_automations(FUNDAMENTALLM_NOTIFY_URL=recorder.url)


def test_without_a_url_notifications_are_off(api, recorder):
    try:
        printed = services_command("up", {k: v for k, v in api.env.items() if k != "FUNDAMENTALLM_NOTIFY_URL"})
        assert "Notifications: off (turn them on with FUNDAMENTALLM_NOTIFY_URL=https://... make up)" in printed
        names = api.automations()
        assert "fundamentallm: crash flow runs whose heartbeats stopped" in names
        assert not names & {CHAMPION_AUTOMATION, FAILED_AUTOMATION}
        blocks = get_json(f"{api.api}/block_documents/filter", {"block_types": {"slug": {"any_": ["custom-webhook"]}}})
        assert blocks == []
    finally:
        api.install_automations(FUNDAMENTALLM_NOTIFY_URL=recorder.url)
    assert {CHAMPION_AUTOMATION, FAILED_AUTOMATION} <= api.automations()


def test_a_schedule_fires_a_run_the_worker_completes(api, tmp_path):
    params = api.params("scheduled-char", overrides=QUICK)
    spec = {
        "name": "fundamentallm-schedule-test",
        "deployments": [
            {
                "name": "every-minute",
                "entrypoint": "flows/train_pipeline.py:train_pipeline",
                "work_pool": {"name": "fundamentallm"},
                "parameters": params,
                "schedules": [{"interval": 60}],
            }
        ],
    }
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(json.dumps(spec))  # JSON is YAML
    prefect = str(Path(sys.executable).parent / "prefect")
    deploy = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--name", "every-minute", "--prefect-file", str(prefect_file)],
        cwd=ROOT,
        env=api.client_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    deployment = get_json(f"{api.api}/deployments/name/train-pipeline/every-minute")
    pause = f"{api.api}/deployments/{deployment['id']}/pause_deployment"
    runs_of_it = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    try:
        deadline = time.monotonic() + 240  # the next 60 s slot, the worker's 10 s poll, and slack
        started = None
        while started is None:
            for run in get_json(f"{api.api}/flow_runs/filter", runs_of_it):
                if run["state"]["type"] != "SCHEDULED":
                    started = run
            assert time.monotonic() < deadline, "no scheduled run was started"
            time.sleep(2)
        get_json(pause, {})  # no more runs: pausing deletes the ones still scheduled
        assert started["auto_scheduled"]  # made by the scheduler, not by `deployment run`
        run = api.wait(started["id"])
        assert run["state"]["type"] == "COMPLETED", run["state"]
        assert run["parameters"]["model_name"] == "scheduled-char"
    finally:
        with contextlib.suppress(OSError):
            get_json(pause, {})
    leftover = [r for r in get_json(f"{api.api}/flow_runs/filter", runs_of_it) if r["state"]["type"] not in FINAL]
    assert leftover == []
    subprocess.run(
        [prefect, "deployment", "delete", "train-pipeline/every-minute"],
        cwd=ROOT,
        env=api.client_env,
        capture_output=True,
        timeout=120,
    )
