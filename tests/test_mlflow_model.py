"""The MLflow pyfunc model saved from its code file and loaded in a fresh process, without the
tracking store or the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fundamentallm.cli import app


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mlflow-model") / "run"
    args = ["train", str(tiny_dataset), "--preset", "debug", "--out", str(run), "--max-steps", "20"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return run / "best.pt"


@pytest.mark.heavy
def test_a_model_saved_from_its_code_file_loads_and_samples_in_a_fresh_process(checkpoint, tmp_path):
    import mlflow
    from mlflow.models import infer_signature

    from fundamentallm import mlflow_model

    code_file = mlflow_model.write_model_code(tmp_path)
    mlflow.pyfunc.save_model(
        tmp_path / "model",
        python_model=str(code_file),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(mlflow_model.__file__).parent)],
        signature=infer_signature(["The "], ["generated text"], params=mlflow_model.DEFAULT_PARAMS),
        pip_requirements=["mlflow"],  # no requirement inference: it would load the model once more
    )
    assert (tmp_path / "model" / code_file.name).is_file()

    code = (
        "import json, sys, mlflow\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = m.predict(['The '], params={'max_new_tokens': 12, 'seed': 3})\n"
        "print(json.dumps({'out': out, 'class': type(m.unwrap_python_model()).__module__}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(answer["out"]) == 1 and len(answer["out"][0]) == 12
    # The class comes from the package shipped beside the model, not from a copy of the code file.
    assert answer["class"] == "fundamentallm.mlflow_model"
