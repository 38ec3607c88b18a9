"""Optimizers: AdamW, and Muon for the transformer's hidden weight matrices.

Muon (Keller Jordan, 2024) keeps SGD momentum per weight matrix and replaces each update by
the nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations: every
direction of the update gets a similar step size. On small transformers it reaches a given
loss in markedly fewer steps than AdamW. It applies to 2-D weights inside the blocks only;
embeddings (which double as the output layer here) and norm gains stay with AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fundamentallm.config import TrainConfig

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for update = U S V^T, by a quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) are Muon's: they push singular values into
    roughly [0.7, 1.2] quickly rather than converging exactly, which is all the update needs.
    """
    return orthogonalize_all([update], steps)[0]


def orthogonalize_all(
    updates: list[torch.Tensor], steps: int = 5, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """`orthogonalize` of each matrix in `updates`, the matrices of one shape as one batch, the
    iteration's products in `dtype` (bfloat16 where the hardware multiplies it fast, as Muon
    does on GPUs: the iteration only needs singular values near 1, not exact ones).

    A transformer's blocks repeat a few shapes (12 matrices, 3 shapes at 3 x 160): one batched
    product per shape and step instead of one per matrix, and each step's two products with the
    scaling and sum folded in (`baddbmm`), took a Muon step in float32 on a 2-core AMD EPYC from
    40 to 32 ms at 3 x 160 and from 110 to 65 ms at 4 x 192; in bf16 the iteration is 1.9x faster
    again there (benchmarks/RESULTS.md).
    """
    a, b, c = _NS_COEFFICIENTS
    groups: dict[tuple[int, ...], list[int]] = {}
    wide = []  # each update as float32, rows <= columns (the Gram matrix is the smaller one)
    for i, update in enumerate(updates):
        x = update.float()
        x = x.T if x.size(0) > x.size(1) else x
        wide.append(x)
        groups.setdefault(tuple(x.shape), []).append(i)
    result: list[torch.Tensor] = list(updates)
    for members in groups.values():
        x = torch.stack([wide[i] for i in members])  # (n, rows, columns)
        x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)).to(dtype)
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * G + c * G @ G
            x = torch.baddbmm(x, poly, x, beta=a)  # a * X + (b * G + c * G @ G) @ X
        for i, orthogonal in zip(members, x.unbind(0), strict=True):
            update = updates[i]
            result[i] = (orthogonal.T if update.size(0) > update.size(1) else orthogonal).to(update.dtype)
    return result


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised, for 2-D parameters (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(
            params,
            {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "weight_decay": weight_decay},
        )
        self.ns_dtype = ns_dtype  # not in the state dict: a run resumed on other hardware follows that hardware

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            momentum = group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffers.append(state["momentum_buffer"])
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            updates = orthogonalize_all(list(updates), group["ns_steps"], self.ns_dtype)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            for p, update in zip(params, updates, strict=True):
                # Same root-mean-square step for tall and wide matrices.
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


class Optimizers:
    """Several optimizers stepped as one; `param_groups` spans them all.

    Every group carries `base_lr`: the schedule sets ``lr = base_lr * factor``.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizers do not match this configuration")
        for optimizer, data in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(data)


def _adamw(groups: list[dict[str, Any]], config: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": lr, "betas": (config.beta1, config.beta2)}
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device, matmul_dtype: torch.dtype | None = None
) -> Optimizers:
    """AdamW over everything (weight decay on matrices and embeddings only), or, with
    ``optimizer = "muon"``, Muon over the blocks' weight matrices and AdamW over the rest.

    `matmul_dtype`: the type the training's matrix products run in (its autocast type; None for
    float32); Muon's Newton-Schulz products run in it too."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "muon":
        hidden = [p for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and "blocks." in name]
        hidden_ids = {id(p) for p in hidden}
        rest = [p for p in params if id(p) not in hidden_ids]
        adam = _adamw(
            [
                {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
                {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
            ],
            config,
            config.lr,
            device,
        )
        muon = Muon(
            hidden,
            lr=config.muon_lr,
            momentum=config.muon_momentum,
            weight_decay=config.weight_decay,
            ns_dtype=matmul_dtype or torch.float32,
        )
        return Optimizers([adam, muon])
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return Optimizers([_adamw(groups, config, config.lr, device)])
