"""Kernels in C for bf16 work on a CPU that eager PyTorch does in several passes where one would do
(`fundamentallm/csrc/kernels.c`): attention's softmax and dropout (used by `model._SlicedAttention`),
dropout of a tensor, added to the residual stream or not (`model.add_dropout`, `model.dropout`), and,
where the CPU has AMX tile units (Intel Xeons since Sapphire Rapids), causal attention whole, its products
on the tiles (`Kernels.attention`, used by `model._AmxAttention`).

The kernels are AVX-512 code, used where PyTorch runs its own operators in AVX-512 (Intel Xeons since
Skylake-SP, AMD since Zen 4; every CPU with hardware bf16 so far). The source is compiled on first use
with the machine's C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`) into native/ of the
project's cache directory (`cache_dir`), keyed by the source, the flags, the compiler and the CPU, and
loaded with ctypes; later processes load the cached library (a build takes under a second). Below
AVX-512, without a compiler, where the build fails or with `FUNDAMENTALLM_NATIVE=0`,
`kernels()` is None (the reason logged once) and the model does the same work with PyTorch's
operators. The library's OpenMP loops run on the OpenMP runtime PyTorch has loaded (both name it
libgomp.so.1), with PyTorch's thread count."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "FUNDAMENTALLM_NATIVE"
SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_SHORT = 16  # hex digits of the build key in the library's name
MAX_KEYS = 8192  # the longest row of scores the kernels take (MAX_COLS in the source)
MAX_ELEMENTS = 2**32 - 1  # the most elements the dropout kernels take (their indices are 32-bit)
MAX_HEAD_DIM = 256  # the most dims per head `Kernels.attention` takes (ATTENTION_MAX_D in the source)
MAX_POSITIONS = 2048  # the most positions it takes (ATTENTION_MAX_T)


class Kernels:
    """The compiled kernels. Attention's tiles are (b, t, cols) bf16 tensors, one piece, on the CPU: b
    blocks of t queries, the first at position `start`, against keys 0..cols-1, causally (query start + i
    sees keys up to start + i; its weights beyond are written 0). Dropout takes bf16 tensors of any shape,
    one piece, on the CPU."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        i64, u32, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p
        self._forward = _bind(
            library,
            "fundamentallm_softmax_dropout",
            ctypes.c_int,
            [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, u32, u32, ctypes.c_int],
        )
        self._backward = _bind(
            library,
            "fundamentallm_softmax_dropout_backward",
            ctypes.c_int,
            [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int],
        )
        self._keep_byte = _bind(library, "fundamentallm_keep_byte", ctypes.c_uint32, [u32, u32, u32])
        self._dropout = _bind(
            library,
            "fundamentallm_dropout",
            ctypes.c_int,
            [ptr, ptr, ptr, ptr, i64, ctypes.c_int, ctypes.c_float, u32, u32, ctypes.c_int],
        )
        self._dropout_backward = _bind(
            library, "fundamentallm_dropout_backward", ctypes.c_int, [ptr, ptr, ptr, i64, ctypes.c_float, ctypes.c_int]
        )
        flt = ctypes.c_float
        self._attention = _bind(
            library,
            "fundamentallm_attention",
            ctypes.c_int,
            [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, flt, u32, u32, ctypes.c_int],
        )
        self._attention_backward = _bind(
            library,
            "fundamentallm_attention_backward",
            ctypes.c_int,
            [ptr] * 14 + [ctypes.c_int, flt, u32, u32, ctypes.c_int],
        )
        self._attention_keep = _bind(
            library, "fundamentallm_attention_keep", ctypes.c_uint32, [i64, i64, i64, u32, u32]
        )
        # Whether the tile units (AMX) are there and this process may use them (asked of Linux once).
        self.amx = bool(_bind(library, "fundamentallm_amx", ctypes.c_int, [])())

    def softmax_dropout(
        self, scores: torch.Tensor, start: int, dropout: tuple[int, int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal softmax of `scores`, in place (returned as the weights), and the weights after dropout:
        `dropout` = (threshold, seed1, seed2) keeps an element where its keep byte (`keep_byte`) is at least
        the threshold (the kept weights unscaled: 1 / (1 - p) is the caller's), a new tensor; without
        dropout (None) the weights themselves."""
        _check(scores, "attention", dims=3)
        b, t, cols = scores.shape
        dropped = torch.empty_like(scores) if dropout else scores
        threshold, seed1, seed2 = dropout or (0, 0, 0)
        status = self._forward(
            scores.data_ptr(),
            scores.data_ptr(),
            dropped.data_ptr() if dropout else None,
            b * t,
            t,
            cols,
            start,
            threshold,
            seed1,
            seed2,
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(f"attention kernel: rows of {cols} keys are longer than it handles")
        return scores, dropped

    def softmax_dropout_backward(
        self, grad: torch.Tensor, weights: torch.Tensor, dropped: torch.Tensor, start: int
    ) -> torch.Tensor:
        """The scores' gradient from `grad`, the gradient of the dropped weights, in place: e - w sum(e) per
        row with e = grad x dropped (the softmax's backward pass of what dropout let through). Without
        dropout `dropped` is `weights`."""
        for tile in (grad, weights, dropped):
            _check(tile, "attention", dims=3)
        if not grad.shape == weights.shape == dropped.shape:
            raise ValueError(f"attention kernel: tiles {grad.shape}, {weights.shape}, {dropped.shape} differ")
        b, t, cols = grad.shape
        status = self._backward(
            grad.data_ptr(), weights.data_ptr(), dropped.data_ptr(), b * t, t, cols, start, torch.get_num_threads()
        )
        if status:
            raise ValueError(f"attention kernel: rows of {cols} keys are longer than it handles")
        return grad

    def keep_byte(self, index: int, seed1: int, seed2: int) -> int:
        """The byte that keeps element `index` (r x cols + j of its tile, or the element's place in the
        tensor `dropout` drops from) if at least dropout's threshold."""
        return self._keep_byte(index, seed1, seed2)

    def dropout(
        self, h: torch.Tensor, dropout: tuple[int, int, int], scale: float, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`h` with dropout, scaled, plus `x` if given, in one pass: x + h x keep x scale, where
        `dropout` = (threshold, seed1, seed2) keeps element i (its place in h) if its keep byte
        (`keep_byte`) is at least the threshold. Returns the result (new) and which elements were kept, one
        bit per element (int16 words: bit l of word w is element 16 w + l), for `dropout_backward`."""
        _check(h, "dropout")
        if x is not None:
            _check(x, "dropout")
            if x.shape != h.shape:
                raise ValueError(f"dropout kernel: x {tuple(x.shape)} and h {tuple(h.shape)} differ")
        n = h.numel()
        out = torch.empty_like(h)
        bits = torch.empty((n + 15) // 16, dtype=torch.int16)
        threshold, seed1, seed2 = dropout
        status = self._dropout(
            None if x is None else x.data_ptr(),
            h.data_ptr(),
            out.data_ptr(),
            bits.data_ptr(),
            n,
            threshold,
            scale,
            seed1,
            seed2,
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(f"dropout kernel: {n} elements are more than it handles ({MAX_ELEMENTS})")
        return out, bits

    def dropout_backward(self, grad: torch.Tensor, bits: torch.Tensor, scale: float) -> torch.Tensor:
        """The gradient of `dropout`'s h from `grad`, the gradient of its result: grad x keep x scale, the
        kept elements read from `bits` (as `dropout` returned them)."""
        _check(grad, "dropout")
        n = grad.numel()
        if bits.dtype != torch.int16 or not bits.is_contiguous() or bits.numel() != (n + 15) // 16:
            raise ValueError(f"dropout kernel: {bits.numel()} {bits.dtype} words are not the bits of {n} elements")
        out = torch.empty_like(grad)
        status = self._dropout_backward(
            grad.data_ptr(), bits.data_ptr(), out.data_ptr(), n, scale, torch.get_num_threads()
        )
        if status:
            raise ValueError(f"dropout kernel: {n} elements are more than it handles ({MAX_ELEMENTS})")
        return out

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dropout: tuple[int, int, int] | None,
        scale: float,
        keep_stats: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal softmax(Q K^T / sqrt(D)) V on the tile units (AMX), for q, k, v (B, H, T, D) bf16 CPU
        tensors with their dims one apart (views of one qkv product do), T a multiple of 32 and D even, at
        most 256 (`attention_fits`). `dropout` = (threshold, seed1, seed2) keeps weight (b x H + h, t, j) where
        `attention_keep` is at least the threshold, the kept weights times `scale`; None: no dropout. Returns
        the output (B, H, T, D), the view of a (B, T, H, D) tensor, and with `keep_stats` what the backward
        pass needs ((B x H, T, 2) fp32: each row's largest scaled score and 1 / its sum of exponentials)."""
        B, H, T, D = _check_heads(q, k, v)
        out = torch.empty(B, T, H, D, dtype=q.dtype)
        stats = torch.empty(B * H, T, 2, dtype=torch.float32) if keep_stats else None
        threshold, seed1, seed2 = dropout or (0, 0, 0)
        status = self._attention(
            *_addresses(q, k, v),
            _longs(B, H, T, D),
            *_strides(q, k, v),
            out.data_ptr(),
            None if stats is None else stats.data_ptr(),
            threshold,
            scale,
            seed1,
            seed2,
            torch.get_num_threads(),
        )
        _attention_status(status)
        return out.transpose(1, 2), stats

    def attention_backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grad: torch.Tensor,
        stats: torch.Tensor,
        dropout: tuple[int, int, int] | None,
        scale: float,
    ) -> torch.Tensor:
        """The gradients of `attention`'s q, k and v from `grad`, its output's gradient (B, H, T, D), and the
        stats it kept (the same q, k, v, dropout and scale): one (B, T, 3, H, D) tensor, q's, k's and v's side
        by side as the qkv product lays them out."""
        B, H, T, D = _check_heads(q, k, v, grad)
        if stats.dtype != torch.float32 or not stats.is_contiguous() or stats.shape != (B * H, T, 2):
            raise ValueError(
                f"attention kernel: stats {stats.dtype} {tuple(stats.shape)} are not ({B * H}, {T}, 2) fp32"
            )
        dqkv = torch.empty(B, T, 3, H, D, dtype=q.dtype)
        threshold, seed1, seed2 = dropout or (0, 0, 0)
        status = self._attention_backward(
            *_addresses(q, k, v, grad),
            _longs(B, H, T, D),
            *_strides(q, k, v, grad),
            stats.data_ptr(),
            *_addresses(*(dqkv[:, :, i] for i in range(3))),
            _longs(T * 3 * H * D, D, 3 * H * D),  # each of the three: (batch, head, position) in (B, T, 3, H, D)
            threshold,
            scale,
            seed1,
            seed2,
            torch.get_num_threads(),
        )
        _attention_status(status)
        return dqkv

    def attention_keep(self, row: int, key: int, T: int, seed1: int, seed2: int) -> int:
        """The keep byte of weight `key` of attention row `row` (= (b x H + h) x T + query) of `attention`'s
        dropout with T positions: each 32-bit hash gives four consecutive weights their bytes."""
        return self._attention_keep(row, key, T, seed1, seed2)


def attention_fits(q: torch.Tensor) -> bool:
    """Whether `Kernels.attention` takes queries (B, H, T, D) of this shape."""
    T, D = q.shape[-2:]
    return T % 32 == 0 and 0 < T <= MAX_POSITIONS and D % 2 == 0 and 0 < D <= MAX_HEAD_DIM


def _check_heads(*tensors: torch.Tensor) -> tuple[int, int, int, int]:
    shape = tensors[0].shape
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 4 or t.stride(-1) != 1:
            raise ValueError(
                f"attention kernel: q, k, v and the gradient must be (B, H, T, D) bf16 CPU tensors with their "
                f"dims one apart, not {t.dtype} {tuple(t.shape)} (strides {t.stride()}) on {t.device}"
            )
        if t.shape != shape:
            raise ValueError(f"attention kernel: shapes {tuple(shape)} and {tuple(t.shape)} differ")
    if not attention_fits(tensors[0]):
        raise ValueError(
            f"attention kernel: {shape[2]} positions and {shape[3]} dims per head: it takes a multiple of 32 "
            f"positions (at most {MAX_POSITIONS}) and an even number of dims, at most {MAX_HEAD_DIM}"
        )
    return tuple(shape)  # type: ignore[return-value]


def _longs(*values: int) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _addresses(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _strides(*heads: torch.Tensor) -> list[ctypes.Array]:
    """Each (B, H, T, D) tensor's strides for batch, head and position, as the kernels take them."""
    return [_longs(*t.stride()[:3]) for t in heads]


def _attention_status(status: int) -> None:
    if status == -2:
        raise ValueError("attention kernel: this CPU or process cannot use the tile units (AMX)")
    if status == -3:
        raise MemoryError("attention kernel: out of memory for its per-thread buffers")
    if status:
        raise ValueError(f"attention kernel: refused the shape (status {status})")


def _bind(library: ctypes.CDLL, name: str, restype: object, argtypes: list) -> ctypes._CFuncPtr:
    function = getattr(library, name)
    function.restype, function.argtypes = restype, argtypes
    return function


def _check(t: torch.Tensor, kernel: str, dims: int | None = None) -> None:
    """Refuse what the kernels cannot take, saying why: a bf16 CPU tensor in one piece (a tile: 3-d)."""
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() or (dims and t.dim() != dims):
        what = f"a tile must be a contiguous {dims}-d" if dims else "a tensor must be a contiguous"
        raise ValueError(
            f"{kernel} kernel: {what} bf16 CPU tensor, not {t.dtype} {tuple(t.shape)} on {t.device}"
            f"{'' if t.is_contiguous() else ' (not contiguous)'}"
        )


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def cpu_runs_avx512() -> bool:
    """Whether PyTorch runs its own CPU operators in AVX-512 here (`ATEN_CPU_CAPABILITY` can hold it lower)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU has the AMX tile units with bf16 products (Linux's flags amx_tile and amx_bf16)."""
    flags = _cpu_flags().split()
    return b"amx_tile" in flags and b"amx_bf16" in flags


@functools.cache
def kernels() -> Kernels | None:
    """The kernels, built on first use (once per process); None where they are not used here or cannot be
    built (why is logged once)."""
    if not enabled():
        log.info("%s=0: attention's softmax and the dropouts run as PyTorch operators", ENV)
        return None
    if not cpu_runs_avx512():
        log.info(
            "attention's softmax and the dropouts run as PyTorch operators: the C kernels are "
            "AVX-512 code, and PyTorch runs this CPU at %s",
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    try:
        path = _build(SOURCE, FLAGS)
        return Kernels(ctypes.CDLL(str(path)), path)
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        log.warning(
            "attention's softmax and the dropouts run as PyTorch operators (slower): the C kernels "
            "of %s could not be built or loaded (%s); set %s=0 to say so deliberately",
            SOURCE.name,
            _reason(error),
            ENV,
        )
        return None


def _reason(error: BaseException) -> str:
    if isinstance(error, subprocess.CalledProcessError):  # the compiler's first line naming an error, else its first
        lines = [line.strip() for line in (error.stderr or "").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return f"{error.cmd[0]} failed: {(errors or lines or [f'exit {error.returncode}'])[0]}"
    return str(error)


def _build(source: Path, flags: tuple[str, ...]) -> Path:
    """The shared library built from `source`, from the cache when a build with the same key is there."""
    compiler = os.environ.get("CC") or "cc"
    text = source.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode(), _cpu_flags()])).hexdigest()
    directory = cache_dir()
    path = directory / f"{source.stem}-{key[:_SHORT]}.so"
    if path.exists():
        return path
    started = time.monotonic()
    # Built under a name of its own and renamed into place: processes building at once (a sweep's trials,
    # torchrun's ranks) each get a whole library.
    with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.stem}-", suffix=".so", delete=False) as part:
        partial = Path(part.name)
    try:
        subprocess.run(
            [compiler, *flags, "-o", str(partial), str(source)], capture_output=True, text=True, check=True, timeout=300
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("built %s in %.1f s (%s)", path, time.monotonic() - started, compiler)
    return path


def _cpu_flags() -> bytes:
    """What -march=native builds for: the CPU's model and flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor().encode() or platform.machine().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted})).encode()


def cache_dir() -> Path:
    """Where built libraries are kept: native/ in the project's cache on this machine
    (`storage.local_cache_dir`: ~/.cache/fundamentallm by default); a directory in the temporary directory
    where that cannot be made."""
    from fundamentallm.storage import local_cache_dir

    user = getattr(os, "getuid", lambda: 0)()
    for directory in (local_cache_dir() / "native", Path(tempfile.gettempdir()) / f"fundamentallm-native-{user}"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise OSError("no writable directory for built kernels")
