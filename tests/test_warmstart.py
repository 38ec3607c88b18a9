"""Warm start: a fresh run that starts from an earlier model's weights (`train.init_from`)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import InterruptAt, debug_config, prose
from typer.testing import CliRunner

from fundamentallm.checkpoint import Checkpoint, load_checkpoint
from fundamentallm.cli import app
from fundamentallm.config import ModelConfig, RunConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.vocab import UNK_ID, Vocab
from fundamentallm.errors import CheckpointError, TrainingInterrupted
from fundamentallm.model import CharTransformer
from fundamentallm.train import train
from fundamentallm.warmstart import WarmStart, warm_start

pytestmark = pytest.mark.heavy  # trains several models: not in the quick subset

NEW_CHARS = ("à", "é", "ï")
"""Characters of the grown corpus that the tiny corpus lacks (code point order)."""


def _model(vocab: Vocab, seed: int, **settings) -> CharTransformer:
    torch.manual_seed(seed)
    shape = {"context_length": 8, "n_layer": 2, "n_head": 2, "d_model": 16, **settings}
    return CharTransformer(ModelConfig(vocab_size=vocab.size, **shape))


def _source(vocab: Vocab, **settings) -> Checkpoint:
    """A checkpoint of a model over `vocab` whose every weight is far from any initialisation."""
    model = _model(vocab, seed=1, **settings)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))  # the norms' gains too, which start at 1
    return Checkpoint(RunConfig(model=model.config), vocab, model.state_dict(), path=Path("source.pt"))


def test_embedding_rows_follow_their_characters_and_new_characters_keep_their_initialisation():
    source_vocab = Vocab("\n !.abcdefgh")
    target_vocab = Vocab(sorted(set(source_vocab.chars) - {"c"} | {"x", "y", "é"}))
    source = _source(source_vocab, dropout=0.1)  # dropout has no weights: it may differ
    model = _model(target_vocab, seed=7)
    fresh = _model(target_vocab, seed=7)  # what the model held before the warm start

    record = warm_start(model, target_vocab, source)

    rows = model.token_embedding.weight.detach()
    source_rows = source.model_state["token_embedding.weight"]
    fresh_rows = fresh.token_embedding.weight.detach()
    assert rows.shape == (target_vocab.size, 16)
    for i, char in enumerate(target_vocab.chars, start=1):
        if char in source_vocab.chars:
            assert torch.equal(rows[i], source_rows[source_vocab.chars.index(char) + 1]), char
        else:  # initialised exactly as the model initialises embeddings: neither zeros nor a source row
            assert torch.equal(rows[i], fresh_rows[i]), char
            assert rows[i].abs().min() > 0
            assert not any(torch.equal(rows[i], row) for row in source_rows)
    assert torch.equal(rows[UNK_ID], source_rows[UNK_ID])
    assert not torch.equal(fresh_rows[UNK_ID], source_rows[UNK_ID])
    state = model.state_dict()
    assert state.keys() == source.model_state.keys()
    for name in state.keys() - {"token_embedding.weight"}:
        assert torch.equal(state[name], source.model_state[name]), name
    # The output layer is the embedding's transpose: a new character's logit comes from its new row.
    hidden = torch.randn(3, 16)
    assert torch.equal(torch.nn.functional.linear(hidden, model.token_embedding.weight), hidden @ rows.T)
    carried = tuple(c for c in target_vocab.chars if c not in ("x", "y", "é"))
    assert record == WarmStart("source.pt", carried=carried, new=("x", "y", "é"), dropped=("c",))
    assert (len(record.carried), len(record.new), len(record.dropped)) == (
        11,
        3,
        1,
    )  # 12 source characters, "c" dropped


def test_an_untied_output_matrix_is_remapped_by_character_like_the_embedding():
    source_vocab = Vocab("\n !.abcdefgh")
    target_vocab = Vocab(sorted(set(source_vocab.chars) - {"c"} | {"x", "é"}))
    source = _source(source_vocab, tie_embeddings=False)
    model = _model(target_vocab, seed=7, tie_embeddings=False)
    fresh = _model(target_vocab, seed=7, tie_embeddings=False)

    warm_start(model, target_vocab, source)

    state = model.state_dict()
    for name in ("token_embedding.weight", "head.weight"):
        rows, source_rows, fresh_rows = state[name], source.model_state[name], fresh.state_dict()[name]
        assert rows.shape == (target_vocab.size, 16)
        assert torch.equal(rows[UNK_ID], source_rows[UNK_ID]), name
        for i, char in enumerate(target_vocab.chars, start=1):
            expected = source_rows[source_vocab.chars.index(char) + 1] if char in source_vocab.chars else fresh_rows[i]
            assert torch.equal(rows[i], expected), (name, char)
    # Two matrices, not one: the output rows are the source's output rows, not its embedding's.
    a = target_vocab.chars.index("a") + 1
    assert not torch.equal(state["head.weight"][a], state["token_embedding.weight"][a])
    with pytest.raises(CheckpointError, match=r"model\.tie_embeddings False -> True"):
        warm_start(_model(target_vocab, seed=7), target_vocab, source)


def test_value_embeddings_are_remapped_by_character_like_the_embedding():
    source_vocab = Vocab("\n !.abcdefgh")
    target_vocab = Vocab(sorted(set(source_vocab.chars) - {"c"} | {"x", "é"}))
    source = _source(source_vocab, value_embeddings=True)
    model = _model(target_vocab, seed=7, value_embeddings=True)
    fresh = _model(target_vocab, seed=7, value_embeddings=True)

    warm_start(model, target_vocab, source)

    rows, source_rows = model.value_embedding.weight.detach(), source.model_state["value_embedding.weight"]
    assert rows.shape == (target_vocab.size, 2 * 16)  # a table per block
    assert torch.equal(rows[UNK_ID], source_rows[UNK_ID])
    for i, char in enumerate(target_vocab.chars, start=1):
        if char in source_vocab.chars:
            assert torch.equal(rows[i], source_rows[source_vocab.chars.index(char) + 1]), char
        else:
            assert torch.equal(rows[i], fresh.value_embedding.weight[i].detach()), char
    with pytest.raises(CheckpointError, match=r"model\.value_embeddings True -> False"):
        warm_start(_model(target_vocab, seed=7), target_vocab, source)


def test_a_source_of_another_shape_is_refused_naming_each_difference_and_changes_nothing():
    vocab = Vocab("abc")
    source = _source(vocab)
    model = _model(vocab, seed=7, n_layer=3, d_model=24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"source\.pt: .*\(model\.n_layer 2 -> 3, model\.d_model 16 -> 24\)"):
        warm_start(model, vocab, source)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# Training on a grown corpus ------------------------------------------------------------------


def _corpus_dataset(root: Path, extra: dict[str, str]) -> Path:
    """The tiny corpus of conftest's `tiny_dataset` (the same six documents) plus `extra`, encoded."""
    from fundamentallm.config import EncodeConfig, IngestConfig
    from fundamentallm.data.encode import encode
    from fundamentallm.data.ingest import ingest

    (root / "corpus").mkdir(parents=True)
    for i in range(6):
        (root / "corpus" / f"{i}.txt").write_text(prose(100 + i, 2000), encoding="utf-8")
    for name, text in extra.items():
        (root / "corpus" / name).write_text(text, encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(root / "corpus"),)), root / "out")
    return Path(encode(docs.path, EncodeConfig(), root / "out").path)


@pytest.fixture(scope="module")
def grown_dataset(tmp_path_factory, tiny_dataset) -> Path:
    """The tiny corpus plus a document with three characters it lacks. The document's name sorts
    first, so it lies in the training split of the contiguous split, where the vocabulary comes from."""
    lines = [f"{line} the café, the naïve, déjà vu." for line in prose(300, 600).splitlines()]
    dataset = _corpus_dataset(tmp_path_factory.mktemp("grown"), {"0-grown.txt": "\n".join(lines) + "\n"})
    old, new = Dataset(tiny_dataset).vocab.chars, Dataset(dataset).vocab.chars
    assert set(new) - set(old) == set(NEW_CHARS) and set(old) <= set(new)
    return dataset


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory, tiny_dataset) -> Path:
    """best.pt of the debug preset trained for 300 steps on the tiny corpus."""
    result = train(tiny_dataset, debug_config(max_steps=300), tmp_path_factory.mktemp("source") / "run")
    return Path(result.best_checkpoint)


def _warm(config: RunConfig, source: Path | str) -> RunConfig:
    return config.replace(train=config.train.replace(init_from=str(source)))


def _first_eval(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in records if r["kind"] == "eval")


@contextmanager
def _logged(name: str):
    """Messages logged at INFO and above to logger `name` while the block runs (the CLI's logger
    set-up, run by other tests in this process, stops records from reaching pytest's handler)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_warm_started_run_starts_far_below_a_fresh_one_on_the_grown_corpus(
    grown_dataset, source_checkpoint, tmp_path
):
    config = debug_config(max_steps=10, eval_interval=5)
    fresh = train(grown_dataset, config, tmp_path / "fresh")
    with _logged("fundamentallm") as messages:
        warm = train(grown_dataset, _warm(config, source_checkpoint), tmp_path / "warm")
    first = {"fresh": _first_eval(tmp_path / "fresh"), "warm": _first_eval(tmp_path / "warm")}
    # Measured (2-core AMD EPYC, fp32): at step 5 the fresh run is at 3.75 nats/char (ln 51 = 3.93
    # at random), the warm-started one at 1.13 (its source ended at 1.06 on the tiny corpus).
    assert first["warm"] < first["fresh"] - 1.0, first
    carried = Dataset(grown_dataset).vocab.size - 1 - len(NEW_CHARS)
    shown = " ".join(repr(c) for c in NEW_CHARS)
    expected = f"warm start from {source_checkpoint}: {carried} characters carried over, 3 new ({shown}), 0 dropped"
    assert expected in messages, messages
    # The run records where its weights came from: result, config.json and checkpoints.
    assert (warm.init_from, fresh.init_from) == (str(source_checkpoint), "")
    saved = json.loads((tmp_path / "warm" / "config.json").read_text())["config"]
    assert saved["train"]["init_from"] == str(source_checkpoint)
    assert load_checkpoint(warm.best_checkpoint).config.train.init_from == str(source_checkpoint)


def test_a_source_of_another_shape_fails_before_any_step_and_writes_no_checkpoint(
    grown_dataset, source_checkpoint, tmp_path
):
    config = _warm(debug_config(max_steps=10), source_checkpoint)
    config = config.replace(model=config.model.replace(n_layer=3, d_model=48))
    named = r"its model differs .*\(model\.n_layer 2 -> 3, model\.d_model 32 -> 48\)"
    with pytest.raises(CheckpointError, match=named):
        train(grown_dataset, config, tmp_path / "run")
    assert sorted((tmp_path / "run").rglob("*.pt")) == []
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_a_warm_started_run_does_not_load_its_source_again(grown_dataset, source_checkpoint, tmp_path):
    source = tmp_path / "source.pt"
    shutil.copyfile(source_checkpoint, source)
    config = _warm(debug_config(max_steps=40, eval_interval=10, checkpoint_interval=10, log_interval=1), source)
    straight = train(grown_dataset, config, tmp_path / "straight")
    with pytest.raises(TrainingInterrupted):
        train(grown_dataset, config, tmp_path / "resumed", callbacks=[InterruptAt(20)])
    source.unlink()  # loading it again would fail: checkpoint not found
    with pytest.raises(TrainingInterrupted):
        train(grown_dataset, config, tmp_path / "resumed", resume=True, callbacks=[InterruptAt(30)])
    # Resumed as `fundamentallm train --resume` without --init-from: the run keeps its record.
    unset = config.replace(train=config.train.replace(init_from=""))
    resumed = train(grown_dataset, unset, tmp_path / "resumed", resume=True)
    assert resumed.steps == straight.steps == 40
    assert resumed.final_train_loss == straight.final_train_loss
    assert resumed.best_val_loss == straight.best_val_loss
    a = load_checkpoint(straight.latest_checkpoint).model_state
    b = load_checkpoint(resumed.latest_checkpoint)
    assert all(torch.equal(a[k], b.model_state[k]) for k in a)
    assert resumed.init_from == b.config.train.init_from == str(source)


def test_under_two_processes_a_refused_source_fails_with_one_clear_error(grown_dataset, source_checkpoint, tmp_path):
    # Every rank loads the source and refuses it, at once, before any collective operation.
    command = [sys.executable, "-m", "fundamentallm.cli", "train", str(grown_dataset), "--out", str(tmp_path / "run")]
    command += ["--preset", "debug", "--set", "model.n_layer=3", "--init-from", str(source_checkpoint)]
    proc = subprocess.run([*command, "--processes", "2", "--no-eval"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].count("rank ") == 1 and errors[0].endswith("except vocab_size and the dropouts"), errors
    assert "(model.n_layer 2 -> 3)" in errors[0]
    assert sorted((tmp_path / "run").rglob("*.pt")) == []


def test_a_failing_rank_writes_its_error_line_in_one_piece(grown_dataset, source_checkpoint, tmp_path, monkeypatch):
    # Ranks share one pipe to the launcher: a line written in pieces (print writes the text and the
    # newline apart) interleaves with another rank's into one garbled line the report cannot read.
    from fundamentallm.launch import worker_main

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    config = _warm(debug_config(max_steps=5), source_checkpoint)
    settings = tmp_path / "config.json"
    settings.write_text(json.dumps(config.replace(model=config.model.replace(n_layer=3)).to_dict()))
    monkeypatch.setattr(sys, "stderr", Recorder())
    code = worker_main(["--dataset", str(grown_dataset), "--run-dir", str(tmp_path / "run"), "--config", str(settings)])
    assert code == 1
    assert len(writes) == 1 and writes[0].startswith("rank 0: error: "), writes
    assert writes[0].endswith(
        "(model.n_layer 2 -> 3); a warm start needs the same model settings, except vocab_size and the dropouts\n"
    )


# The command line ----------------------------------------------------------------------------

runner = CliRunner()


def _cli_train(dataset: Path, run: Path, *extra: str):
    args = ["train", str(dataset), "--out", str(run), "--preset", "debug", "--max-steps", "5", "--no-eval", "--json"]
    return runner.invoke(app, [*args, *extra])


def test_the_command_line_starts_from_a_checkpoint_file(grown_dataset, source_checkpoint, tmp_path):
    result = _cli_train(grown_dataset, tmp_path / "run", "--init-from", str(source_checkpoint))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["init_from"] == str(source_checkpoint)
    assert load_checkpoint(tmp_path / "run" / "latest.pt").config.train.init_from == str(source_checkpoint)


def test_the_command_line_names_a_registered_model_it_cannot_find(grown_dataset, mlflow_store, tmp_path):
    result = _cli_train(grown_dataset, tmp_path / "run", "--init-from", "models:/nope@champion")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "models:/nope@champion" in errors[0], result.output
    assert not (tmp_path / "run").exists()
