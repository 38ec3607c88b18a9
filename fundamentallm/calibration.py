"""Temperature calibration: one number, fitted on held-out text, that the logits are divided by.

A character model trained over its text many times becomes overconfident on text it has not seen:
`cpu-small` after 15 minutes (some 20 passes over Tiny Shakespeare's training split) gave its
validation text 0.02 nats/char less loss with its logits divided by about 1.2; calibrated on 2% of
the training split held out, it ended 0.025-0.028 lower (AMX Xeon, benchmarks/RESULTS.md).
`train.calibration` holds the first share of the training split out of training; when training ends,
`fit_temperature` finds the temperature that minimises the loss on it and `fold_temperature` divides
the final norm's gain (and bias) by it, so the checkpoint's logits come out divided with no new
setting or code path: evaluation, sampling, the MLflow model and warm starts all see the calibrated
model as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fundamentallm.evaluate import window_plan

LOGIT_BUDGET = 2**25
"""At most this many logits (positions x vocabulary, fp32: 128 MiB) are held for the fit."""

_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class Calibration:
    temperature: float
    loss_before: float
    """Mean loss (nats/char) on the held-out positions with the logits as they were."""
    loss_after: float
    """The same divided by `temperature`."""
    positions: int


@torch.no_grad()
def held_out_logits(
    model: torch.nn.Module, tokens: torch.Tensor, context: int, device: torch.device, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (N, V) and targets (N,) for held-out `tokens`, each target scored with the context
    the sliding evaluation gives it (`window_plan`, stride context / 2). Past `LOGIT_BUDGET` logits, the
    windows kept are spread evenly over the text (each still scoring only its own targets)."""
    if len(tokens) < context + 1:
        raise ValueError(f"{len(tokens)} held-out tokens: at least context + 1 ({context + 1}) are needed")
    plan = window_plan(len(tokens), context, max(context // 2, 1))
    room = max(LOGIT_BUDGET // model.config.vocab_size // max(context // 2, 1), 1)  # windows that fit
    if len(plan) > room:
        plan = [plan[round(i * (len(plan) - 1) / max(room - 1, 1))] for i in range(room)]
    was_training = model.training
    model.eval()
    logits, targets = [], []
    offsets = torch.arange(context + 1)
    for i in range(0, len(plan), batch_size):
        batch = plan[i : i + batch_size]
        window = tokens[torch.tensor([start for start, _ in batch])[:, None] + offsets].to(device)
        out, _ = model(window[:, :-1])
        for row, (_, first) in enumerate(batch):
            logits.append(out[row, first:].float().cpu())
            targets.append(window[row, 1 + first :].cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> Calibration:
    """The temperature T in [1/8, 8] minimising cross-entropy(logits / T): golden-section search over
    log T (the loss is convex in 1 / T, so it has one minimum)."""

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), targets))

    lo, hi = math.log(1 / 8), math.log(8)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-5:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = loss(b)
    temperature = math.exp((lo + hi) / 2)
    return Calibration(temperature, loss(0.0), loss(math.log(temperature)), len(targets))


def fold_temperature(model_state: dict[str, torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
    """The weights with the final norm's gain and bias divided by `temperature`: the logits are a linear
    function of that norm's output (tied or untied output matrix alike), so they come out divided by it."""
    if "norm.weight" not in model_state:
        raise ValueError("no final norm gain (norm.weight) in the weights to fold the temperature into")
    state = dict(model_state)
    for name in ("norm.weight", "norm.bias"):
        if name in state:
            state[name] = state[name] / temperature
    return state
