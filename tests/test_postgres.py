"""The Prefect server and the MLflow server on PostgreSQL, chosen by settings only
(FUNDAMENTALLM_PREFECT_DATABASE_URL, FUNDAMENTALLM_MLFLOW_DATABASE_URL): a throwaway cluster
of Debian's PostgreSQL, `make up`'s services on it, a deployment run through the Prefect CLI,
and what the servers answer checked against the rows in PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from conftest import ROOT, client_env, deployment_params, get_json, run_deployment, write_corpus


def _up(env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "FUNDAMENTALLM_SERVICES_DIR": str(tmp_path / "services"), **env_extra}
    return subprocess.run(
        [sys.executable, "deployments/services.py", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"FUNDAMENTALLM_MLFLOW_DATABASE_URL": "mysql://u:s3cret@db/mlflow"},
            "FUNDAMENTALLM_MLFLOW_DATABASE_URL=mysql://***@db/mlflow: expected a PostgreSQL URL",
        ),
        (
            {"FUNDAMENTALLM_PREFECT_DATABASE_URL": "postgresql://u:s3cret@db:5432"},
            "FUNDAMENTALLM_PREFECT_DATABASE_URL=postgresql://***@db:5432: name the database",
        ),
        (
            {
                "FUNDAMENTALLM_PREFECT_DATABASE_URL": "postgresql://u:s3cret@DB:5432/same",
                "FUNDAMENTALLM_MLFLOW_DATABASE_URL": "postgresql+psycopg2://u:s3cret@db/same",
            },
            "name the same database",
        ),
    ],
    ids=["not postgres", "no database", "one database for both"],
)
def test_a_bad_database_setting_is_refused_before_anything_starts(settings, message, tmp_path):
    proc = _up(settings, tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
    assert not (tmp_path / "services").exists()  # nothing started, nothing written


@pytest.mark.postgres
@pytest.mark.e2e
def test_pipeline_on_prefect_and_mlflow_servers_backed_by_postgres(postgres_cluster, shared_stack, tmp_path):
    env, ports, printed = shared_stack  # on this PostgreSQL cluster (shared with test_reliability_services)
    pg = postgres_cluster
    state = Path(env["FUNDAMENTALLM_SERVICES_DIR"]).parent
    secrets = (pg.password, urllib.parse.quote(pg.password, safe=""))
    where = f"127.0.0.1:{pg.port}"
    assert f"Prefect postgresql+asyncpg://***@{where}/prefect" in printed, printed
    assert f"MLflow postgresql+psycopg2://***@{where}/mlflow" in printed, printed

    # The URLs reach the servers through their environment only: not on any command line, and the
    # settings themselves are not handed on to the worker (nor so to the flow runs).
    pids = {p.stem: int(p.read_text().split()[0]) for p in Path(env["FUNDAMENTALLM_SERVICES_DIR"]).glob("*.pid")}
    assert set(pids) == {"prefect-server", "mlflow", "worker"}
    seen = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[2] not in {str(p) for p in pids.values()}:
                continue  # field 5: process group; each service runs in a group of its own
            cmdline = proc.joinpath("cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(s in cmdline for s in secrets), f"database password on the command line of {proc.name}"
        seen += 1
    assert seen >= 4  # the servers, the worker, and the MLflow server's web process at least
    worker_env = Path(f"/proc/{pids['worker']}/environ").read_bytes().decode(errors="replace")
    assert "FUNDAMENTALLM_PREFECT_DATABASE_URL" not in worker_env and not any(s in worker_env for s in secrets)

    # Both servers created their schema in their own PostgreSQL database at start.
    def tables(database: str) -> set[str]:
        return {r[0] for r in pg.sql(database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    assert {"alembic_version", "flow_run", "deployment", "work_pool"} <= tables("prefect")
    assert {"alembic_version", "experiments", "runs", "registered_models", "model_versions"} <= tables("mlflow")
    deployments = pg.sql("prefect", "SELECT d.name FROM deployment d JOIN flow f ON f.id = d.flow_id")
    assert {"default", "nightly"} <= {r[0] for r in deployments}

    client, api, mlflow_url = client_env(env, ports)
    corpus = write_corpus(tmp_path / "corpus", seed=500)
    run, flow_run_id = run_deployment(client, deployment_params(tmp_path, corpus, "pg-char", "pg"), timeout=600)

    # Prefect: the server says Completed, and that is the row in PostgreSQL.
    assert get_json(f"{api}/flow_runs/{flow_run_id}")["state"]["type"] == "COMPLETED"
    assert pg.sql("prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == [["COMPLETED"]]
    task_states = pg.sql("prefect", f"SELECT DISTINCT state_type FROM task_run WHERE flow_run_id = '{flow_run_id}'")
    assert task_states == [["COMPLETED"]]

    # MLflow: the run FINISHED and version 1 registered, through the REST API and in PostgreSQL.
    experiment = get_json(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=pg")["experiment"]
    runs = get_json(f"{mlflow_url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})
    assert len(runs["runs"]) == 1 and runs["runs"][0]["info"]["status"] == "FINISHED"
    run_id = runs["runs"][0]["info"]["run_id"]
    tags = {t["key"]: t["value"] for t in runs["runs"][0]["data"]["tags"]}
    assert tags["prefect.flow_run_id"] == flow_run_id
    alias = get_json(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?name=pg-char&alias=champion")
    assert alias["model_version"]["version"] == "1" and alias["model_version"]["run_id"] == run_id
    assert pg.sql("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == [["FINISHED"]]
    assert pg.sql("mlflow", "SELECT version, run_id FROM model_versions WHERE name = 'pg-char'") == [["1", run_id]]
    assert pg.sql("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'pg-char'") == [
        ["champion", "1"]
    ]
    metric_rows = pg.sql("mlflow", f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}'")
    assert int(metric_rows[0][0]) > 0

    # No sqlite database was created beside them, and the password is in no output or log.
    assert not list(state.rglob("*.db")), list(state.rglob("*.db"))
    logs = "".join(p.read_text(errors="replace") for p in Path(env["FUNDAMENTALLM_SERVICES_DIR"]).glob("*.log"))
    for text in (printed, logs, run.stdout, run.stderr):
        assert not any(s in text for s in secrets)
