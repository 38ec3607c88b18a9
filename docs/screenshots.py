"""Make the README's pictures again, from a real run on real servers.

    .venv/bin/python docs/screenshots.py [--preset debug] [--set train.max_steps=600]

Starts the local services (`make up`'s script) on spare ports with a private state directory,
Prefect home and MLflow store, writes `notes/` (examples/make_notes.py) there, runs the
`train-pipeline/default` deployment on it, photographs the flow run's page in the Prefect UI
and the run's charts in the MLflow UI with headless Chromium (Debian's `chromium`), and stops
the services. The pictures go to docs/img/ (prefect-flow-run.png, mlflow-run.png).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "img"
PORTS = {"PREFECT_PORT": "4310", "MLFLOW_PORT": "5310", "WORKER_HEALTH_PORT": "8395"}


def _json(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _photograph(browser: str, url: str, out: Path, profile: Path, height: int) -> None:
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size=1400,{height}",
            "--virtual-time-budget=60000",
            "--run-all-compositor-stages-before-draw",
            f"--screenshot={out}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        sys.exit(f"Chromium could not photograph {url} (exit {proc.returncode}): {proc.stderr[-2000:]}")
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size:,} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--set", dest="overrides", action="append", default=None, help="setting over the preset")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("headless Chromium is needed: apt-get install chromium")
    overrides = args.overrides if args.overrides is not None else ["train.max_steps=600"]
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="fundamentallm-screenshots-") as tmp:
        state = Path(tmp)
        env = {
            **os.environ,
            **PORTS,
            "FUNDAMENTALLM_SERVICES_DIR": str(state / "services"),
            "PREFECT_HOME": str(state / "prefect"),
            "FUNDAMENTALLM_MLRUNS": str(state / "mlruns"),
        }
        env.pop("FUNDAMENTALLM_NOTIFY_URL", None)
        subprocess.run([python, "deployments/services.py", "up"], cwd=ROOT, env=env, check=True)
        try:
            prefect = f"http://127.0.0.1:{PORTS['PREFECT_PORT']}"
            mlflow = f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}"
            client = {**env, "PREFECT_API_URL": f"{prefect}/api", "MLFLOW_TRACKING_URI": mlflow}
            subprocess.run([python, "examples/make_notes.py", str(state / "notes")], cwd=ROOT, check=True)
            params = {
                "preset": args.preset,
                "overrides": overrides,
                "sources": [str(state / "notes")],
                "data_dir": str(state / "data"),
                "runs_dir": str(state / "runs"),
            }
            command = [str(Path(python).parent / "prefect"), "deployment", "run", "train-pipeline/default", "--watch"]
            for key, value in params.items():
                command += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
            run = subprocess.run(command, cwd=ROOT, env=client, capture_output=True, text=True, check=True)
            flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", run.stdout).group(1)
            experiment = _json(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=fundamentallm")
            experiment_id = experiment["experiment"]["experiment_id"]
            runs = _json(f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
            run_id = runs[0]["info"]["run_id"]
            IMAGES.mkdir(parents=True, exist_ok=True)
            _photograph(
                browser, f"{prefect}/runs/flow-run/{flow_run_id}", IMAGES / "prefect-flow-run.png", state / "p1", 1100
            )
            _photograph(
                browser,
                f"{mlflow}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning",
                IMAGES / "mlflow-run.png",
                state / "p2",
                1100,
            )
        finally:
            subprocess.run([python, "deployments/services.py", "down"], cwd=ROOT, env=env, check=False)


if __name__ == "__main__":
    main()
