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
from fundamentallm.optim import Muon, build_optimizer, orthogonalize, orthogonalize_all
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


def _one_matrix_at_a_time(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's iteration written out for one matrix, as the batched code must compute it."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(update.dtype)


def test_matrices_orthogonalised_together_equal_each_one_alone():
    torch.manual_seed(1)
    # Repeated shapes (batched together), a tall one beside its wide transpose (one batch), a
    # square one, a one-off shape, and bf16 (computed in float32, returned in bf16).
    shapes = [(48, 16), (16, 48), (16, 16), (48, 16), (16, 16), (20, 36)]
    updates = [torch.randn(shape) * (i + 1) for i, shape in enumerate(shapes)] + [torch.randn(24, 8).bfloat16()]
    together = orthogonalize_all(updates, steps=5)
    for update, result in zip(updates, together, strict=True):
        assert result.shape == update.shape and result.dtype == update.dtype
        alone = _one_matrix_at_a_time(update)
        tolerance = 1e-2 if update.dtype == torch.bfloat16 else 1e-4
        assert torch.allclose(result.float(), alone.float(), atol=tolerance), (update.shape, update.dtype)
    assert torch.equal(orthogonalize(updates[2]), orthogonalize_all([updates[2]])[0])


def test_the_iteration_in_bfloat16_still_flattens_singular_values():
    torch.manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(48, 16))
    v, _ = torch.linalg.qr(torch.randn(40, 16))
    updates = [u @ torch.diag(torch.logspace(-1, 1, 16)) @ v.T, torch.randn(40, 48)]
    low = orthogonalize_all(updates, dtype=torch.bfloat16)
    singular = torch.linalg.svdvals(low[0])[:16]  # rank 16: singular values from 0.1 to 10 before
    assert singular.min() > 0.5 and singular.max() < 1.3, singular
    for result, exact in zip(low, orthogonalize_all(updates), strict=True):
        assert result.dtype == torch.float32  # the update's own type; only the products ran in bf16
        # The same direction (rounding moves the unconverged singular values a little).
        assert torch.nn.functional.cosine_similarity(result.flatten(), exact.flatten(), dim=0) > 0.97


def test_muon_multiplies_in_the_training_precision():
    model = CharTransformer(ModelConfig(vocab_size=30, context_length=16, n_layer=1, n_head=2, d_model=16))
    config = TrainConfig(optimizer="muon")
    assert build_optimizer(model, config, torch.device("cpu")).optimizers[1].ns_dtype == torch.float32
    bf16 = build_optimizer(model, config, torch.device("cpu"), torch.bfloat16).optimizers[1]
    assert bf16.ns_dtype == torch.bfloat16


def test_a_muon_step_moves_each_matrix_by_its_own_orthogonalised_momentum():
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((32, 8), (8, 32), (8, 8), (32, 8))]
    start = [p.detach().clone() for p in params]
    muon = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    grads = []
    for _ in range(2):  # two steps: the second uses the momentum of the first
        grads.append([torch.randn_like(p) for p in params])
        for p, g in zip(params, grads[-1], strict=True):
            p.grad = g
        muon.step()
    for p, p0, g1, g2 in zip(params, start, grads[0], grads[1], strict=True):
        expected = p0.clone()
        buffer = torch.zeros_like(p0)
        for g in (g1, g2):
            buffer = buffer + (g - buffer) * (1 - 0.9)
            update = _one_matrix_at_a_time(g + (buffer - g) * 0.9)  # Nesterov
            expected = expected * (1 - 0.05 * 0.1) - 0.05 * max(1.0, p0.size(0) / p0.size(1)) ** 0.5 * update
        assert torch.allclose(p.detach(), expected, atol=1e-5), p.shape


def test_muon_covers_block_matrices_and_adamw_the_rest():
    config = ModelConfig(vocab_size=30, context_length=16, n_layer=2, n_head=2, d_model=16, value_embeddings=True)
    model = CharTransformer(config)
    optimizers = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    adam, muon = optimizers.optimizers
    assert isinstance(muon, Muon)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (name.startswith("blocks.") and p.dim() == 2), name
    assert id(model.value_embedding.weight) not in muon_params  # a table of rows per character, not a map
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
