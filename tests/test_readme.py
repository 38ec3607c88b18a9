"""The README as a new user meets it: the one-shot pipeline run prints no traceback, no
third-party warning and no progress bar, and the "Use the model" block runs as written, in a
fresh shell, from a directory outside the checkout, leaving no MLflow store of its own there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_corpus

pytestmark = pytest.mark.flow
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_block(section: str) -> str:
    """The first ```sh block under the README heading `section`."""
    text = README.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", body, re.S).group(1)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """`python -m flows.train_pipeline` (what `make run` runs) on the debug preset, in a directory
    of its own, with a private Prefect home and MLflow store; returns (environment, output)."""
    root = tmp_path_factory.mktemp("readme")
    corpus = write_corpus(root / "corpus", seed=900, files=3)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "PREFECT_API", "PYTEST", "VIRTUAL_ENV"))
    }
    env.update(
        {
            "FUNDAMENTALLM_MLRUNS": str(root / "mlruns"),
            "PREFECT_HOME": str(root / "prefect"),
            "PYTHONPATH": str(ROOT),
            "TMPDIR": str(root / "tmp"),
        }
    )
    (root / "tmp").mkdir()
    work = root / "work"
    work.mkdir()
    command = [sys.executable, "-m", "flows.train_pipeline", "--preset", "debug", "--source", str(corpus)]
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return env, output


def test_a_healthy_run_prints_no_traceback_no_warning_no_progress_bar(pipeline_run):
    _env, output = pipeline_run
    assert "=== train-pipeline finished ===" in output
    assert "Traceback" not in output, output[-5000:]
    warnings = [line for line in output.splitlines() if re.search(r"warning|error", line, re.I)]
    assert not warnings, warnings
    assert "\r" not in output  # download progress bars redraw their line with carriage returns
    assert 'eval "$(.venv/bin/fundamentallm env)"' in output  # the way to plain MLflow is shown


def test_the_readme_sampling_block_runs_as_written_outside_the_checkout(pipeline_run):
    env, _output = pipeline_run
    block = readme_block("Use the model")
    assert "fundamentallm env" in block and "mktemp -d" in block
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # `fundamentallm sample` prints the prompt and 80 characters; the MLflow model, loaded by plain
    # MLflow from the same store, gives the same 80 characters for the same seed and settings.
    assert re.fullmatch(r"The (.{80})\n\1\n", proc.stdout, re.S), proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    # MLflow made no store of its own in the directory the block ran from, nor anywhere else.
    stray = list(Path(env["TMPDIR"]).rglob("mlflow.db")) + list(ROOT.glob("mlflow.db"))
    assert not stray, stray
