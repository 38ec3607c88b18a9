"""precision="auto" on each kind of CPU, whatever this machine is: the check for fast bf16 is
forced each way (the project's machines differ: some have AMX, some AVX2 only)."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys

import pytest
import torch
from conftest import debug_config
from typer.testing import CliRunner

from fundamentallm import optim, runtime
from fundamentallm.cli import app
from fundamentallm.presets import preset
from fundamentallm.train import train

CPU = torch.device("cpu")


@pytest.mark.parametrize(("fast", "name", "dtype"), [(True, "bf16", torch.bfloat16), (False, "fp32", None)])
def test_auto_picks_bf16_exactly_where_the_cpu_multiplies_it_in_hardware(monkeypatch, fast, name, dtype):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    assert runtime.resolve_precision("auto", CPU) == runtime.Precision(name, dtype)
    # Asked for by name, a precision is used whatever the CPU.
    assert runtime.resolve_precision("fp32", CPU) == runtime.Precision("fp32", None)
    assert runtime.resolve_precision("bf16", CPU) == runtime.Precision("bf16", torch.bfloat16)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "cpuinfo", "unit"),
    [
        (True, True, "fpu sse2 avx2", "amx"),
        (True, False, "fpu sse2 avx2", "amx"),
        (False, True, "fpu sse2 avx2", "avx512_bf16"),
        (False, False, "fpu sse2 avx2 avx512_bf16 amx_bf16 amx_tile", "amx"),
        (False, False, "fpu sse2 avx2 avx512f avx512_bf16", "avx512_bf16"),
        (False, False, "fpu sse2 avx2 avx512f", ""),
    ],
)
def test_fast_bf16_is_read_from_torch_or_cpuinfo(monkeypatch, tmp_path, amx, avx512_bf16, cpuinfo, unit):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {cpuinfo}\n")
    real_path = runtime.Path
    monkeypatch.setattr(runtime, "Path", lambda p: real_path(info) if p == "/proc/cpuinfo" else real_path(p))
    assert runtime.cpu_bf16_unit() == unit
    assert runtime.cpu_has_fast_bf16() is bool(unit)


@pytest.mark.parametrize(("fast", "name"), [(True, "bf16"), (False, "fp32")])
def test_training_with_auto_runs_in_the_precision_auto_picks(tiny_dataset, tmp_path, monkeypatch, fast, name):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    config = debug_config(max_steps=4, eval_interval=4, checkpoint_interval=4, precision="auto", optimizer="muon")
    seen = []
    monkeypatch.setattr(optim, "orthogonalize_all", lambda updates, steps, dtype: seen.append(dtype) or updates)
    result = train(tiny_dataset, config, tmp_path / "run")
    assert result.precision == name and math.isfinite(result.final_train_loss)
    # Muon's Newton-Schulz products run in the training's matrix type.
    assert seen == [torch.bfloat16 if name == "bf16" else torch.float32] * 4


def test_compiled_code_is_cached_in_the_users_cache_directory_for_every_later_run(tmp_path, monkeypatch):
    import os

    from fundamentallm.runtime import COMPILE_CACHE_ENV, compile_cache_dir

    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = compile_cache_dir()
    assert path == tmp_path / "cache" / "fundamentallm" / "torch-compile" and path.is_dir()
    assert os.environ[COMPILE_CACHE_ENV] == str(path)  # inherited by trials and torchrun's ranks
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"  # a directory the user chose stays


@pytest.mark.parametrize(
    ("unit", "batch", "muon_lr", "momentum", "activation", "calibration"),
    [
        ("amx", 64, 0.04, 0.9, "gelu_exact", 0.02),
        ("avx512_bf16", 32, 0.03, 0.95, "gelu_exact", 0.0),
        ("", 32, 0.03, 0.95, "gelu_exact", 0.0),
    ],
)
def test_cpu_quick_takes_the_settings_measured_best_for_this_cpu_class(
    monkeypatch, unit, batch, muon_lr, momentum, activation, calibration
):
    """Batch 32 with Muon at 0.03 trained better in 2 minutes than 16 with 0.02 on AVX2 (fp32) and on
    AVX-512 BF16 CPUs (benchmarks/RESULTS.md): Muon's iterations, a fixed cost per step, are shared by
    twice the tokens. With AMX, where a step costs less still, batch 64 with Muon at 0.04 (and, with fewer
    steps, less of Muon's momentum, and the output temperature fitted on held-out text). The exact GELU
    everywhere: the faster form in bf16 and in fp32."""
    monkeypatch.setattr(runtime, "cpu_bf16_unit", lambda: unit)
    config = preset("cpu-quick")
    train = config.train
    assert (train.batch_size, train.muon_lr, train.muon_momentum, config.model.activation, train.calibration) == (
        batch,
        muon_lr,
        momentum,
        activation,
        calibration,
    )
    # The rest is one preset: shape, budget, optimizer.
    assert (config.model.n_layer, config.model.d_model, config.model.context_length) == (3, 160, 64)
    assert (config.train.time_budget_s, config.train.optimizer, config.train.lr) == (120.0, "muon", 6e-3)
    # What `fundamentallm config` lists as the preset's defaults is what a run on this CPU gets.
    rows = json.loads(CliRunner().invoke(app, ["config", "--json", "--preset", "cpu-quick"]).output)
    listed = {row["setting"]: row["default"] for row in rows if row["command"] == "train"}
    names = ("batch_size", "muon_lr", "muon_momentum")
    assert [listed[f"train.{name}"] for name in names] == [batch, muon_lr, momentum]
    assert listed["model.activation"] == activation


@pytest.mark.parametrize(
    ("unit", "dropout", "activation", "compiled", "context", "muon_lr", "late", "calibration"),
    [
        ("amx", 0.05, "gelu_exact", False, 256, 0.03, 0.3, 0.02),
        ("avx512_bf16", 0.05, "gelu", True, 128, 0.02, 0.0, 0.0),
        ("", 0.0, "gelu_exact", True, 128, 0.02, 0.0, 0.0),
    ],
)
def test_cpu_small_takes_the_settings_measured_best_for_this_cpu_class(
    monkeypatch, unit, dropout, activation, compiled, context, muon_lr, late, calibration
):
    """Where bf16 is in hardware 15 minutes see the text many times over and the model overfits without
    dropout; on AVX2 CPUs it sees it a few times and trains without. With AMX the eager step with dropout
    and the exact GELU is faster than the compiled one, and longer windows (4,096 tokens a step like the
    others, in 16 rows of 256) at a higher Muon rate train better in the 15 minutes, and the first 30% of the
    time without dropout (faster steps, the same or a lower loss), and the output temperature fitted on the
    first 2% of the training split, held out (the model is overconfident on new text; benchmarks/RESULTS.md)."""
    monkeypatch.setattr(runtime, "cpu_bf16_unit", lambda: unit)
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: bool(unit))
    config = preset("cpu-small")
    assert (config.model.dropout, config.model.activation, config.train.compile) == (dropout, activation, compiled)
    assert (config.model.context_length, config.train.muon_lr, config.train.late_dropout) == (context, muon_lr, late)
    assert (config.model.n_layer, config.model.d_model, config.train.time_budget_s) == (4, 192, 900.0)
    assert config.train.batch_size == 16 and config.train.calibration == calibration
    rows = json.loads(CliRunner().invoke(app, ["config", "--json", "--preset", "cpu-small"]).output)
    listed = {row["setting"]: row["default"] for row in rows if row["command"] == "train"}
    assert (listed["model.activation"], listed["train.compile"]) == (activation, compiled)
    assert (listed["model.context_length"], listed["train.late_dropout"]) == (context, late)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:7"])
def test_an_absent_gpu_is_named_in_a_clear_error(monkeypatch, name):
    from fundamentallm.errors import ConfigError
    from fundamentallm.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"device '{name}' was asked for, but PyTorch sees no CUDA GPU"):
        resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if name == "cuda:7":
        with pytest.raises(ConfigError, match="device 'cuda:7' was asked for, but PyTorch sees 1 CUDA GPU"):
            resolve_device(name)
    else:
        assert resolve_device(name).type == "cuda"


_FAULTS = """
import resource, sys, torch
from fundamentallm import runtime
if sys.argv[1] == "reused":
    assert runtime.reuse_freed_memory()
for _ in range(12):  # 64 MiB each: above glibc's mmap threshold; written, then freed
    torch.empty(16 * 2**20).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(16 * 2**20).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned"
)
def test_big_tensors_reuse_freed_memory_instead_of_fresh_pages_from_the_kernel():
    # By default each 64 MiB tensor comes from fresh pages (16,384 page faults each); reused, once the
    # heap has grown to the pattern (the first few allocations still grow it), none.
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(run.stdout)

    default, reused = faults("default"), faults("reused")
    assert default > 5 * 16_384 // 2
    assert reused < default // 20


def test_training_on_a_cpu_reuses_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(True))
    runtime.configure_backends(CPU)  # what the trainer calls before it builds the model
    assert calls == [True]
    runtime.configure_backends(torch.device("meta"))
    assert calls == [True]
