"""The training loop: learning, schedules, resume equivalence, NaN handling, signals."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import InterruptAt, debug_config, poison_gradients, poison_training_loss

from fundamentallm.callbacks import NullCallback
from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.config import TrainConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.errors import CheckpointError, ConfigError, TrainingDiverged, TrainingInterrupted
from fundamentallm.evaluate import evaluate
from fundamentallm.train import learning_rate, train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.heavy  # trains models or runs several processes: not in the quick subset


def test_debug_run_learns_well_below_the_unigram_baseline(tiny_dataset, tmp_path):
    result = train(tiny_dataset, debug_config(max_steps=300), tmp_path / "run")
    assert result.stop_reason == "max_steps" and result.steps == 300
    metrics = evaluate(result.best_checkpoint, tiny_dataset, "val")
    # 300 debug steps reach about 1.6 bits/char against a unigram 4.6 (AMD EPYC): a margin of 1 bit.
    assert metrics.bits_per_char < metrics.unigram_bits_per_char - 2.0, metrics
    assert metrics.unigram_bits_per_char < metrics.uniform_bits_per_char
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {line["kind"] for line in lines} == {"train", "eval"}
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 300


def test_learning_rate_schedules():
    cosine = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(cosine, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(cosine, 9, 0.0) == pytest.approx(1.0)
    assert learning_rate(cosine, 60, 0.0) == pytest.approx(0.55)  # half-way through the decay
    assert learning_rate(cosine, 110, 1.0) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2, max_steps=100)
    assert learning_rate(wsd, 50, 0.5) == 1.0
    assert learning_rate(wsd, 90, 0.9) == pytest.approx(0.5)
    timed = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=5, max_steps=0, time_budget_s=60)
    assert learning_rate(timed, 1000, 0.5) == pytest.approx(0.5)  # follows elapsed time, not steps
    assert learning_rate(timed, 1000, 1.0) == pytest.approx(0.0)


def test_time_budget_ends_fully_decayed(tiny_dataset, tmp_path):
    seen: list[float] = []

    class Watch(NullCallback):
        def on_train_step(self, step, metrics):
            seen.append(metrics["lr"])

    config = debug_config(max_steps=0, time_budget_s=4.0, log_interval=1, min_lr_ratio=0.0, warmup_steps=2)
    result = train(tiny_dataset, config, tmp_path / "run", callbacks=[Watch()])
    assert result.stop_reason == "time_budget"  # max_steps=0: nothing else ends this run
    assert result.elapsed_seconds >= 4.0  # not before the budget
    assert seen[-1] < 0.15 * config.train.lr  # the last steps ran at the end of the decay


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tiny_dataset, tmp_path):
    config = debug_config(max_steps=60, log_interval=1, eval_interval=20, checkpoint_interval=25)
    config = config.replace(model=config.model.replace(dropout=0.1))  # dropout exercises the RNG state
    straight = train(tiny_dataset, config, tmp_path / "straight")
    with pytest.raises(TrainingInterrupted, match=r"SIGINT received: saved .*latest.pt at step 33"):
        train(tiny_dataset, config, tmp_path / "resumed", callbacks=[InterruptAt(33)])
    assert load_checkpoint(tmp_path / "resumed" / "latest.pt").step == 33
    resumed = train(tiny_dataset, config, tmp_path / "resumed", resume=True)
    assert resumed.steps == straight.steps == 60
    assert resumed.final_train_loss == straight.final_train_loss
    assert resumed.best_val_loss == straight.best_val_loss
    a = load_checkpoint(straight.latest_checkpoint).model_state
    b = load_checkpoint(resumed.latest_checkpoint).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_late_dropout_trains_without_dropout_until_its_share_of_the_schedule_also_when_resumed(
    tiny_dataset, tmp_path, monkeypatch
):
    from fundamentallm import train as training

    rates = []
    real_step = training.train_step

    def watched(forward, model, state, *rest):
        m = state.model
        rates.append((m.dropout.p, m.blocks[0].dropout, m.blocks[-1].attn.weights_dropout))
        return real_step(forward, model, state, *rest)

    monkeypatch.setattr(training, "train_step", watched)
    config = debug_config(max_steps=8, late_dropout=0.5, log_interval=1, eval_interval=4, checkpoint_interval=4)
    config = config.replace(model=config.model.replace(dropout=0.1, attention_dropout=0.2))
    straight = train(tiny_dataset, config, tmp_path / "straight")
    assert rates == [(0.0, 0.0, 0.0)] * 4 + [(0.1, 0.1, 0.2)] * 4  # on from half-way: step 5 of 8
    rates.clear()
    with pytest.raises(TrainingInterrupted):
        train(tiny_dataset, config, tmp_path / "resumed", callbacks=[InterruptAt(3)])
    resumed = train(tiny_dataset, config, tmp_path / "resumed", resume=True)
    assert rates == [(0.0, 0.0, 0.0)] * 4 + [(0.1, 0.1, 0.2)] * 4  # 3 steps, then 5 after the resume
    assert resumed.final_train_loss == straight.final_train_loss  # the same switch, the same masks
    with pytest.raises(ConfigError, match="late_dropout"):
        debug_config(late_dropout=1.0)


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tiny_dataset, tmp_path):
    config = debug_config(max_steps=5)
    train(tiny_dataset, config, tmp_path / "run")
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(tiny_dataset, config, tmp_path / "run")
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        train(tiny_dataset, config, tmp_path / "empty", resume=True)
    other = config.replace(model=config.model.replace(d_model=48))
    with pytest.raises(CheckpointError, match="model config differs"):
        train(tiny_dataset, other, tmp_path / "run", resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, lambda n: n == 13)
    config = debug_config(max_steps=50, checkpoint_interval=5, eval_interval=5)
    with pytest.raises(TrainingDiverged, match=r"training loss became nan at step 13 .*last good checkpoint is"):
        train(tiny_dataset, config, tmp_path / "run")
    kept = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert kept.step == 10
    assert all(torch.isfinite(t).all() for t in kept.model_state.values())


def test_vocab_size_must_match_the_data(tiny_dataset, tmp_path):
    config = debug_config(max_steps=5)
    config = config.replace(model=config.model.replace(vocab_size=7))
    with pytest.raises(ConfigError, match="vocab_size is 7 but the dataset's vocabulary has"):
        train(tiny_dataset, config, tmp_path / "run")
    long_context = debug_config(max_steps=5)
    long_context = long_context.replace(model=long_context.model.replace(context_length=5000))
    with pytest.raises(ConfigError, match="too few for context_length 5000"):
        train(tiny_dataset, long_context, tmp_path / "run2")


def test_checkpoint_is_self_contained(tiny_dataset, tmp_path):
    result = train(tiny_dataset, debug_config(max_steps=10), tmp_path / "run")
    ckpt = load_checkpoint(result.latest_checkpoint)
    assert ckpt.vocab == Dataset(tiny_dataset).vocab
    assert ckpt.config.model.vocab_size == ckpt.vocab.size
    assert set(ckpt.raw) >= {"model", "optimizer", "step", "rng", "config", "vocab", "vocab_hash", "elapsed_s"}


def test_sigterm_to_the_command_saves_and_resume_finishes(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fundamentallm.cli",
        "train",
        str(tiny_dataset),
        "--out",
        str(run),
        "--preset",
        "debug",
        "--max-steps",
        "100000",
        "--no-eval",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "error: SIGTERM received: saved" in stderr
    step = load_checkpoint(run / "latest.pt").step
    assert step > 0
    finish = subprocess.run(
        [*command[:-3], "--max-steps", str(step + 20), "--resume", "--no-eval", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr
    assert json.loads(finish.stdout)["train"]["steps"] == step + 20
    assert math.isfinite(json.loads(finish.stdout)["train"]["final_train_loss"])


def test_a_finite_loss_with_an_infinite_gradient_stops_before_the_optimizer_step(tiny_dataset, tmp_path, monkeypatch):
    # It used to take the step: the weights became NaN and the checkpoint of that step kept them.
    poison_gradients(monkeypatch, lambda n: n == 10)
    config = debug_config(max_steps=50, checkpoint_interval=5, eval_interval=5)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became (inf|nan) at step 10 .*last good checkpoint is"):
        train(tiny_dataset, config, tmp_path / "run")
    for name in ("latest.pt", "best.pt"):
        kept = load_checkpoint(tmp_path / "run" / name)
        assert kept.step == 5
        assert all(torch.isfinite(t).all() for t in kept.model_state.values())


def test_resuming_a_finished_run_changes_nothing_and_says_it_is_complete(tiny_dataset, tmp_path, caplog):
    config = debug_config(max_steps=30, eval_interval=10, checkpoint_interval=10)
    first = train(tiny_dataset, config, tmp_path / "run")
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with caplog.at_level("WARNING", logger="fundamentallm"):
        again = train(tiny_dataset, config, tmp_path / "run", resume=True)
    assert again == first  # the recorded result, not one more evaluation with a NaN training loss
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == files
    assert any("is complete (stopped by max_steps at step 30)" in r.getMessage() for r in caplog.records)
    longer = train(
        tiny_dataset,
        debug_config(max_steps=40, eval_interval=10, checkpoint_interval=10),
        tmp_path / "run",
        resume=True,
    )
    assert longer.steps == 40 and math.isfinite(longer.final_train_loss)  # a raised step limit trains on


def test_resuming_with_settings_that_define_the_trajectory_names_them(tiny_dataset, tmp_path):
    config = debug_config(max_steps=20, checkpoint_interval=10)
    with pytest.raises(TrainingInterrupted):
        train(
            tiny_dataset,
            config.replace(train=config.train.replace(log_interval=1)),
            tmp_path / "run",
            callbacks=[InterruptAt(10)],
        )
    muon = debug_config(max_steps=20, optimizer="muon")
    with pytest.raises(CheckpointError, match=r"train\.optimizer 'adamw' -> 'muon'"):
        train(tiny_dataset, muon, tmp_path / "run", resume=True)
    changed = debug_config(max_steps=20, lr=0.01, batch_size=8)
    with pytest.raises(
        CheckpointError, match=r"train\.batch_size 16 -> 8, train\.lr 0\.003 -> 0\.01.*may change on resume"
    ):
        train(tiny_dataset, changed, tmp_path / "run", resume=True)
    # Where it stops, how often it reports and where it runs may change.
    allowed = debug_config(max_steps=30, log_interval=5, eval_interval=5, checkpoint_interval=5, threads=1)
    assert train(tiny_dataset, allowed, tmp_path / "run", resume=True).steps == 30


def test_a_split_of_exactly_context_plus_one_characters_passes_every_stage(tmp_path):
    # Validation and encoding accepted a split of context_length + 1 tokens, then training refused it.
    from fundamentallm.config import EncodeConfig, IngestConfig, ValidationConfig, min_split_tokens
    from fundamentallm.data.encode import encode
    from fundamentallm.data.ingest import ingest
    from fundamentallm.data.validate import validate_documents

    context = debug_config().model.context_length
    (tmp_path / "corpus").mkdir()
    text = "".join(chr(ord("a") + i % 26) for i in range(999)) + "\n"
    (tmp_path / "corpus" / "doc.txt").write_text(text, encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(tmp_path / "corpus"),)), tmp_path / "out")
    split = EncodeConfig(train_fraction=0.967, val_fraction=0.033, test_fraction=0.0)
    need = min_split_tokens(context)
    assert need == context + 1
    assert validate_documents(docs, ValidationConfig(), split, tmp_path / "out", min_split_tokens=need).success
    dataset = encode(docs.path, split, tmp_path / "out", min_split_tokens=need).path
    assert Dataset(dataset).num_tokens("val") == need
    assert train(dataset, debug_config(max_steps=3), tmp_path / "run").steps == 3
    with pytest.raises(ConfigError, match=f"too few for context_length {context + 1} .it needs {need + 1}"):
        longer = debug_config(max_steps=3)
        train(dataset, longer.replace(model=longer.model.replace(context_length=context + 1)), tmp_path / "run2")


def test_best_pt_holds_the_checkpoint_with_the_lowest_validation_loss(tiny_dataset, tmp_path, monkeypatch):
    from fundamentallm import train as train_module

    # Scripted validation losses at steps 10, 20, ..., 50: the best is at step 20, and later
    # evaluations improve on the one before them without beating it.
    losses = iter([3.0, 2.0, 2.5, 2.2, 2.1])
    monkeypatch.setattr(train_module.SubsetEvaluator, "__call__", lambda self, model: next(losses))
    config = debug_config(max_steps=50, eval_interval=10, checkpoint_interval=10)
    result = train(tiny_dataset, config, tmp_path / "run")
    best, latest = load_checkpoint(tmp_path / "run" / "best.pt"), load_checkpoint(tmp_path / "run" / "latest.pt")
    assert best.step == 20 and latest.step == 50
    assert result.best_val_loss == 2.0
    assert any((best.model_state[k] != latest.model_state[k]).any() for k in best.model_state)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"], r["improved"]) for r in records if r["kind"] == "eval"]
    assert evals == [(10, 3.0, 1.0), (20, 2.0, 1.0), (30, 2.5, 0.0), (40, 2.2, 0.0), (50, 2.1, 0.0)]


def test_the_tracker_callback_sends_no_step_twice_to_a_run_an_earlier_attempt_logged_to():
    from fundamentallm.callbacks import TrackerCallback

    class Run:
        """A tracked run that an earlier attempt logged to up to step 60 (val_loss to step 50)."""

        def __init__(self):
            self.points = [("train_loss", s) for s in (1, 20, 40, 60)] + [("val_loss", 50)]

        def last_step(self, key):
            return max((s for k, s in self.points if k == key), default=0)

        def log_metrics(self, metrics, step=None):
            self.points += [(k, step) for k in metrics]

    run = Run()
    callback = TrackerCallback(run)  # the retry, resumed from the checkpoint of step 50
    for step in (60, 80):
        callback.on_train_step(step, {"train_loss": 1.0, "lr": 0.1, "tokens_per_s": 1.0, "grad_norm": 1.0})
    callback.on_eval(50, {"val_loss": 2.0})
    callback.on_eval(100, {"val_loss": 2.0})
    assert sorted(s for k, s in run.points if k == "train_loss") == [1, 20, 40, 60, 80]
    assert sorted(s for k, s in run.points if k == "lr") == [80]
    assert sorted(s for k, s in run.points if k == "val_loss") == [50, 100]


@pytest.mark.heavy
def test_the_cpu_small_preset_compiled_trains_as_it_does_eager(tiny_dataset, tmp_path):
    """cpu-small's model compiled (the preset's path on CPUs without AMX; with AMX it trains eagerly),
    with Muon and its precision on this CPU, for a few steps: the compiled model starts where the eager
    one does and follows it to float rounding."""
    from fundamentallm.presets import preset

    base = preset("cpu-small")
    # Without dropout: compiled code draws its masks with another random op than eager code does.
    base = base.replace(model=base.model.replace(dropout=0.0))
    train_settings = {
        "time_budget_s": 0.0,
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "eval_interval": 4,
        "eval_batches": 1,
        "log_interval": 1,
        "checkpoint_interval": 4,
    }
    results = {}
    for compiled in (True, False):
        config = base.replace(train=base.train.replace(**train_settings, compile=compiled))
        results[compiled] = train(tiny_dataset, config, tmp_path / f"compile-{compiled}")
    compiled, eager = results[True], results[False]
    assert compiled.steps == eager.steps == 4 and compiled.precision == eager.precision
    tolerance = 5e-2 if compiled.precision == "bf16" else 1e-3
    assert math.isfinite(compiled.final_train_loss)
    assert abs(compiled.final_train_loss - eager.final_train_loss) < tolerance
    assert abs(compiled.best_val_loss - eager.best_val_loss) < tolerance
