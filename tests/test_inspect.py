"""`fundamentallm inspect`: its figures are the exact evaluator's, broken down; its page renders offline."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import RecordingTracker, debug_config, prose
from typer.testing import CliRunner

from fundamentallm import runtime
from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.cli import app
from fundamentallm.config import MAX_INSPECT_CHARS, EncodeConfig, IngestConfig, InspectConfig, ModelConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.encode import encode
from fundamentallm.data.ingest import ingest
from fundamentallm.data.vocab import Vocab
from fundamentallm.errors import ConfigError
from fundamentallm.evaluate import evaluate, score_tokens
from fundamentallm.insight import CLASSES, FILES, class_table, classify, inspect_model
from fundamentallm.model import CharTransformer
from fundamentallm.sample import Sampler
from fundamentallm.train import train

runner = CliRunner()
LN2 = math.log(2.0)

VAL_TEXT = ("0" + "The sea 12 and 345 war, the KING 6789 speaks.\n" * 4)[:160]
"""The validation split of `run`: digits, which the training split never holds, so they are outside
the vocabulary and charged as unknown; uppercase inside and at the start of words; a newline."""


@pytest.fixture(scope="module", autouse=True)
def fp32_on_every_cpu():
    """The page is checked against references computed here in fp32, and against the evaluator:
    precision "auto" means fp32 in this module on any CPU. (On one that multiplies bf16 in
    hardware it would mean bf16, whose sums differ from fp32 ones by about 1e-3 and between
    batchings.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, str]:
    """(dataset, best checkpoint): a debug model trained a few steps on 1,440 characters of prose,
    whose validation split is `VAL_TEXT` (scored whole: 159 characters, 32 of them digits)."""
    root = tmp_path_factory.mktemp("inspect")
    (root / "corpus").mkdir()
    train_text = ("The KING speaks, war.\n" + prose(11, 400))[:1440]  # every letter of VAL_TEXT
    (root / "corpus" / "a.txt").write_text(train_text + VAL_TEXT, encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(root / "corpus"),)), root / "out")
    dataset = encode(docs.path, EncodeConfig(train_fraction=0.9, val_fraction=0.1, test_fraction=0.0), root / "out")
    result = train(dataset.path, debug_config(max_steps=20), root / "run")
    return dataset.path, result.best_checkpoint


@pytest.fixture(scope="module")
def inspected(run, tmp_path_factory):
    """inspect_model's result and output directory on the whole validation split."""
    dataset, checkpoint = run
    out = tmp_path_factory.mktemp("inspected")
    return inspect_model(checkpoint, dataset, out, InspectConfig(chars=len(VAL_TEXT) - 1)), out


def _page_bits(page: str) -> list[float]:
    return [float(b) for b in re.findall(r'<span class="c s\d" data-bits="([0-9.]+)"', page)]


def test_the_page_shows_the_evaluators_scores(run, inspected):
    dataset, checkpoint = run
    result, out = inspected
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    bits = _page_bits((out / "surprisal.html").read_text(encoding="utf-8"))
    assert len(bits) == len(VAL_TEXT) - 1 == result.shown_chars
    # The whole split is on the page: its surprisals add up to the evaluator's total, unknown charges included.
    figures = evaluate(checkpoint, dataset, "val")
    assert figures.unknown_characters == 32
    assert sum(bits) * LN2 == pytest.approx(figures.total_nats, rel=1e-6)
    # Character by character, where the first window scores them: -log2 p of the model given all before it.
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    ids = torch.from_numpy(Dataset(dataset).tokens("val").astype(np.int64))
    with torch.no_grad():
        logits, _ = model(ids[None, :32])
    nats = F.cross_entropy(logits[0], ids[1:33], reduction="none").double()
    nats += (ids[1:33] == 0).double() * (figures.unknown_charge_bits * LN2)
    assert bits[:32] == pytest.approx((nats / LN2).tolist(), abs=1e-5)


def test_a_stretch_scores_as_the_evaluator_scores_it(run, tmp_path):
    dataset, checkpoint = run
    inspect_model(checkpoint, dataset, tmp_path, InspectConfig(chars=70))
    bits = _page_bits((tmp_path / "surprisal.html").read_text(encoding="utf-8"))
    ckpt = load_checkpoint(checkpoint)
    tokens = Dataset(dataset).tokens("val")[:71]
    total, count = score_tokens(ckpt.build_model(), tokens, 32, 16)
    unknown = int((tokens[1:] == 0).sum())
    charge = evaluate(checkpoint, dataset, "val").unknown_charge_bits
    assert len(bits) == count == 70
    assert sum(bits) == pytest.approx(total / LN2 + unknown * charge, rel=1e-6)


def test_class_losses_add_up_to_the_split_total(run, inspected):
    dataset, checkpoint = run
    result, out = inspected
    figures = evaluate(checkpoint, dataset, "val")
    saved = json.loads((out / "classes.json").read_text(encoding="utf-8"))
    assert saved["split"] == "val" and saved["characters"] == figures.characters == 159
    assert saved["bits_per_char"] == pytest.approx(figures.bits_per_char, rel=1e-9)
    rows = saved["classes"]
    assert [r["class"] for r in rows] == list(CLASSES)
    assert set(rows[0]) == {"class", "count", "share", "bits_per_char", "loss_share", "unigram_bits_per_char"}
    assert sum(r["count"] for r in rows) == figures.characters
    assert sum(r["count"] * r["bits_per_char"] for r in rows) * LN2 == pytest.approx(figures.total_nats, rel=1e-9)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["loss_share"] for r in rows) == pytest.approx(1.0)
    counts = {r["class"]: r["count"] for r in rows}
    # VAL_TEXT after its opening "0": three whole lines and "The sea 12 and 345 wa"; the digits are
    # outside the vocabulary (other), "The" and "KING" are uppercase letters, "sea", "and", "war", "the",
    # "speaks" start with a lowercase one.
    assert counts["other"] == 3 * 9 + 5 and counts["digit"] == 0
    assert counts["newline"] == 3 and counts["uppercase"] == 3 * 5 + 1
    assert counts["word_start"] == 3 * 5 + 3 and counts["punctuation"] == 3 * 2
    assert result.figure("other").bits_per_char > 20  # charged like the evaluator charges them


def test_characters_are_classified_by_kind_and_by_the_one_before():
    vocab = Vocab(sorted(set("The king, 12 x;\n\té")))
    text = "The king, 12 x;\n\té"
    ids = torch.from_numpy(vocab.encode(text).astype(np.int64))
    kinds = classify(ids[1:], ids[:-1], class_table(vocab))
    expected = [
        "word_inside", "word_inside", "space", "word_start", "word_inside", "word_inside", "word_inside",
        "punctuation", "space", "digit", "digit", "space", "word_start", "punctuation", "newline", "other",
        "word_start",
    ]  # fmt: skip
    assert [CLASSES[k] for k in kinds.tolist()] == expected


def test_the_context_curve_breaks_down_the_unstrided_evaluation(run, inspected):
    dataset, checkpoint = run
    _, out = inspected
    curve = json.loads((out / "context.json").read_text(encoding="utf-8"))
    unstrided = evaluate(checkpoint, dataset, "val", stride=32)
    positions = curve["positions"]
    assert [p["context"] for p in positions] == list(range(1, 33))
    assert sum(p["count"] for p in positions) == curve["characters"] == unstrided.characters
    weighted = sum(p["count"] * p["bits_per_char"] for p in positions) / curve["characters"]
    assert weighted == pytest.approx(unstrided.bits_per_char, rel=1e-9)
    assert curve["bits_per_char"] == pytest.approx(unstrided.bits_per_char, rel=1e-9)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_attention_weights_are_causal_distributions_and_change_nothing(positions):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=20, context_length=12, n_layer=2, n_head=2, d_model=16, dropout=0.0, positions=positions
    )
    model = CharTransformer(config).eval()
    ids = torch.randint(0, 20, (3, 12))
    weights: list[torch.Tensor] = []
    with torch.no_grad():
        plain, _ = model(ids)
        explicit, _ = model(ids, attention=weights)
    assert len(weights) == 2 and weights[0].shape == (3, 2, 12, 12)
    for w in weights:
        assert torch.allclose(w.sum(dim=-1), torch.ones(3, 2, 12))
        assert (w.triu(diagonal=1) == 0).all()
    assert torch.allclose(plain, explicit, atol=1e-5)
    with pytest.raises(ValueError, match="without a key/value cache"):
        model(ids, caches=model.new_caches(), attention=[])


@pytest.mark.heavy  # a browser / MLflow's model logging: tens of seconds
def test_the_page_is_self_contained_and_renders(inspected, tmp_path):
    _, out = inspected
    page = (out / "surprisal.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page
    browser = shutil.which("chromium")
    assert browser, "headless Chromium (Debian's chromium) is needed to render the page"
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (out / "surprisal.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    shaded = re.findall(r'<span class="c s\d" data-bits="[0-9.]+" title="[^"]*bits', proc.stdout)
    assert len(shaded) == len(VAL_TEXT) - 1
    assert "most likely here" in proc.stdout and "bits:" in proc.stdout  # tooltips and the legend


def test_the_number_of_characters_shown_is_capped():
    with pytest.raises(ConfigError, match=f"between 1 and {MAX_INSPECT_CHARS:,}"):
        InspectConfig(chars=MAX_INSPECT_CHARS + 1)


def test_inspect_command(run, tmp_path):
    dataset, checkpoint = run
    result = runner.invoke(app, ["inspect", checkpoint, dataset, "--out", str(tmp_path / "a"), "--chars", "50"])
    assert result.exit_code == 0, result.output
    for text in ("first letter of a word", "letter inside a word", "bits/char", "surprisal.html shows 50"):
        assert text in result.output, text
    assert (tmp_path / "a" / "attention.png").stat().st_size > 1000
    result = runner.invoke(
        app, ["inspect", checkpoint, dataset, "--out", str(tmp_path / "b"), "--prompt", "the king", "--json"]
    )
    payload = json.loads(result.output)
    assert payload["prompt"] == "the king" and payload["shown_chars"] == 159  # the split is shorter than 3,000
    result = runner.invoke(app, ["inspect", checkpoint, dataset, "--out", str(tmp_path / "c"), "--chars", "20001"])
    assert result.exit_code != 0
    assert "error: InspectConfig.chars must be between 1 and 20,000" in result.output


@pytest.mark.heavy  # a browser / MLflow's model logging: tens of seconds
def test_inspect_takes_a_registered_model(run, mlflow_store, tmp_path):
    from fundamentallm import registry
    from fundamentallm.tracking import MlflowTracker, client, experiment_id

    dataset, checkpoint = run
    mlflow_client = client()
    run_id = mlflow_client.create_run(experiment_id(mlflow_client, "inspect")).info.run_id
    tracker = MlflowTracker(run_id)
    registry.log_model(tracker, checkpoint, "The ")
    registry.register(tracker, "inspect-char", val_bpc=3.0, dataset_id="data", tags={}, description="")
    result = runner.invoke(
        app, ["inspect", "models:/inspect-char@champion", dataset, "--out", str(tmp_path), "--chars", "40", "--json"]
    )
    assert result.exit_code == 0, result.output
    direct = inspect_model(checkpoint, dataset, tmp_path / "direct", InspectConfig(chars=40))
    assert json.loads(result.output[result.output.index("{") :])["bits_per_char"] == direct.bits_per_char


def test_probs_shows_the_next_character_distribution(run):
    _, checkpoint = run
    ckpt = load_checkpoint(checkpoint)
    sampler = Sampler(ckpt.build_model(), ckpt.vocab)
    top = sampler.next_distribution("the kin", 5)
    ids = torch.from_numpy(ckpt.vocab.encode("the kin").astype(np.int64))
    with torch.no_grad():
        probs = ckpt.build_model()(ids[None])[0][0, -1].softmax(dim=-1)
    expected = probs.topk(5)
    assert [c for c, _ in top] == [ckpt.vocab.decode([i]) for i in expected.indices.tolist()]
    assert [p for _, p in top] == pytest.approx(expected.values.tolist())
    session = ":temperature 0\n:max_new_tokens 5\nthe \n:probs\n:probs the kin\n:quit\n"
    result = runner.invoke(app, ["sample", checkpoint, "--interactive"], input=session)
    assert result.exit_code == 0, result.output
    assert result.output.count("next character after") == 2
    assert "next character after 'the kin'" in result.output
    assert f"{top[0][1]:.1%}" in result.output


def test_the_pipeline_stage_logs_the_files_and_the_class_figures(run, tmp_path):
    from fundamentallm.pipeline import inspect_stage

    dataset, checkpoint = run
    tracker = RecordingTracker()
    inspection = inspect_stage(checkpoint, dataset, str(tmp_path / "run"), tracker, chars=40, link="http://ui/run")
    assert sorted(tracker.artifacts) == sorted((name, "inspect") for name in FILES)
    assert inspection.path == str(tmp_path / "run" / "inspect")
    figures = json.loads((tmp_path / "run" / "inspect" / "classes.json").read_text(encoding="utf-8"))
    rows = {r["class"]: r for r in figures["classes"]}
    assert tracker.metrics["inspect_bpc_word_inside"] == rows["word_inside"]["bits_per_char"]
    assert tracker.metrics["inspect_share_digit"] == 0.0 and "inspect_bpc_digit" not in tracker.metrics  # none
    assert "| letter inside a word |" in inspection.markdown and "(http://ui/run)" in inspection.markdown
