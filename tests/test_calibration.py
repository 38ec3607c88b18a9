"""Temperature calibration: the fit, the fold into the final norm, the held-out positions, the trainer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import RecordingTracker, debug_config

from fundamentallm import calibration
from fundamentallm.calibration import fit_temperature, fold_temperature, held_out_logits
from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.config import ModelConfig, TrainConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.errors import ConfigError
from fundamentallm.model import CharTransformer
from fundamentallm.pipeline import train_stage
from fundamentallm.train import Batches, train


@pytest.mark.parametrize("true_temperature", [0.7, 1.0, 1.6])
def test_the_fit_finds_the_temperature_the_targets_were_drawn_at(true_temperature):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(40_000, 12, generator=generator)
    targets = torch.multinomial(F.softmax(logits / true_temperature, dim=-1), 1, generator=generator).squeeze(1)
    fit = fit_temperature(logits, targets)
    assert fit.temperature == pytest.approx(true_temperature, rel=0.04)
    assert fit.positions == 40_000
    assert fit.loss_before == pytest.approx(F.cross_entropy(logits, targets).item(), abs=1e-6)
    assert fit.loss_after <= fit.loss_before
    assert fit.loss_after <= F.cross_entropy(logits / (fit.temperature * 1.1), targets).item()
    assert fit.loss_after <= F.cross_entropy(logits / (fit.temperature / 1.1), targets).item()


@pytest.mark.parametrize(
    "changes",
    [{}, {"bias": True}, {"norm": "rmsnorm"}, {"tie_embeddings": False}],
    ids=["ln", "ln-bias", "rms", "untied"],
)
def test_folding_the_temperature_into_the_final_norm_divides_the_logits_by_it(changes):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=30, context_length=16, n_layer=2, n_head=2, d_model=32, dropout=0.0, **changes)
    model = CharTransformer(config).eval()
    with torch.no_grad():
        for p in model.norm.parameters():  # a gain and bias that are not 1 and 0, as after training
            p.add_(torch.rand_like(p))
    ids = torch.randint(0, 30, (3, 16))
    before, _ = model(ids)
    folded = CharTransformer(config).eval()
    folded.load_state_dict(fold_temperature(model.state_dict(), 1.3))
    after, _ = folded(ids)
    assert torch.allclose(after, before / 1.3, atol=1e-5)
    assert fold_temperature(model.state_dict(), 1.3).keys() == model.state_dict().keys()
    prefixed = {f"_orig_mod.{name}": value for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="final norm gain"):  # never a silent no-op
        fold_temperature(prefixed, 1.3)


def test_held_out_logits_score_the_positions_the_sliding_evaluation_scores(monkeypatch):
    torch.manual_seed(0)
    model = CharTransformer(ModelConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, d_model=16, dropout=0.0))
    tokens = torch.randint(0, 20, (43,))
    logits, targets = held_out_logits(model, tokens, 8, torch.device("cpu"), batch_size=3)
    # every target once: the first window all 8, then every 4 characters the 4 it adds, the last window
    # aligned to the end of the text (start 34) scoring the 2 left
    assert logits.shape == (42, 20) and logits.dtype == torch.float32
    assert torch.equal(targets, tokens[1:])
    with torch.no_grad():
        last, _ = model(tokens[34:42][None])
    assert torch.allclose(logits[-2:], last[0, 6:], atol=1e-6)
    assert model.training  # left as it was
    monkeypatch.setattr(calibration, "LOGIT_BUDGET", 20 * 4 * 3)  # three windows' worth
    few, few_targets = held_out_logits(model, tokens, 8, torch.device("cpu"))
    assert len(few) == 8 + 4 + 2 and torch.equal(few_targets[-2:], tokens[41:])  # the first, one between, the last
    with pytest.raises(ValueError, match="at least context"):
        held_out_logits(model, tokens[:8], 8, torch.device("cpu"))


def test_the_calibration_share_is_checked():
    assert TrainConfig(calibration=0.05).calibration == 0.05
    with pytest.raises(ConfigError, match="calibration"):
        TrainConfig(calibration=0.5)


@pytest.mark.heavy
def test_training_holds_out_the_share_and_folds_the_fitted_temperature_into_both_checkpoints(
    tiny_dataset, tmp_path, monkeypatch
):
    drawn_from: list[np.ndarray] = []
    original = Batches.__init__

    def record(self, tokens, *args, **kwargs):
        drawn_from.append(tokens)
        original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(Batches, "__init__", record)
    tracker = RecordingTracker()
    config = debug_config(max_steps=150, calibration=0.1)
    result = train_stage(str(tiny_dataset), config, str(tmp_path / "run"), tracker, on_output=lambda line: None)
    train_tokens = Dataset(tiny_dataset).tokens("train")
    held = round(len(train_tokens) * 0.1)
    assert len(drawn_from) == 1 and np.array_equal(drawn_from[0], train_tokens[held:])  # never the held-out head
    assert result.temperature != 1.0 and 0 < result.calibration_loss_after < result.calibration_loss_before
    assert tracker.metrics["temperature"] == result.temperature  # the pipeline logs it to MLflow
    assert tracker.metrics["calibration_loss_after"] == result.calibration_loss_after
    held_out = torch.from_numpy(train_tokens[:held].astype("int64"))
    for name in ("latest.pt", "best.pt"):
        model = load_checkpoint(tmp_path / "run" / name).build_model()
        refit = fit_temperature(*held_out_logits(model, held_out, 32, torch.device("cpu")))
        assert refit.temperature == pytest.approx(1.0, abs=0.01), name  # already calibrated: nothing left to fit
    latest = load_checkpoint(tmp_path / "run" / "latest.pt").build_model()
    refit = fit_temperature(*held_out_logits(latest, held_out, 32, torch.device("cpu")))
    assert refit.loss_before == pytest.approx(result.calibration_loss_after, abs=1e-4)
    plain = train(tiny_dataset, debug_config(max_steps=10), tmp_path / "plain")
    assert plain.temperature == 1.0 and plain.calibration_loss_before == 0.0  # off by default
    with pytest.raises(ConfigError, match="calibration share"):
        train(tiny_dataset, debug_config(max_steps=10, calibration=0.0001), tmp_path / "tiny-share")


def test_a_result_written_before_calibration_existed_reads_as_uncalibrated():
    from fundamentallm.train import TrainResult

    fields = {f.name: 1 for f in dataclasses.fields(TrainResult) if f.default is dataclasses.MISSING}
    result = TrainResult.from_dict(fields)
    assert result.temperature == 1.0 and result.calibration_loss_after == 0.0


@pytest.mark.heavy
def test_the_train_command_says_what_calibration_did(tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from fundamentallm.cli import app

    def command(out, steps, *more):
        args = ["train", str(tiny_dataset), "--preset", "debug", "--out", str(out), "--max-steps", str(steps)]
        return CliRunner().invoke(app, [*args, "--no-eval", *more])

    result = command(tmp_path / "run", 30, "--set", "train.calibration=0.1")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "calibrated: latest's logits divided by" in said and "held-out 0.1 of the train split (loss there" in said
    plain = command(tmp_path / "plain", 5)
    assert plain.exit_code == 0 and "calibrated" not in plain.output


class _Died(Exception):
    """Stands for the process dying at that point."""


@pytest.mark.heavy
def test_a_run_stopped_while_calibrating_is_calibrated_once_when_resumed(tiny_dataset, tmp_path, monkeypatch, caplog):
    import fundamentallm.train as train_module

    original = train_module.save_checkpoint

    def die_before_latest_is_calibrated(path, checkpoint):
        if checkpoint.calibration and path.name == "latest.pt":
            raise _Died
        original(path, checkpoint)

    monkeypatch.setattr(train_module, "save_checkpoint", die_before_latest_is_calibrated)
    config, run = debug_config(max_steps=60, calibration=0.1), tmp_path / "run"
    with pytest.raises(_Died), caplog.at_level("INFO", logger="fundamentallm"):
        train(tiny_dataset, config, run)
    assert any(r.getMessage().startswith("training ") for r in caplog.records)  # the first run announces training
    caplog.clear()
    best = load_checkpoint(run / "best.pt")
    assert best.calibration["temperature"] != 1.0 and not load_checkpoint(run / "latest.pt").calibration
    assert not (run / "result.json").exists()
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="fundamentallm"):
        result = train(tiny_dataset, config, run, resume=True)  # finished training: only the rest of the ending
    said = [r.getMessage() for r in caplog.records]
    assert any(
        line.endswith("stopped before writing its result: finishing it (calibration, if set, then result.json)")
        for line in said
    )
    assert not any(line.startswith("training ") for line in said)  # nothing is trained, and it says so
    assert result.steps == 60 and result.temperature != 1.0 and (run / "result.json").is_file()
    latest = load_checkpoint(run / "latest.pt")
    assert latest.calibration["temperature"] == result.temperature
    assert latest.calibration["loss_after"] == result.calibration_loss_after
    again = load_checkpoint(run / "best.pt")
    assert again.calibration == best.calibration  # best.pt is not divided by its temperature a second time
    assert all(torch.equal(again.model_state[name], best.model_state[name]) for name in best.model_state)
