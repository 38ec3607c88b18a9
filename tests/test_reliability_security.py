"""Files sent by someone else never run code: a crafted pickle in a checkpoint is refused by
every command and by the MLflow model that loads checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fundamentallm.cli import app
from fundamentallm.errors import CheckpointError

pytestmark = pytest.mark.reliability
runner = CliRunner()


class _Exploit:
    """Unpickling this would create the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "sent" / "latest.pt"
    path.parent.mkdir()
    torch.save({"format": "fundamentallm-checkpoint", "version": 1, "model": _Exploit(marker)}, path)
    return path, marker


def test_every_command_refuses_a_crafted_checkpoint(crafted, tiny_dataset, tmp_path):
    path, marker = crafted
    refused = "refused to load: it holds objects other than tensors and plain values"
    commands = {
        "sample": ["sample", str(path), "--prompt", "the ", "-n", "5"],
        "evaluate": ["evaluate", str(path), str(tiny_dataset)],
        "train --resume": ["train", str(tiny_dataset), "--out", str(path.parent), "--preset", "debug", "--resume"],
    }
    for name, command in commands.items():
        result = runner.invoke(app, command)
        assert result.exit_code == 1, (name, result.output)
        assert refused in result.output, (name, result.output)
        assert "Traceback" not in result.output
    assert not marker.exists()


def test_the_mlflow_model_refuses_a_crafted_checkpoint(crafted, tmp_path):
    from fundamentallm.mlflow_model import CharLanguageModel

    path, marker = crafted
    artifact = tmp_path / "artifacts" / "checkpoint.pt"
    artifact.parent.mkdir()
    shutil.copy(path, artifact)
    with pytest.raises(CheckpointError, match="refused to load"):
        CharLanguageModel().load_context(SimpleNamespace(artifacts={"checkpoint": str(artifact)}))
    assert not marker.exists()
