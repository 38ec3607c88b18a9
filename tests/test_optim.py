"""Optimizers: Muon's orthogonalisation, parameter split, and state round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import debug_config
from test_train import InterruptAt

from fundamentallm.config import ModelConfig, TrainConfig
from fundamentallm.errors import TrainingInterrupted
from fundamentallm.evaluate import evaluate
from fundamentallm.model import CharTransformer
from fundamentallm.optim import Muon, build_optimizer, orthogonalize
from fundamentallm.train import train


def test_orthogonalize_flattens_singular_values():
    torch.manual_seed(0)
    for rows, cols in ((64, 16), (16, 64), (32, 32)):
        k = min(rows, cols)
        u, _ = torch.linalg.qr(torch.randn(rows, k))
        v, _ = torch.linalg.qr(torch.randn(cols, k))
        update = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values from 0.1 to 10
        singular = torch.linalg.svdvals(orthogonalize(update))
        assert singular.min() > 0.5 and singular.max() < 1.3, singular


def test_muon_covers_block_matrices_and_adamw_the_rest():
    model = CharTransformer(ModelConfig(vocab_size=30, context_length=16, n_layer=2, n_head=2, d_model=16))
    optimizers = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    adam, muon = optimizers.optimizers
    assert isinstance(muon, Muon)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (name.startswith("blocks.") and p.dim() == 2), name
    optimizers.set_lr_factor(0.5)
    assert muon.param_groups[0]["lr"] == 0.01 and adam.param_groups[0]["lr"] == 0.0005


@pytest.mark.heavy
def test_muon_training_learns_and_resumes_exactly(tiny_dataset, tmp_path):
    config = debug_config(
        max_steps=40, optimizer="muon", muon_lr=0.03, eval_interval=20, checkpoint_interval=20, log_interval=1
    )
    straight = train(tiny_dataset, config, tmp_path / "a")
    assert evaluate(straight.best_checkpoint, tiny_dataset).bits_per_char < 4.0
    with pytest.raises(TrainingInterrupted):
        train(tiny_dataset, config, tmp_path / "b", callbacks=[InterruptAt(17)])
    resumed = train(tiny_dataset, config, tmp_path / "b", resume=True)
    assert resumed.steps == 40 and resumed.final_train_loss == straight.final_train_loss
