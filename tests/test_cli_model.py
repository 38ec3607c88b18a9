"""`fundamentallm train`, `evaluate` and `sample` from the command line."""

from __future__ import annotations

import json

import pytest
from conftest import sample_checkpoint
from typer.testing import CliRunner

from fundamentallm.cli import app

runner = CliRunner()
pytestmark = pytest.mark.heavy  # trains models or runs several processes: not in the quick subset


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli-run") / "run"
    result = runner.invoke(
        app,
        [
            "train",
            str(tiny_dataset),
            "--preset",
            "debug",
            "--out",
            str(run),
            "--max-steps",
            "120",
            "--set",
            "train.eval_interval=40",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{") :])
    return run, payload


def test_train_reports_and_evaluates(trained):
    run, payload = trained
    assert payload["train"]["steps"] == 120 and payload["train"]["stop_reason"] == "max_steps"
    # Learned: 120 debug steps reach about 2.7 bits/char here against a unigram 4.6 (AMD EPYC).
    assert payload["eval"]["split"] == "val"
    assert payload["eval"]["bits_per_char"] < payload["eval"]["unigram_bits_per_char"] - 1.2
    assert (run / "best.pt").is_file() and (run / "latest.pt").is_file()


def test_evaluate_command(trained, tiny_dataset):
    run, _ = trained
    result = runner.invoke(app, ["evaluate", str(run / "best.pt"), str(tiny_dataset), "--split", "test", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["split"] == "test" and figures["stride"] == 16
    table = runner.invoke(app, ["evaluate", str(run / "best.pt"), str(tiny_dataset)])
    assert "bits/char" in table.output and "unigram" in table.output


def test_sample_command(trained):
    run, _ = trained
    result = runner.invoke(app, ["sample", str(run / "best.pt"), "--prompt", "The king", "-n", "40", "--seed", "1"])
    assert result.exit_code == 0, result.output
    (expected,) = sample_checkpoint(run / "best.pt", ["The king"], "auto", max_new_tokens=40, seed=1)
    assert result.output == f"The king{expected}\n" and len(expected) == 40
    again = runner.invoke(app, ["sample", str(run / "best.pt"), "--prompt", "The king", "-n", "40", "--seed", "1"])
    assert again.output == result.output
    several = runner.invoke(app, ["sample", str(run / "best.pt"), "-n", "20", "--num-samples", "2"])
    assert several.output.count("--- sample") == 2
    bad = runner.invoke(app, ["sample", str(run / "best.pt"), "--prompt", "Ω", "-n", "5"])
    assert bad.exit_code == 1 and "not in the vocabulary" in bad.output


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_sample_refuses_a_temperature_too_small_to_sample_with(trained):
    run, _ = trained
    result = runner.invoke(app, ["sample", str(run / "best.pt"), "-n", "5", "--temperature", "1e-45"])
    assert result.exit_code == 2
    assert "SampleConfig.temperature must be 0 (greedy)" in _one_error_line(result.output)


@pytest.mark.parametrize("stride", ["0", "-4", "33"])
def test_evaluate_refuses_a_stride_outside_one_to_the_context(trained, tiny_dataset, stride):
    run, _ = trained
    result = runner.invoke(app, ["evaluate", str(run / "best.pt"), str(tiny_dataset), "--stride", stride])
    assert result.exit_code == 2
    # Below 1 the setting itself is refused (EvalConfig); above the context, once the checkpoint is read.
    expected = (
        f"EvalConfig.stride must be at least 1; got {stride}"
        if int(stride) < 1
        else f"stride must be between 1 and the context length 32; got {stride}"
    )
    assert expected in _one_error_line(result.output)


def test_interactive_sampling(trained):
    run, _ = trained
    session = ":temperature 0\n:max_new_tokens 15\nthe \n:top_k x\n:nonsense 1\n:quit\n"
    result = runner.invoke(app, ["sample", str(run / "best.pt"), "--interactive"], input=session)
    assert result.exit_code == 0, result.output
    # Both settings took effect: 15 greedy characters, then the next prompt.
    (greedy,) = sample_checkpoint(run / "best.pt", ["the "], "auto", max_new_tokens=15, temperature=0.0)
    assert f"prompt> the {greedy}\nprompt> " in result.output, result.output
    assert "unknown setting 'nonsense'" in result.output
    assert "error: invalid literal for int() with base 10: 'x'" in result.output  # ':top_k x' is not a number


def test_time_budget_option(tiny_dataset, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            str(tiny_dataset),
            "--preset",
            "debug",
            "--out",
            str(tmp_path / "r"),
            "--time-budget",
            "3s",
            "--no-eval",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{") :])
    assert payload["train"]["stop_reason"] == "time_budget"


def test_bad_training_settings(tiny_dataset, tmp_path):
    result = runner.invoke(app, ["train", str(tiny_dataset), "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset 'nope'" in result.output
    result = runner.invoke(app, ["train", str(tiny_dataset), "--preset", "debug", "--time-budget", "soon"])
    assert result.exit_code == 2 and "cannot read duration" in result.output
    result = runner.invoke(app, ["train", str(tmp_path / "nodata"), "--preset", "debug", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "not found" in result.output
