"""Named training presets: functions that build a `RunConfig`.

- ``debug``: a tiny model that trains in seconds, for tests.
- ``cpu-quick``: the best model found for a 2-core CPU in 2 minutes (Muon, 3 x 160, context 64, the
  exact GELU, the faster form, batch 32, Muon at 0.03); on a CPU with AMX (`precision=auto` trains in
  bf16 there) a step costs less and the preset takes batch 64 with Muon at 0.04 and its momentum at 0.9,
  and the output temperature fitted on the first 2% of the training split, held out (`calibration`).
- ``cpu-small``: the best model found for a 2-core CPU in 15 minutes (Muon, 4 x 192, context 128,
  compiled, the exact GELU but with AVX-512 BF16 without AMX); where bf16 is in hardware a step costs
  less, the model sees the text many more times, and the preset takes dropout 0.05 against overfitting;
  with AMX it trains eagerly (faster there with dropout, and no compilation), context 256 at batch 16
  (the same 4,096 tokens a step as 32 x 128), Muon at 0.03, no dropout for the first 30% of the time
  (`late_dropout`) and the output temperature fitted on the first 2% of the training split, held out
  (`calibration`).
- ``shakespeare-gpu``: the classic single-GPU configuration (6 layers, 6 heads, 384 wide,
  context 256, dropout 0.2, the exact GELU) that reaches about 1.47 nats/char on Tiny Shakespeare in nanoGPT's
  measure (non-overlapping windows: `fundamentallm evaluate --protocol nanogpt`).
"""

from __future__ import annotations

from collections.abc import Callable

from fundamentallm.config import ModelConfig, RunConfig, TrainConfig
from fundamentallm.errors import ConfigError


def debug() -> RunConfig:
    return RunConfig(
        model=ModelConfig(context_length=32, n_layer=2, n_head=2, d_model=32, dropout=0.0),
        train=TrainConfig(
            batch_size=16,
            max_steps=200,
            lr=3e-3,
            warmup_steps=10,
            eval_interval=50,
            eval_batches=4,
            checkpoint_interval=50,
            log_interval=20,
            precision="fp32",
        ),
    )


def cpu_quick() -> RunConfig:
    # Measured on Tiny Shakespeare in 2 minutes (benchmarks/RESULTS.md). On a 2-core Zen 4 EPYC with
    # AVX-512 BF16, batch 32 and Muon at 0.03 against 16 and 0.02: 1.546 against 1.567 (mean of 3 seeds,
    # better in each) and 1.2x the tokens per second. On a 2-core AVX2 EPYC (Zen 3, fp32) the same:
    # 1.6018 / 1.6115 / 1.6159 / 1.6058 against 1.6331 / 1.6215 / 1.6206 / 1.6401 (seeds 1337-1340, the
    # same half hour; lower in each), 1.1-1.4x the tokens per second (Muon's iterations are a third of a
    # batch-16 step there, a fifth of a batch-32 one). On a 2-core AMX Xeon 1.468 against 1.480 (mean of
    # 3, better in each), 1.19x the tokens per second. There the exact GELU, 2-3x faster than the tanh
    # form in bf16: 1.476 against 1.486 (mean of 3 seeds, better in each), 1.08x the tokens per second.
    # With AMX a step's fixed costs (Muon's among them) weigh more still: batch 64 and Muon at 0.04
    # against 32 and 0.03, 1.4635 against 1.4757 (mean of 3 seeds, lower in each), 1.32x the tokens per
    # second. There, with about 1,300 steps in the 2 minutes, Muon's momentum at 0.9 against 0.95: 1.4556
    # against 1.4622 (mean of 5 seeds, lower in 4); on the AVX2 EPYC, about as many steps at batch 16,
    # 0.9 did not help (1.6356 / 1.6218 / 1.6194 against 1.6331 / 1.6215 / 1.6206). On the AMX Xeon the
    # model, which sees the text about 8 times, is overconfident on new text: the first 2% of the training
    # split held out and the temperature fitted there (`train.calibration`, T 1.11-1.12): 1.4274 / 1.4212 /
    # 1.4184 against 1.4473 / 1.4444 / 1.4362 without (seeds 1337-1339, the same session). The exact GELU
    # on every CPU: in fp32 too it is the faster form (on the Zen 3 EPYC the activation alone, forward +
    # backward, 1.56-1.78x the tanh form's speed; the eager fp32 step 1.04x with AVX2 imitated on the Xeon).
    from fundamentallm import runtime  # torch: only when this preset is built

    unit = runtime.cpu_bf16_unit()
    batch, muon_lr, momentum, calibration = (64, 0.04, 0.9, 0.02) if unit == "amx" else (32, 0.03, 0.95, 0.0)
    return RunConfig(
        model=ModelConfig(
            context_length=64,
            n_layer=3,
            n_head=4,
            d_model=160,
            dropout=0.0,
            activation="gelu_exact",
        ),
        train=TrainConfig(
            batch_size=batch,
            max_steps=0,
            time_budget_s=120.0,
            optimizer="muon",
            lr=6e-3,
            muon_lr=muon_lr,
            muon_momentum=momentum,
            min_lr_ratio=0.0,
            warmup_steps=30,
            eval_interval=200,
            eval_batches=10,
            checkpoint_interval=200,
            calibration=calibration,
        ),
    )


def cpu_small() -> RunConfig:
    # Measured on a 2-core AVX2 CPU (benchmarks/RESULTS.md): 1.43 nats/char on Tiny Shakespeare in 15 minutes
    # (Zen 3 EPYC, 1.4305 / 1.4273, seeds 1337 / 1338). There the model sees the text about 6 times; dropout
    # 0.05 with the output temperature fitted (`calibration` 0.02) ended at 1.4710 (seed 1337): the compiled
    # fp32 step with dropout took 0.83x the tokens per second, and the model was the less trained for it.
    # Where bf16 is multiplied in hardware the same 15 minutes see the training text 15-20 times and the
    # model overfits without dropout; on a 2-core AMX Xeon, one run each: dropout 0 1.4850, 0.05 1.4053,
    # 0.1 1.4313. There, with dropout, the eager step (attention and dropout written out in
    # fundamentallm/model.py) is faster than the compiled one and needs no compilation, and the exact
    # GELU is the faster form: eager with it trained 1.21x the tokens/s of eager with the tanh form before
    # (20.5-21.7K against 17.5K; compiled 16.8-18.0K). With AMX, a step's fixed costs weigh more: batch 32
    # and Muon at 0.03 against 16 and 0.02, 1.3874 / 1.3915 against 1.3922 / 1.3997 (seeds 1337 / 1338,
    # lower in each), 1.15-1.2x the tokens per second. Then context 256 at batch 16 (the same tokens a
    # step, 0.9x the tokens per second): 1.3845 / 1.3880, lower in each seed, and 0.013-0.015 lower in
    # nanoGPT's non-overlapping windows (1.4023 / 1.4039), where every window starts without context.
    # Then no dropout for the first 30% of the time (`late_dropout`; those steps run 1.3x faster): 1.3942 /
    # 1.3807 / 1.3781 / 1.3878 / 1.3857 against 1.3900 / 1.3898 / 1.3761 / 1.3985 / 1.3976 (seeds
    # 1337-1341, the same day), mean 1.3853 against 1.3904, 1.00-1.11x the tokens per second. Such a model is
    # overconfident on new text (its validation loss 0.02 lower with the logits divided by about 1.2): the
    # first 2% of the training split held out and the temperature fitted there (`train.calibration`),
    # seeds 1338 / 1340 1.3589 / 1.3530 against 1.3866 / 1.3777 without (the same session). On AVX2 CPUs
    # (fp32, compiled) the exact GELU too: 1.04x the tokens per second of the tanh form (AVX2 imitated on the
    # AMX Xeon; on a Zen 3 EPYC the activation alone 1.56-1.78x); with AVX-512 BF16 (compiled bf16) the
    # tanh form stays, not measured there.
    from fundamentallm import runtime  # torch: only when this preset is built

    unit = runtime.cpu_bf16_unit()
    dropout = 0.05 if unit else 0.0
    amx = unit == "amx"
    context, muon_lr, late_dropout, calibration = (256, 0.03, 0.3, 0.02) if amx else (128, 0.02, 0.0, 0.0)
    return RunConfig(
        model=ModelConfig(
            context_length=context,
            n_layer=4,
            n_head=4,
            d_model=192,
            dropout=dropout,
            activation="gelu" if unit == "avx512_bf16" else "gelu_exact",
        ),
        train=TrainConfig(
            batch_size=16,
            max_steps=0,
            time_budget_s=900.0,
            optimizer="muon",
            lr=6e-3,
            muon_lr=muon_lr,
            min_lr_ratio=0.0,
            warmup_steps=50,
            eval_interval=200,
            eval_batches=10,
            checkpoint_interval=200,
            compile=not amx,
            late_dropout=late_dropout,
            calibration=calibration,
        ),
    )


def shakespeare_gpu() -> RunConfig:
    # nanoGPT's shape and its activation, the exact GELU (`nn.GELU()`), which on a CPU is also the fast
    # one (benchmarks/bench_train.py activations).
    return RunConfig(
        model=ModelConfig(context_length=256, n_layer=6, n_head=6, d_model=384, dropout=0.2, activation="gelu_exact"),
        train=TrainConfig(
            batch_size=64,
            max_steps=5000,
            lr=1e-3,
            min_lr_ratio=0.1,
            warmup_steps=100,
            beta2=0.99,
            eval_interval=250,
            eval_batches=20,
            compile=True,
        ),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "debug": debug,
    "cpu-quick": cpu_quick,
    "cpu-small": cpu_small,
    "shakespeare-gpu": shakespeare_gpu,
}


def preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
