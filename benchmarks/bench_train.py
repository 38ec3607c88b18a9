"""Benchmarks of the model and trainer on Tiny Shakespeare.

    python benchmarks/bench_train.py quality --budget 2m            # exact val loss after a time budget
    python benchmarks/bench_train.py quality --budget 15m --preset cpu-small
    python benchmarks/bench_train.py throughput                     # tokens/s and model FLOP utilisation
    python benchmarks/bench_train.py profile --preset cpu-small     # where a step's time goes, by kind of operator
    python benchmarks/bench_train.py paired --preset shakespeare-gpu --toggle fundamentallm.model.QUERY_BLOCK=128
    python benchmarks/bench_train.py attention                      # fused attention against spelled out, per shape
    python benchmarks/bench_train.py activations                    # the MLP's non-linearities, fwd + bwd
    python benchmarks/bench_train.py rotary                         # rotary positions' cost, fwd + bwd
    python benchmarks/bench_train.py generation                     # characters/s with and without KV cache
    python benchmarks/bench_train.py processes                      # tokens/s training in 1 and 2 processes
    python benchmarks/bench_train.py target --dataset DIR --preset shakespeare-gpu --target 1.47

quality: prepares Tiny Shakespeare with the classic contiguous split (first 90% of
characters train, last 10% validation), runs ``fundamentallm train --time-budget B`` as a
fresh process (the budget counts from the command's start, so loading data and building
the model are inside it), and evaluates the final checkpoint exactly over the whole
validation split (sliding window, stride half the context; and under nanoGPT's protocol,
non-overlapping windows, the figure to set beside nanoGPT's). It prints the process wall
time, steps, tokens/s and the exact loss, perplexity, bits per character and per byte.

throughput: training tokens/s at the ``shakespeare-gpu`` and ``cpu-small`` shapes, and model
FLOP utilisation: model FLOPs per second (6 x non-embedding parameters + 6 x layers x
context x width per token, forward and backward, the attention term as in the PaLM paper)
against a large matrix product of the same dtype measured in the same run.

profile: torch.profiler over a few training steps of one preset on the CPU: milliseconds per step in the
forward pass, the backward pass and the optimizer, and the operators' own time grouped by kind
(matrix products, fused attention, softmax and masking, norms, activations, dropout, casts, the
loss, optimizer arithmetic), then the top operators. The first thing to run on a new kind of
machine: what is not a matrix product keeps the matrix units idle.

paired: one setting of the code changed against as it is, in one process: training steps of one
preset alternate between the module-level setting as it is and as ``--toggle MODULE.NAME=VALUE``
sets it (the order switching every pair), and the ratio of each pair's times is taken. Both halves
of a pair run under the same load, so the median ratio holds on a shared machine where separate
runs of ``throughput`` swing by 2-5%, more than the change being judged. Only settings the code
reads at each call are toggled this way (those read when the model is built are not).

attention: causal attention forward and backward at training shapes, PyTorch's fused kernel
against the model's spelled-out attention, in fp32 and bf16 (under autocast), and which one the
model picks there. On a new kind of CPU, check that the pick is the faster one.

activations: the MLP's non-linearities (tanh GELU, exact GELU, ReLU squared) forward and backward
at the MLP shapes of the presets, fp32 and bf16, and each against the tanh GELU.

rotary: what rotary positions add to the attention's queries, keys and values, forward and backward:
from a qkv product's output to the (B x H, T, D) tensors the attention multiplies, with no rotation
(learned positions), with the rotation as autograd makes it of its formula (what torch.compile
starts from) and with the model's eager rotation (`model.apply_rotary`), in bf16.

generation: characters per second generating 512 characters after a 256-character
prompt at context 256, with and without the KV cache.

processes: training tokens/s of ``fundamentallm train --processes N`` (torchrun, DDP, gloo
on CPU; NCCL on GPUs) for each N given, the same preset and global batch, median of the
repeats, and the ratio against one process. Each process gets cores / N threads.

target: trains a preset on an already prepared dataset (no data stage: what the GPU check runs on
a machine without the data stage's dependencies), and reports the wall-clock seconds at which the
validation-subset loss first reached the target (an estimate during training), the exact loss of
``best.pt`` on the whole validation split with the sliding window and with non-overlapping windows
(``--protocol nanogpt``), and tokens/s.

Run with the machine otherwise idle; figures go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpus import shakespeare  # same directory

REPO = Path(__file__).resolve().parent.parent
# This tree's package, not the installed one (an editable install points at another checkout when this
# runs from a worktree), in this process and in the processes it starts.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))


def shakespeare_dataset(text: Path, out: Path) -> Path:
    from fundamentallm.config import DataConfig
    from fundamentallm.data.prepare import prepare

    config = DataConfig.from_dict(
        {
            "ingest": {"sources": [str(text)]},
            "encode": {"split": "contiguous", "train_fraction": 0.9, "val_fraction": 0.1, "test_fraction": 0.0},
        }
    )
    return Path(prepare(config, out, data_docs=False).dataset.path)


def quality(args: argparse.Namespace) -> None:
    from fundamentallm.evaluate import evaluate

    # --keep: each run's directory (metrics.jsonl: the curve; the checkpoints) stays for a look later.
    kept = [args.keep / f"run-{repeat + 1}" for repeat in range(args.repeats)] if args.keep else []
    if taken := [run for run in kept if run.exists()]:
        sys.exit(f"{taken[0]} exists: --keep takes a directory without run-N directories in it")
    dataset = shakespeare_dataset(args.shakespeare, args.data)
    results = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            run = kept[repeat] if kept else Path(tmp) / "run"
            command = [
                sys.executable,
                "-m",
                "fundamentallm.cli",
                "train",
                str(dataset),
                "--out",
                str(run),
                "--preset",
                args.preset,
                "--time-budget",
                args.budget,
                "--no-eval",
                "--json",
            ]
            for item in args.set or []:
                command += ["--set", item]
            started = time.monotonic()
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            wall = time.monotonic() - started
            if proc.returncode != 0:
                sys.exit(f"training failed:\n{proc.stderr[-4000:]}")
            trained = json.loads(proc.stdout)["train"]
            figures = evaluate(run / "latest.pt", dataset, "val")
            # nanoGPT's measure too (non-overlapping windows), the only one to set beside its 1.4697.
            nanogpt = evaluate(run / "latest.pt", dataset, "val", protocol="nanogpt")
            record = {"wall_s": wall, **trained, "exact": figures.to_dict(), "exact_nanogpt": nanogpt.to_dict()}
            results.append(record)
            print(
                f"run {repeat + 1}: wall {wall:.1f}s, {trained['steps']} steps, {trained['tokens']:,} tokens, "
                f"{trained['tokens_per_s']:,.0f} tok/s ({trained['precision']}), "
                f"val loss {figures.loss:.4f} nats/char, ppl {figures.perplexity:.3f}, "
                f"{figures.bits_per_char:.4f} bpc, {figures.bits_per_byte:.4f} bpb "
                f"(sliding; unigram {figures.unigram_bits_per_char:.3f}, uniform {figures.uniform_bits_per_char:.3f} "
                f"bits); nanogpt protocol {nanogpt.loss:.4f} nats/char"
                + (
                    f"; calibrated: temperature {trained['temperature']:.3f}, held-out loss "
                    f"{trained['calibration_loss_before']:.4f} -> {trained['calibration_loss_after']:.4f}"
                    if trained.get("calibration_loss_before")
                    else ""
                ),
                flush=True,
            )
    losses = [r["exact"]["loss"] for r in results]
    print(
        f"preset {args.preset}, budget {args.budget}, overrides {args.set or []}: "
        f"median exact val loss {statistics.median(losses):.4f} over {len(losses)} run(s) (sliding protocol; "
        f"nanogpt protocol {statistics.median(r['exact_nanogpt']['loss'] for r in results):.4f})"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _matmul_rate(dtype, device, n: int = 2048, repeats: int = 10) -> float:
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(2 * n**3 / (time.perf_counter() - start))
    return statistics.median(rates)


def _train_step(forward, optimizer, x, y, precision, device) -> None:
    import torch

    with precision.autocast(device):
        _, loss = forward(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def _training_setup(name: str, args: argparse.Namespace, device):
    """A preset's model, optimizer and one random batch, as the trainer builds them."""
    import torch

    from fundamentallm.config import parse_override
    from fundamentallm.model import CharTransformer
    from fundamentallm.optim import build_optimizer
    from fundamentallm.presets import preset
    from fundamentallm.runtime import configure_backends, resolve_precision

    configure_backends(device)  # as the trainer does (on a CPU: freed memory reused)
    config = preset(name).with_overrides(dict(parse_override(item) for item in args.set or []))
    mc, tc = config.model.replace(vocab_size=66), config.train
    if args.dropout is not None:
        mc = mc.replace(dropout=args.dropout)
    precision = resolve_precision(tc.precision if args.precision == "preset" else args.precision, device)
    torch.manual_seed(0)
    model = CharTransformer(mc).to(device).train()
    optimizer = build_optimizer(model, tc, device, precision.dtype)  # as the trainer does
    forward = torch.compile(model) if args.compile else model
    batch = args.batch or tc.batch_size
    x = torch.randint(0, 66, (batch, mc.context_length), device=device)
    y = torch.randint(0, 66, (batch, mc.context_length), device=device)
    return model, forward, optimizer, x, y, precision, mc


def throughput(args: argparse.Namespace) -> None:
    import torch

    from fundamentallm.runtime import resolve_device

    device = resolve_device(args.device)
    for name in args.presets:
        model, forward, optimizer, x, y, precision, mc = _training_setup(name, args, device)
        # The matrix rate is taken before and after the steps and the higher kept: on a shared machine one
        # measurement moved between 0.9 and 2.2 TFLOP/s (bf16, AMX Xeon), and a low one would flatter MFU.
        before = _matmul_rate(precision.dtype or torch.float32, device)
        for _ in range(args.warmup):
            _train_step(forward, optimizer, x, y, precision, device)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            _train_step(forward, optimizer, x, y, precision, device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        peak = max(before, _matmul_rate(precision.dtype or torch.float32, device))
        batch = x.shape[0]
        tokens = batch * mc.context_length
        n = model.num_parameters(non_embedding=True)
        flops_per_token = 6 * n + 6 * mc.n_layer * mc.context_length * mc.d_model
        achieved = flops_per_token * tokens / seconds
        trainer = _trainer_step_seconds(name, model, forward, optimizer, batch, precision, mc, device, args)
        print(
            f"{name}: {mc.n_layer}x{mc.d_model}, context {mc.context_length}, batch {batch}, dropout {mc.dropout}, "
            f"{precision.name}, compile={args.compile}: {tokens / seconds:,.0f} tokens/s, "
            f"{achieved / 1e9:.1f} GFLOP/s model, matmul peak {peak / 1e9:.1f} GFLOP/s -> MFU {achieved / peak:.1%}; "
            f"the trainer's step: {tokens / trainer:,.0f} tokens/s ({seconds / trainer:.0%} of that)",
            flush=True,
        )


def _trainer_step_seconds(name, model, forward, optimizer, batch, precision, mc, device, args) -> float:
    """Seconds per step of the trainer's own `train_step` (random windows of a token array drawn and
    moved to the device, the loss and gradient norm read, clipping), over `args.steps` steps in a row:
    what the loop adds to the bare forward, backward and optimizer step timed above."""
    import numpy as np
    import torch

    from fundamentallm.checkpoint import TrainProgress
    from fundamentallm.distributed import Dist
    from fundamentallm.presets import preset
    from fundamentallm.train import Batches, TrainState, train_step

    tc = preset(name).train.replace(batch_size=batch)
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, 1_000_000).astype(np.uint8)
    batches = Batches(tokens, mc.context_length, batch, device, seed=1)
    state = TrainState(model, optimizer, batches, TrainProgress())
    for _ in range(args.warmup):
        train_step(forward, model, state, tc, device, precision, Dist())
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(forward, model, state, tc, device, precision, Dist())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def paired(args: argparse.Namespace) -> None:
    """Training steps on the CPU alternating between a module-level setting as it is and as `--toggle`
    sets it; the ratio of each pair's times, median and range."""
    import ast
    import importlib

    from fundamentallm.runtime import resolve_device

    if args.compile:  # torch.compile bakes the values of module settings into its code, guarded: each toggle recompiles
        sys.exit("paired: eager steps only (--compile would recompile at every change of the setting)")
    target, _, text = args.toggle.partition("=")
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        original = getattr(module, name)
    except (ImportError, AttributeError, ValueError):
        sys.exit(f"paired: --toggle {args.toggle!r}: no module-level setting {target!r} (MODULE.NAME=VALUE)")
    try:
        changed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        sys.exit(f"paired: --toggle {args.toggle!r}: {text!r} is not a Python literal")
    device = resolve_device("cpu")
    _model, forward, optimizer, x, y, precision, mc = _training_setup(args.preset, args, device)
    times: dict[str, list[float]] = {"as is": [], "changed": []}

    def step(value, key: str) -> None:
        setattr(module, name, value)
        start = time.perf_counter()
        try:
            _train_step(forward, optimizer, x, y, precision, device)
        except Exception as error:
            sys.exit(f"paired: a step with {target} = {value!r} failed: {type(error).__name__}: {error}")
        times[key].append(time.perf_counter() - start)

    try:
        for _ in range(args.warmup):  # both settings warmed up
            step(original, "as is")
            step(changed, "changed")
        for kept in times.values():
            kept.clear()  # the warm-up's times
        for i in range(args.pairs):
            order = [(original, "as is"), (changed, "changed")]
            for value, key in order if i % 2 == 0 else order[::-1]:
                step(value, key)
    finally:
        setattr(module, name, original)
    ratios = sorted(a / b for a, b in zip(times["as is"], times["changed"], strict=True))
    tokens = x.shape[0] * mc.context_length
    as_is, changed_s = statistics.median(times["as is"]), statistics.median(times["changed"])
    print(
        f"{args.preset}: {mc.n_layer}x{mc.d_model}, {precision.name}; {target} = {original!r} (as is) against "
        f"{changed!r} (changed), {args.pairs} pairs of steps: as is {tokens / as_is:,.0f} tokens/s, changed "
        f"{tokens / changed_s:,.0f} tokens/s; changed / as is, median of the pairs {statistics.median(ratios):.3f}x "
        f"(pairs {ratios[0]:.3f}-{ratios[-1]:.3f}, {sum(r > 1 for r in ratios)} of {len(ratios)} faster)"
    )


def attention(args: argparse.Namespace) -> None:
    """Causal attention forward + backward, PyTorch's fused kernel against `explicit_attention`,
    under the autocast each precision trains with: where `model.SPELLED_OUT_MAX_POSITIONS` comes from."""
    import torch
    import torch.nn.functional as F

    from fundamentallm.model import _tiles, attention_slices, explicit_attention, spell_out_attention
    from fundamentallm.runtime import configure_backends

    configure_backends(torch.device("cpu"))  # as the trainer does (freed memory reused)

    def fused(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def seconds(fn, shape, dtype) -> float:
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, dtype=dtype)
        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        times = []
        for _ in range(args.warmup + args.repeats):
            start = time.perf_counter()
            with autocast:
                out = fn(q, k, v)
            out.backward(grad)
            times.append(time.perf_counter() - start)
        return statistics.median(times[args.warmup :])

    for dtype in [_torch_dtype(name) for name in args.dtypes]:
        for shape in args.shapes:
            batch, heads, positions, head_dim = shape
            a, b = seconds(fused, shape, dtype), seconds(explicit_attention, shape, dtype)
            queries = torch.empty(shape, dtype=dtype)
            chosen = "fused"
            if spell_out_attention(queries, 0.0):
                tiles = _tiles(batch * heads, positions, attention_slices(queries))  # the model's own tiling
                slices, blocks = len({rows.start for rows, _, _ in tiles}), len({start for _, start, _ in tiles})
                chosen = f"spelled out in {len(tiles)} tile(s): {slices} slice(s) x {blocks} block(s) of queries"
            print(
                f"{str(dtype).removeprefix('torch.')} B {batch} H {heads} T {positions} D {head_dim}: "
                f"fused {a * 1e3:.1f} ms, spelled out {b * 1e3:.1f} ms, fused / spelled out {a / b:.2f}x; "
                f"the model uses: {chosen}",
                flush=True,
            )


def activations(args: argparse.Namespace) -> None:
    """The MLP's non-linearities (`model.ACTIVATIONS`) forward + backward at MLP shapes, per dtype:
    milliseconds each and against the tanh GELU (`gelu`, the default)."""
    import torch

    from fundamentallm.model import ACTIVATIONS
    from fundamentallm.runtime import configure_backends

    configure_backends(torch.device("cpu"))  # as the trainer does (freed memory reused)

    def seconds(fn, x, grad) -> float:
        times = []
        for _ in range(args.warmup + args.repeats):
            start = time.perf_counter()
            fn(x).backward(grad)
            times.append(time.perf_counter() - start)
        return statistics.median(times[args.warmup :])

    for dtype in [_torch_dtype(name) for name in args.dtypes]:
        for shape in args.shapes:
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            grad = torch.randn(shape, dtype=dtype)
            ms = {name: seconds(fn, x, grad) * 1e3 for name, fn in ACTIVATIONS.items()}
            figures = ", ".join(f"{name} {t:.2f} ms ({ms['gelu'] / t:.2f}x)" for name, t in ms.items())
            print(f"{str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))}: {figures}", flush=True)


def rotary(args: argparse.Namespace) -> None:
    """Forward + backward from the qkv output (B, T, 3C) to the attention's (B x H, T, D) queries, keys
    and values: without rotation, with the rotation written out under autograd, with the model's."""
    import torch

    from fundamentallm.model import apply_rotary, rotary_formula, rotary_tables

    B, H, T, D = args.shape
    C = H * D
    cos, sin = rotary_tables(D, T)

    def heads(qkv, rotate):
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=2))
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        return [t.reshape(B * H, T, D) for t in (q, k, v)]

    ways = {
        "none": None,
        "autograd": lambda x: rotary_formula(x, cos, sin),  # the compiled path's formula
        "eager function": lambda x: apply_rotary(x, cos, sin),
    }
    qkv = torch.randn(B, T, 3 * C, dtype=getattr(torch, args.dtype), requires_grad=True)
    grads = [torch.randn(B * H, T, D, dtype=qkv.dtype) for _ in range(3)]
    ms = {}
    for name, rotate in ways.items():
        times = []
        for _ in range(args.warmup + args.repeats):
            start = time.perf_counter()
            torch.autograd.backward(heads(qkv, rotate), grads)
            times.append(time.perf_counter() - start)
        ms[name] = statistics.median(times[args.warmup :]) * 1e3
    extra = {name: ms[name] - ms["none"] for name in ways if name != "none"}
    own = extra["eager function"]  # too small to time at tiny shapes: no ratio then
    ratio = f"{extra['autograd'] / own:.2f}x" if own > 0 else "n/a"
    print(
        f"{args.dtype} B {B} H {H} T {T} D {D}: no rotation {ms['none']:.2f} ms; "
        + "; ".join(f"{name} {ms[name]:.2f} ms (+{extra[name] / 2:.2f} per tensor)" for name in extra)
        + f"; autograd / eager function, the rotation's own time: {ratio}",
        flush=True,
    )


# Where a training step's time goes, by the kind of operator (self time, torch.profiler names).
PROFILE_KINDS = {
    "matrix products": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "fused attention": ("aten::_scaled_dot_product", "aten::_flash_attention"),
    "softmax and masking": (
        "aten::_softmax",
        "aten::_safe_softmax",
        "aten::masked_fill",
        "aten::where",
        "aten::isneginf",
        "aten::all",
        "aten::triu",
        "aten::tril",
    ),
    "norms": ("aten::native_layer_norm", "aten::_fused_rms_norm", "aten::rms_norm", "aten::layer_norm"),
    "activations": ("aten::gelu", "aten::relu", "aten::threshold_backward", "aten::square", "aten::pow"),
    "dropout and random": (
        "aten::bernoulli",
        "aten::native_dropout",
        "aten::random_",
        "aten::uniform_",
        "aten::randint",
    ),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat"),
    "loss": ("aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy"),
}
OPTIMIZER_KIND = "optimizer arithmetic"  # every operator under the optimizer's step, whatever its name


def _kind(op: str) -> str:
    for kind, prefixes in PROFILE_KINDS.items():
        if op.startswith(prefixes):
            return kind
    return "elementwise and other"


def profile(args: argparse.Namespace) -> None:
    """torch.profiler over a few training steps on the CPU: time per step by phase and by kind of operator."""
    import torch
    from torch.profiler import ProfilerActivity, record_function

    from fundamentallm.runtime import resolve_device

    device = resolve_device("cpu")
    _model, forward, optimizer, x, y, precision, mc = _training_setup(args.preset, args, device)

    def step() -> None:
        with record_function("phase: forward"), precision.autocast(device):
            _, loss = forward(x, y)
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    wall = {e.key: e.cpu_time_total / 1e3 / args.steps for e in events if e.key.startswith("phase: ")}
    by_kind: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith("aten::"):
            kind, parent = _kind(e.name), e.cpu_parent
            while parent is not None:
                if parent.name == "phase: optimizer":
                    kind = OPTIMIZER_KIND
                parent = parent.cpu_parent
            by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / args.steps
    total = sum(by_kind.values())
    print(
        f"{args.preset}: {mc.n_layer}x{mc.d_model}, context {mc.context_length}, batch {x.shape[0]}, "
        f"dropout {mc.dropout}, {precision.name}, compile={args.compile}; per step, {args.steps} steps profiled "
        "(the profiler adds its own overhead):"
    )
    print("  phases: " + ", ".join(f"{k.removeprefix('phase: ')} {v:.1f} ms" for k, v in wall.items()))
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<24} {ms:9.1f} ms  {ms / total:6.1%}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=50))


def generation(args: argparse.Namespace) -> None:
    import torch

    from fundamentallm.config import ModelConfig
    from fundamentallm.data.vocab import Vocab
    from fundamentallm.model import CharTransformer
    from fundamentallm.runtime import resolve_device
    from fundamentallm.sample import SampleConfig, Sampler

    device = resolve_device(args.device)
    vocab = Vocab([chr(c) for c in range(32, 97)])
    torch.manual_seed(0)
    model = CharTransformer(ModelConfig(vocab_size=vocab.size, context_length=256, n_layer=6, n_head=6, d_model=384))
    model = model.to(device)
    prompt = "".join(vocab.chars[i % len(vocab.chars)] for i in range(256))
    config = SampleConfig(max_new_tokens=args.tokens, temperature=1.0, seed=0)
    rates = {}
    for use_cache in (True, False):
        sampler = Sampler(model, vocab, device, use_cache=use_cache)
        sampler.generate(prompt, config.replace(max_new_tokens=8))
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sampler.generate(prompt, config)
            runs.append(args.tokens / (time.perf_counter() - start))
        rates[use_cache] = statistics.median(runs)
        print(
            f"KV cache {'on ' if use_cache else 'off'}: {rates[use_cache]:,.1f} characters/s "
            f"(runs: {', '.join(f'{r:.1f}' for r in runs)})",
            flush=True,
        )
    print(f"speed-up from the cache: {rates[True] / rates[False]:.1f}x (6x384 model, context 256, {device})")


def processes(args: argparse.Namespace) -> None:
    dataset = shakespeare_dataset(args.shakespeare, args.data)
    cores = os.cpu_count() or 1
    rates: dict[int, float] = {}
    for n in args.counts:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="bench-processes-") as tmp:
                command = [sys.executable, "-m", "fundamentallm.cli", "train", str(dataset), "--out", f"{tmp}/run"]
                command += ["--preset", args.preset, "--max-steps", str(args.steps), "--processes", str(n)]
                command += ["--no-eval", "--json", "--set", f"train.eval_interval={args.steps}"]
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
                proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"training in {n} process(es) failed:\n{proc.stderr[-4000:]}")
                runs.append(json.loads(proc.stdout)["train"]["tokens_per_s"])
        rates[n] = statistics.median(runs)
        print(
            f"{n} process(es), {max(1, cores // n)} thread(s) each: {rates[n]:,.0f} tokens/s "
            f"(runs: {', '.join(f'{r:,.0f}' for r in runs)})",
            flush=True,
        )
    base = rates[args.counts[0]]
    for n in args.counts[1:]:
        print(
            f"{n} processes vs {args.counts[0]}: {rates[n] / base:.2f}x "
            f"({args.preset}, {args.steps} steps, {cores} cores)"
        )


def target(args: argparse.Namespace) -> None:
    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.evaluate import evaluate

    run = args.out
    command = [sys.executable, "-m", "fundamentallm.cli", "train", str(args.dataset), "--out", str(run)]
    command += ["--preset", args.preset, "--no-eval", "--json"]
    for item in args.set or []:
        command += ["--set", item]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stderr[-4000:]}")
    trained = json.loads(proc.stdout)["train"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["kind"] == "eval"]
    reached = next((r for r in evals if r["val_loss"] <= args.target), None)
    # When step 1 ended, counted from the command's start: imports, data, model and compilation.
    first_step_s = next((r["elapsed_s"] for r in records if r["kind"] == "train" and r["step"] == 1), None)
    context = load_checkpoint(run / "best.pt").config.model.context_length
    sliding = evaluate(run / "best.pt", args.dataset, "val", device=args.device)
    windows = evaluate(run / "best.pt", args.dataset, "val", protocol="nanogpt", device=args.device)
    result = {
        "preset": args.preset,
        "wall_s": wall,
        "steps": trained["steps"],
        "tokens_per_s": trained["tokens_per_s"],
        "device": trained["device"],
        "precision": trained["precision"],
        "target": args.target,
        "target_reached_s": None if reached is None else reached["elapsed_s"],
        "target_reached_step": None if reached is None else reached["step"],
        "first_step_s": first_step_s,
        "val_loss_sliding": sliding.loss,
        "val_loss_nanogpt": windows.loss,
        "val_bpc_sliding": sliding.bits_per_char,
    }
    print(
        f"{args.preset} on {trained['device']} ({trained['precision']}): "
        f"{trained['steps']} steps in {wall:.1f} s wall, "
        f"{trained['tokens_per_s']:,.0f} tokens/s; step 1 done at {first_step_s or float('nan'):.1f} s "
        f"(start-up and compilation); validation subset reached {args.target} "
        + (
            f"at {reached['elapsed_s']:.1f} s (step {reached['step']})"
            if reached
            else f"never (best subset {min((r['val_loss'] for r in evals), default=float('nan')):.4f})"
        )
        + f"; exact val loss of best.pt {sliding.loss:.4f} (sliding window), {windows.loss:.4f} (nanogpt protocol: "
        f"non-overlapping windows of {context})",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _dtype_name(text: str) -> str:
    """A dtype as `--dtypes` takes it (fp32 or float32, bf16 or bfloat16): torch's name for it."""
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[text]


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def _attention_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split("x")
    if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxHEADSxPOSITIONSxHEAD_DIM, e.g. 16x4x128x48")
    batch, heads, positions, head_dim = map(int, parts)
    return batch, heads, positions, head_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="exact validation loss after a time budget")
    q.add_argument("--budget", default="2m")
    q.add_argument("--preset", default="cpu-small")
    q.add_argument("--set", action="append", help="setting override, as for 'fundamentallm train --set'")
    q.add_argument("--repeats", type=int, default=1)
    q.add_argument(
        "--shakespeare", type=Path, help="path to tinyshakespeare.txt (default: the shared copy, else downloaded)"
    )
    q.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fundamentallm-bench-data")
    q.add_argument("--json", type=Path)
    q.add_argument("--keep", type=Path, help="keep each run's directory as DIR/run-N (metrics.jsonl: its curve)")
    # The training steps `throughput` and `profile` time: a preset's model, optimizer and batch (_training_setup).
    steps = argparse.ArgumentParser(add_help=False)
    steps.add_argument("--precision", default="preset", help="preset (the preset's own), auto, fp32 or bf16")
    steps.add_argument("--compile", action="store_true")
    steps.add_argument("--batch", type=int, default=0, help="override the preset's batch size")
    steps.add_argument("--dropout", type=float, help="override the preset's dropout")
    steps.add_argument(
        "--set", action="append", help="setting override, as for 'fundamentallm train --set' (e.g. model.n_layer=6)"
    )
    steps.add_argument("--warmup", type=int, default=3)
    t = sub.add_parser("throughput", parents=[steps], help="training tokens/s and model FLOP utilisation")
    t.add_argument("--presets", nargs="+", default=["shakespeare-gpu", "cpu-small"])
    t.add_argument("--device", default="auto")
    t.add_argument("--steps", type=int, default=10)
    f = sub.add_parser(
        "profile", parents=[steps], help="where a CPU training step's time goes (torch.profiler), by kind of operator"
    )
    f.add_argument("--preset", default="cpu-small")
    f.add_argument("--steps", type=int, default=5)
    f.add_argument("--top", type=int, default=15, help="operators listed, by self time")
    pr = sub.add_parser(
        "paired", parents=[steps], help="a module-level setting changed against as it is, steps alternating"
    )
    pr.add_argument("--preset", default="shakespeare-gpu")
    pr.add_argument(
        "--toggle",
        required=True,
        help="MODULE.NAME=VALUE, a module-level setting the code reads at each call and its changed value "
        "(a Python literal), e.g. fundamentallm.model.QUERY_BLOCK=128",
    )
    pr.add_argument("--pairs", type=int, default=16, help="pairs of steps timed (after --warmup pairs)")
    a = sub.add_parser("attention", help="causal attention fwd + bwd: fused kernel against spelled out")
    a.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], type=_dtype_name, help="fp32, bf16")
    a.add_argument(
        "--shapes",
        nargs="+",
        # argparse converts given values with `type`, not a list default: parse those here
        default=[
            _attention_shape(s) for s in ("16x4x64x40", "16x4x128x48", "16x6x256x64", "64x6x256x64", "16x4x512x48")
        ],
        type=_attention_shape,
        help="BATCHxHEADSxPOSITIONSxHEAD_DIM",
    )
    a.add_argument("--warmup", type=int, default=2)
    a.add_argument("--repeats", type=int, default=7)
    v = sub.add_parser("activations", help="the MLP's non-linearities fwd + bwd, against the tanh GELU")
    v.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], type=_dtype_name, help="fp32, bf16")
    v.add_argument(
        "--shapes",
        nargs="+",
        default=[(32, 64, 640), (16, 128, 768), (64, 256, 1536)],  # cpu-quick's, cpu-small's, shakespeare-gpu's MLP
        type=lambda text: tuple(int(n) for n in text.split("x")),
        help="BATCHxPOSITIONSxHIDDEN",
    )
    v.add_argument("--warmup", type=int, default=3)
    v.add_argument("--repeats", type=int, default=15)
    o = sub.add_parser("rotary", help="rotary positions' cost fwd + bwd: autograd's formula against the model's")
    o.add_argument("--shape", default=(16, 4, 256, 48), type=_attention_shape, help="BATCHxHEADSxPOSITIONSxHEAD_DIM")
    o.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    o.add_argument("--warmup", type=int, default=3)
    o.add_argument("--repeats", type=int, default=21)
    g = sub.add_parser("generation", help="characters/s with and without the KV cache")
    g.add_argument("--device", default="auto")
    g.add_argument("--tokens", type=int, default=512)
    g.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("processes", help="training tokens/s in 1 and 2 processes (torchrun, DDP)")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2])
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--shakespeare", type=Path, help="path to tinyshakespeare.txt (default: the shared copy, else downloaded)"
    )
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fundamentallm-bench-data")
    r = sub.add_parser("target", help="train a preset on a prepared dataset; time to a target loss")
    r.add_argument("--dataset", type=Path, required=True, help="a prepared dataset directory")
    r.add_argument("--preset", default="shakespeare-gpu")
    r.add_argument("--target", type=float, default=1.47, help="validation loss to reach, nats/char")
    r.add_argument("--set", action="append", help="setting override, as for 'fundamentallm train --set'")
    r.add_argument("--device", default="auto", help="device of the exact evaluation")
    r.add_argument("--out", type=Path, required=True, help="run directory (must not hold a checkpoint)")
    r.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command in ("quality", "processes"):
        args.shakespeare = shakespeare(args.shakespeare)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    commands = {
        "quality": quality,
        "throughput": throughput,
        "profile": profile,
        "paired": paired,
        "attention": attention,
        "activations": activations,
        "rotary": rotary,
        "generation": generation,
        "processes": processes,
        "target": target,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
