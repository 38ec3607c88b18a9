"""Devices, precision and reproducibility helpers for PyTorch."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    from fundamentallm.errors import ConfigError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but PyTorch sees no CUDA GPU")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} was asked for, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' was asked for, but it is not available")
    return torch.device(name)


def cpu_bf16_unit() -> str:
    """What multiplies bf16 matrices in hardware on this CPU: "amx" (Intel's AMX tiles), "avx512_bf16"
    (AVX-512 BF16 instructions without AMX, e.g. AMD Zen 4), or "" (none: PyTorch emulates bf16).

    The presets differ between the two kinds: on the AMX Xeon measured, a bf16 matrix product ran
    several times faster than on the AVX-512 BF16 EPYC, which moves the best batch size."""
    cpu = getattr(torch, "cpu", None)
    for probe, unit in (("_is_amx_tile_supported", "amx"), ("_is_avx512_bf16_supported", "avx512_bf16")):
        check = getattr(cpu, probe, None)
        if check is not None:
            with contextlib.suppress(Exception):
                if check():
                    return unit
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text().split()
        for flag, unit in (("amx_bf16", "amx"), ("avx512_bf16", "avx512_bf16")):
            if flag in flags:
                return unit
    return ""


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16).

    Without them PyTorch emulates bf16 products, which is far slower than fp32 (measured on
    an AVX2-only EPYC: 0.8 against 83 GFLOP/s), so autocast must stay off.
    """
    return bool(cpu_bf16_unit())


@dataclass(frozen=True)
class Precision:
    """How matrices are multiplied: `dtype` is the autocast type, or None for plain fp32."""

    name: str
    dtype: torch.dtype | None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    from fundamentallm.errors import ConfigError

    if name == "fp32":
        return Precision("fp32", None)
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("bf16 was asked for, but this GPU does not support it")
        return Precision("bf16", torch.bfloat16)
    # auto
    if device.type == "cuda":
        return Precision("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else Precision("fp32", None)
    if device.type == "cpu" and cpu_has_fast_bf16():
        return Precision("bf16", torch.bfloat16)
    return Precision("fp32", None)


def configure_backends(device: torch.device, threads: int = 0) -> None:
    """TF32 on CUDA (much faster, precision ample for training); CPU thread count when given; on a
    CPU, freed memory kept for the next step's tensors (`reuse_freed_memory`)."""
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        reuse_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# mallopt(3) parameter numbers (glibc's malloc.h), and the trim threshold's value that turns trimming off
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = -1


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for later allocations instead of returning it to the kernel;
    True where it did (Linux with glibc), False elsewhere (nothing changed).

    PyTorch allocates CPU tensors with malloc, and glibc serves every request above its mmap threshold
    (128 KiB, rising to at most 32 MiB) with fresh pages from the kernel and hands them back on free,
    so each big activation of each training step (a 64 x 256 x 1536 bf16 MLP activation is 48 MiB) is
    faulted in and zeroed page by page again: large elementwise operations ran at a third of their
    speed (`F.gelu` on 25M bf16 elements 19.4 -> 5.1 ms, a multiplication 20.0 -> 6.1 ms). With mmap
    off and trimming off, freed blocks are reused from the heap. Training on an AMX Xeon, against the
    same code without it: 6 x 384 bf16 1.14-1.16x the tokens/s (and 1.03x more for trimming off rather
    than at 1 GiB), cpu-quick 1.13-1.26x (1,935-2,117 steps in 2 minutes against 1,523-1,572),
    cpu-small 1.10-1.17x, fp32 1.0-1.04x; peak memory the same (benchmarks/RESULTS.md, "The AMX
    Xeon, 2026-12-05 (day)"). The heap grows to the pattern of sizes the process allocates (a
    loop of one 64 MiB tensor settles at about 600 MiB) and does not shrink: the setting is the
    whole process's, for the rest of its life, which suits a process that trains."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    if not done:
        log.debug("mallopt refused: freed memory goes back to the kernel as before")
    return done


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing the global torch RNG (evaluation inside training)."""
    state = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path | None:
    """Where `torch.compile` keeps compiled code between runs, made the default for this process and
    the processes it starts (trials, torchrun's ranks) unless `TORCHINDUCTOR_CACHE_DIR` says otherwise
    (None: no such directory could be made, PyTorch's default stays).

    PyTorch's own default is a directory in /tmp, which a reboot or a tmp cleaner empties; then
    every run compiles again (cpu-small's first steps: about 2 minutes on a busy 2-core CPU instead of
    40 s with the cache warm; benchmarks/RESULTS.md). The user's cache directory keeps it.
    """
    import os

    if os.environ.get(COMPILE_CACHE_ENV):
        return Path(os.environ[COMPILE_CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "fundamentallm" / "torch-compile"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: PyTorch's default stays (None)
        return None
    os.environ[COMPILE_CACHE_ENV] = str(path)
    return path
