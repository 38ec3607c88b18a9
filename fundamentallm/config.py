"""Typed, frozen configuration.

Each component has its own frozen dataclass; every field carries a `help` text and a
default that works out of the box. Construction checks types and ranges, and
`from_dict` refuses keys it does not know, so a typo fails before any work starts.
Configs turn into plain JSON-able dicts (`to_dict`) and hash canonically (`digest`),
which is what names content-addressed output directories.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Self

from fundamentallm.errors import ConfigError
from fundamentallm.fsutil import sha256_json


def setting(default: Any, help: str) -> Any:
    """A dataclass field with a default and a description (shown by `--help` and docs)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; return it, converted where lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches no allowed type")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{where} must be a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where} must have {len(args)} items; got {len(value)}")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value, strict=False)))
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return tp.from_dict(value, where=where)
        raise ConfigError(f"{where} must be a table of settings; got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number; got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer; got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where} must be a {_type_name(tp)}; got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


class Config:
    """Base for frozen config dataclasses: type checks, `from_dict`, `to_dict`, `digest`.

    Subclasses are `@dataclass(frozen=True)` and may override `check()` to add range and
    consistency rules, raising `ConfigError`. `moved` names settings that were removed, with
    what to do instead, so an old settings file fails with that hint.
    """

    moved: typing.ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            checked = _check_value(value, hints[f.name], f"{type(self).__name__}.{f.name}")
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.check()

    def check(self) -> None:
        """Range and consistency rules beyond types; raise `ConfigError`."""

    def _fail(self, name: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{type(self).__name__}.{name} {message}; got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None) -> Self:
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a table of settings; got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        for key in unknown:
            if key in cls.moved:
                raise ConfigError(f"setting {where}.{key} was removed: {cls.moved[key]}")
        if unknown:
            raise ConfigError(
                f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {where}; "
                f"known: {', '.join(sorted(known))}"
            )
        hints = typing.get_type_hints(cls)
        values = {key: _check_value(value, hints[key], f"{where}.{key}") for key, value in data.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); `from_dict` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]

    def digest(self) -> str:
        """sha256 of the canonical JSON form."""
        return sha256_json(self.to_dict())

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def with_overrides(self, overrides: Mapping[str, Any]) -> Self:
        """Apply dotted-key overrides such as ``{"encode.shard_tokens": 4096}``."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = data
            for i, part in enumerate(parents):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown setting {'.'.join(parents[: i + 1])} in {dotted!r}")
                node = node[part]
            if leaf not in node:
                owner = self._setting_class(parents)
                if owner is not None and leaf in owner.moved:
                    raise ConfigError(f"setting {dotted!r} was removed: {owner.moved[leaf]}")
                raise ConfigError(f"unknown setting {dotted!r}")
            node[leaf] = value
        return type(self).from_dict(data)

    @classmethod
    def _setting_class(cls, path: list[str]) -> type[Config] | None:
        """The config class of the table at dotted `path` below this one (None if there is none)."""
        owner: Any = cls
        for part in path:
            hints = typing.get_type_hints(owner)
            owner = hints.get(part)
            if not (isinstance(owner, type) and issubclass(owner, Config)):
                return None
        return owner

    @classmethod
    def describe(cls, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
        """Yield (dotted name, type, default, help) for every leaf setting."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            tp = hints[f.name]
            if isinstance(tp, type) and issubclass(tp, Config):
                yield from tp.describe(f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                yield f"{prefix}{f.name}", _type_name(tp), default, f.metadata.get("help", "")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a settings table from a .json or .toml file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8")) if path.suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return data


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-key form of a nested settings table, the form `Config.with_overrides` and
    ``--set`` take: ``{"model": {"n_layer": 4}}`` becomes ``{"model.n_layer": 4}``.

    Every value that is not a mapping (lists included) is a leaf; an empty table adds no key.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the command line; the value is JSON when it parses, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, e.g. encode.shard_tokens=65536")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def differences(old: Config, new: Config, prefix: str = "", ignore: Collection[str] = ()) -> list[str]:
    """``name old -> new`` (values as repr) for each setting of `old` that `new` (the same config
    class) has changed, in field order, `ignore`d names left out: how an error that refuses a
    changed setting names it, e.g. ``model.d_model 160 -> 192``. Nested tables compare whole."""
    return [
        f"{prefix}{f.name} {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in dataclasses.fields(old)  # type: ignore[arg-type]
        if f.name not in ignore and getattr(old, f.name) != getattr(new, f.name)
    ]


DEFAULT_CONTEXT_LENGTH = 256
"""The context `fundamentallm prepare` makes data for when not told: the largest preset's (shakespeare-gpu)."""


def min_split_tokens(context_length: int) -> int:
    """Fewest tokens a split needs for a model of `context_length`: one window of context + 1
    (inputs and their next-character targets). Validation, encoding and training all use this rule."""
    if context_length < 1:
        raise ConfigError(f"context_length must be at least 1; got {context_length}")
    return context_length + 1


# Data stage ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IngestConfig(Config):
    sources: tuple[str, ...] = setting(
        ("default",),
        "Corpus sources: file or directory paths, http(s) URLs (optionally with #sha256=<hex>), "
        "or built-in corpus names (default, tinyshakespeare, enwik8).",
    )
    include: tuple[str, ...] = setting(
        ("*",), "Glob patterns a file inside a source directory must match (path relative to it, or name)."
    )
    exclude: tuple[str, ...] = setting(
        (".*",), "Glob patterns for files and directories to leave out of source directories (hidden ones by default)."
    )
    encoding_policy: Literal["strict", "replace", "fallback"] = setting(
        "strict",
        "Invalid UTF-8: 'strict' stops with the file and byte offset, 'replace' substitutes U+FFFD, "
        "'fallback' decodes the file as Windows-1252/Latin-1 instead.",
    )
    max_binary_control_share: float = setting(
        0.10, "A file whose share of control bytes exceeds this is treated as binary and skipped."
    )
    max_file_bytes: int = setting(1 << 30, "Largest single file accepted, in bytes.")
    part_bytes: int = setting(
        1 << 23,
        "A file larger than this is read, normalised and stored in parts of about this many bytes (consecutive "
        "rows of the documents table), so memory stays bounded whatever the file's size; the text, its id and "
        "the encoded dataset are the same whatever the part size.",
    )
    cache_dir: str = setting(
        "",
        "Download cache directory, or an fsspec URL (s3://bucket/cache); empty means $FUNDAMENTALLM_CACHE_DIR "
        "or ~/.cache/fundamentallm.",
    )
    max_download_bytes: int = setting(1 << 30, "Largest download accepted, in bytes.")
    download_timeout_s: float = setting(60.0, "Network timeout for one download, in seconds.")

    def check(self) -> None:
        if not self.sources:
            self._fail("sources", "must name at least one source")
        if not 0.0 < self.max_binary_control_share <= 1.0:
            self._fail("max_binary_control_share", "must be in (0, 1]")
        if not 0 < self.max_file_bytes < 1 << 31:
            self._fail("max_file_bytes", "must be positive and below 2 GiB (one Parquet value)")
        if not 1 << 10 <= self.part_bytes <= 1 << 30:
            self._fail("part_bytes", "must be between 1 KiB and 1 GiB")
        if self.max_download_bytes <= 0:
            self._fail("max_download_bytes", "must be positive")
        if self.download_timeout_s <= 0:
            self._fail("download_timeout_s", "must be positive")


@dataclasses.dataclass(frozen=True)
class ValidationConfig(Config):
    """Expectations the documents table must meet. How many characters each split needs is not
    a setting here: it follows from the model's context (`min_split_tokens`), which `prepare`
    takes as --context-length and the pipeline from the model it trains."""

    moved: typing.ClassVar[dict[str, str]] = {
        "context_length": "the context the data must support is given to `fundamentallm prepare` as --context-length, "
        "and the pipeline takes it from the model it trains",
    }

    min_documents: int = setting(1, "Fewest documents accepted.")
    min_document_chars: int = setting(1, "Fewest characters in any one document.")
    min_charset_size: int = setting(2, "Fewest distinct characters in the corpus.")
    max_charset_size: int = setting(
        4096, "Most distinct characters in the corpus; more usually means mis-decoded or binary input."
    )
    max_control_share: float = setting(
        0.01, "Largest share of control characters (other than tab, newline, form feed) in any document."
    )
    max_replacement_share: float = setting(
        0.001, "Largest share of U+FFFD replacement characters (decoding damage) in any document."
    )
    max_duplicate_share: float = setting(0.5, "Largest share of documents that may be dropped as exact duplicates.")

    def check(self) -> None:
        for name in ("min_documents", "min_document_chars", "min_charset_size"):
            if getattr(self, name) < 1:
                self._fail(name, "must be at least 1")
        if self.max_charset_size < self.min_charset_size:
            self._fail("max_charset_size", "must be at least min_charset_size")
        for name in ("max_control_share", "max_replacement_share", "max_duplicate_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                self._fail(name, "must be in [0, 1]")


SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class EncodeConfig(Config):
    split: Literal["contiguous", "hash", "bytes"] = setting(
        "contiguous",
        "'contiguous': the corpus in order, first train_fraction of characters to train, then val, then test "
        "(the classic Tiny Shakespeare split); 'hash': each whole document to a split by a hash of its id; "
        "'bytes': the corpus in order, cut at UTF-8 byte offsets train_bytes and train_bytes + val_bytes, each "
        "moved to the first character starting at or after it (the standard enwik8 split: 90M, 5M, the rest).",
    )
    train_fraction: float = setting(0.9, "Share of the corpus for training.")
    val_fraction: float = setting(0.05, "Share of the corpus for validation (must be positive).")
    test_fraction: float = setting(0.05, "Share of the corpus for the final test (may be 0).")
    train_bytes: int = setting(
        90_000_000, "The 'bytes' split: UTF-8 bytes of the corpus stream for training (enwik8: 90,000,000)."
    )
    val_bytes: int = setting(
        5_000_000, "The 'bytes' split: UTF-8 bytes after the training ones for validation; the rest is the test."
    )
    hash_salt: str = setting("", "Salt mixed into the document hash of the 'hash' split, to draw another split.")
    document_separator: str = setting("\n\n", "Text placed between consecutive documents of a split.")
    shard_tokens: int = setting(1 << 24, "Tokens per Parquet shard (the last shard of a split may hold fewer).")
    compression_level: int = setting(1, "zstd compression level of the shards (1 fastest .. 22 smallest).")
    workers: int = setting(
        1,
        "Processes encoding shards in the pipeline flow: 1 encodes in the flow's process; more maps the shards "
        "over a local Dask cluster of that many single-threaded workers. Same output, same dataset id.",
    )

    def check(self) -> None:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-9:
            raise ConfigError(
                "EncodeConfig split fractions must add up to 1; got "
                f"train {self.train_fraction} + val {self.val_fraction} + test {self.test_fraction} = {total:g}"
            )
        if self.train_fraction <= 0:
            self._fail("train_fraction", "must be positive")
        if self.val_fraction <= 0:
            self._fail("val_fraction", "must be positive")
        if self.test_fraction < 0:
            self._fail("test_fraction", "must not be negative")
        if self.train_bytes < 1:
            self._fail("train_bytes", "must be at least 1")
        if self.val_bytes < 1:
            self._fail("val_bytes", "must be at least 1")
        if self.shard_tokens < 1:
            self._fail("shard_tokens", "must be at least 1")
        if not 1 <= self.compression_level <= 22:
            self._fail("compression_level", "must be in 1..22")
        if self.workers < 1:
            self._fail("workers", "must be at least 1")

    def fractions(self) -> dict[str, float]:
        return {"train": self.train_fraction, "val": self.val_fraction, "test": self.test_fraction}


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    ingest: IngestConfig = setting(IngestConfig(), "Where the corpus comes from and how files are read.")
    validation: ValidationConfig = setting(ValidationConfig(), "Expectations the documents table must meet.")
    encode: EncodeConfig = setting(EncodeConfig(), "Vocabulary, splits and Parquet shards.")


# Model and training -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    vocab_size: int = setting(0, "Number of token ids; 0 takes it from the dataset's vocabulary.")
    context_length: int = setting(256, "Longest sequence the model attends over, in characters.")
    n_layer: int = setting(6, "Transformer blocks.")
    n_head: int = setting(6, "Attention heads per block (must divide d_model).")
    d_model: int = setting(384, "Width of the residual stream (embedding size).")
    mlp_ratio: int = setting(4, "Hidden width of each MLP, as a multiple of d_model.")
    dropout: float = setting(
        0.2, "Dropout probability on the embeddings, the attention and MLP outputs and the attention weights."
    )
    attention_dropout: float | None = setting(
        None,
        "Dropout probability on the attention weights (None: dropout's). On a CPU their (B, H, T, T) masks "
        "cost more than all the others, but they regularise most: cpu-small without them trained 1.2x the "
        "tokens/s and ended 0.043 nats/char higher (AMX Xeon).",
    )
    bias: bool = setting(False, "Biases in linear layers and LayerNorm.")
    positions: Literal["learned", "rotary"] = setting("learned", "Learned position embeddings or rotary (RoPE).")
    norm: Literal["layernorm", "rmsnorm"] = setting("layernorm", "Normalisation before attention and MLP.")
    qk_norm: bool = setting(
        False, "RMS-normalise each head's queries and keys (learned gain) before attention: bounded attention logits."
    )
    activation: Literal["gelu", "gelu_exact", "relu2"] = setting(
        "gelu",
        "The MLP's non-linearity: GELU (tanh approximation), exact GELU (erf; on the CPUs measured 2-3x "
        "faster than the tanh form) or ReLU squared.",
    )
    tie_embeddings: bool = setting(
        True, "The output layer is the token embedding's transpose (False: a separate output matrix)."
    )
    value_embeddings: bool = setting(
        False,
        "Value embeddings: each block adds an embedding of the input characters, a table of its own, to its "
        "attention's values (one (V, n_layer x d_model) table, looked up once per forward pass). cpu-small "
        "with them ended 0.012 nats/char higher in 15 minutes at 0.93x the tokens/s (AMX Xeon, one seed).",
    )

    @property
    def weights_dropout(self) -> float:
        """The attention weights' dropout rate: `attention_dropout`, or `dropout` where that is None."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    def check(self) -> None:
        if self.vocab_size < 0:
            self._fail("vocab_size", "must not be negative")
        for name in ("context_length", "n_layer", "n_head", "d_model", "mlp_ratio"):
            if getattr(self, name) < 1:
                self._fail(name, "must be at least 1")
        if self.d_model % self.n_head:
            raise ConfigError(f"ModelConfig.d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.positions == "rotary" and (self.d_model // self.n_head) % 2:
            raise ConfigError("ModelConfig: rotary positions need an even head size (d_model / n_head)")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "must be in [0, 1)")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            self._fail("attention_dropout", "must be in [0, 1) or None")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    batch_size: int = setting(64, "Sequences per micro-batch (the whole batch, shared out when processes > 1).")
    grad_accum: int = setting(1, "Micro-batches per optimizer step (the global batch is batch_size x grad_accum).")
    max_steps: int = setting(5000, "Optimizer steps; with a time budget, an upper bound (0: none).")
    time_budget_s: float = setting(
        0.0,
        "Wall-clock budget in seconds (0: off). The learning-rate schedule then follows elapsed time, "
        "so training ends fully decayed when the budget is spent.",
    )
    lr: float = setting(1e-3, "Peak learning rate.")
    min_lr_ratio: float = setting(0.1, "Learning-rate floor at the end of the schedule, as a fraction of lr.")
    warmup_steps: int = setting(100, "Steps of linear warm-up from 0 to lr.")
    late_dropout: float = setting(
        0.0,
        "Share of the schedule (of the time budget, else of max_steps) trained without dropout: the model's "
        "dropouts (model.dropout, model.attention_dropout) turn on from there ('late dropout', against "
        "overfitting in runs that see the text many times; the early steps, far from overfitting, run faster "
        "without the masks). 0: dropout from the start. cpu-small takes 0.3 on an AMX CPU: there 1.00-1.11x the "
        "tokens/s, 1.3853 nats/char on the mean of five seeds against 1.3904 with dropout throughout "
        "(benchmarks/RESULTS.md).",
    )
    calibration: float = setting(
        0.0,
        "Share of the training split (its first characters) held out of training; when training ends, the "
        "temperature that minimises the loss on it is fitted and folded into the final norm of latest.pt and "
        "best.pt, so their logits come out divided by it (0: none). A model that saw its text many times is "
        "overconfident on new text: cpu-small (AMX) takes 0.02, and ended 0.025-0.028 nats/char lower "
        "(benchmarks/RESULTS.md).",
    )
    schedule: Literal["cosine", "wsd"] = setting(
        "cosine", "After warm-up: cosine decay to the floor, or warmup-stable-decay (constant, then linear decay)."
    )
    decay_fraction: float = setting(0.2, "wsd only: share of training spent decaying to the floor.")
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw",
        "adamw: AdamW for every parameter. muon: Muon (orthogonalised momentum) for the blocks' weight matrices "
        "at muon_lr, AdamW at lr for embeddings and norms.",
    )
    muon_lr: float = setting(0.02, "Peak learning rate of Muon (optimizer = muon).")
    muon_momentum: float = setting(0.95, "Momentum of Muon (optimizer = muon).")
    weight_decay: float = setting(0.1, "Decoupled weight decay (matrices and embeddings only).")
    beta1: float = setting(0.9, "AdamW beta1.")
    beta2: float = setting(0.99, "AdamW beta2.")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this (0: off).")
    eval_interval: int = setting(250, "Steps between evaluations on the fixed validation subset.")
    eval_batches: int = setting(20, "Batches in the fixed validation subset.")
    checkpoint_interval: int = setting(250, "Steps between checkpoints (latest.pt); best.pt follows each evaluation.")
    early_stopping_patience: int = setting(
        0, "Stop after this many evaluations without a better validation loss (0: off)."
    )
    log_interval: int = setting(50, "Steps between progress lines.")
    seed: int = setting(1337, "Seed for initialisation, batches and dropout.")
    init_from: str = setting(
        "",
        "Checkpoint file or fsspec URL whose weights a fresh run starts from (warm start); empty: a random "
        "initialisation. The model settings must equal the checkpoint's except vocab_size and the dropouts. Characters "
        "of the checkpoint's vocabulary keep their embedding rows, characters new to the corpus are initialised "
        "as usual, characters the corpus lacks are dropped. The optimizer starts afresh (no state carried, full "
        "warm-up and schedule). No effect on a resumed run: its checkpoint holds everything.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = setting("auto", "auto picks CUDA, then MPS, then CPU.")
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto",
        "auto: bf16 autocast on CUDA (when supported) and on CPUs with fast bf16 (AMX or AVX-512 BF16), "
        "fp32 elsewhere.",
    )
    compile: bool = setting(False, "torch.compile the model (pays on GPU and on long CPU runs).")
    threads: int = setting(0, "CPU threads for PyTorch (0: PyTorch's default).")
    processes: int = setting(
        1,
        "Training processes on this machine (torchrun + DistributedDataParallel: NCCL on GPUs, gloo on CPU). "
        "batch_size stays the global batch: each process takes batch_size / processes of it.",
    )
    dist_timeout_s: float = setting(
        600.0, "Seconds a process waits for the others in a collective operation before failing."
    )

    def check(self) -> None:
        for name in (
            "processes",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
            "log_interval",
        ):
            if getattr(self, name) < 1:
                self._fail(name, "must be at least 1")
        for name in ("max_steps", "warmup_steps", "early_stopping_patience", "threads"):
            if getattr(self, name) < 0:
                self._fail(name, "must not be negative")
        if self.time_budget_s < 0:
            self._fail("time_budget_s", "must not be negative")
        if self.max_steps == 0 and self.time_budget_s == 0:
            raise ConfigError("TrainConfig needs max_steps or time_budget_s (both are 0)")
        if self.lr <= 0:
            self._fail("lr", "must be positive")
        if self.muon_lr <= 0:
            self._fail("muon_lr", "must be positive")
        if not 0.0 <= self.muon_momentum < 1.0:
            self._fail("muon_momentum", "must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            self._fail("min_lr_ratio", "must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            self._fail("decay_fraction", "must be in (0, 1]")
        if not 0.0 <= self.late_dropout < 1.0:
            self._fail("late_dropout", "must be in [0, 1)")
        if not 0.0 <= self.calibration < 0.5:
            self._fail("calibration", "must be in [0, 0.5)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self._fail(name, "must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("TrainConfig.weight_decay and grad_clip must not be negative")
        if self.batch_size % self.processes:
            raise ConfigError(
                f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of processes ({self.processes}): "
                "each process takes an equal share of the global batch"
            )
        if self.dist_timeout_s <= 0:
            self._fail("dist_timeout_s", "must be positive")


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """What one training run needs besides its data: the model and how to train it."""

    model: ModelConfig = setting(ModelConfig(), "Model shape.")
    train: TrainConfig = setting(TrainConfig(), "Optimisation, schedule, evaluation and checkpoints.")


# Sampling ---------------------------------------------------------------------------------

MIN_TEMPERATURE = 1e-6
"""Smallest positive temperature: sampling divides float32 logits by it, and a smaller one
(1e-45 rounds to a float32 denormal) turns them into infinities and the softmax into NaN."""


@dataclasses.dataclass(frozen=True)
class SampleConfig(Config):
    max_new_tokens: int = setting(500, "Characters to generate per sample.")
    temperature: float = setting(0.8, "Softmax temperature; 0 means greedy (always the most likely character).")
    top_k: int = setting(0, "Sample only among the k most likely characters (0: all).")
    top_p: float = setting(1.0, "Sample only among the most likely characters whose probabilities sum to p (1: all).")
    repetition_penalty: float = setting(
        1.0, "Divide the logits of characters already in the text by this (1: off; >1 discourages repeats)."
    )
    seed: int = setting(0, "Random seed: the same seed, settings and prompt give the same text.")
    num_samples: int = setting(1, "Samples to generate at once, in one batch.")
    stop: tuple[str, ...] = setting((), "Strings that end a sample when generated (not included in the output).")
    unknown: Literal["error", "unk"] = setting(
        "error", "A prompt character outside the vocabulary: 'error' refuses, 'unk' maps it to the unknown id."
    )

    def check(self) -> None:
        if self.max_new_tokens < 0:
            self._fail("max_new_tokens", "must not be negative")
        if self.temperature < 0:
            self._fail("temperature", "must not be negative")
        if 0 < self.temperature < MIN_TEMPERATURE:
            self._fail("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        if self.top_k < 0:
            self._fail("top_k", "must not be negative")
        if not 0.0 < self.top_p <= 1.0:
            self._fail("top_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            self._fail("repetition_penalty", "must be positive")
        if self.num_samples < 1:
            self._fail("num_samples", "must be at least 1")
        if any(not s for s in self.stop):
            raise ConfigError("SampleConfig.stop strings must not be empty")


MAX_INSPECT_CHARS = 20_000
"""The most characters `fundamentallm inspect` shades in surprisal.html: each is an element with its
own tooltip, and a page of many more grows past what a browser or the MLflow artifact viewer opens
comfortably."""


@dataclasses.dataclass(frozen=True)
class InspectConfig(Config):
    split: str = setting("val", "Split to inspect: train, val or test.")
    chars: int = setting(3000, f"Characters shaded by surprisal in surprisal.html (at most {MAX_INSPECT_CHARS:,}).")
    prompt: str = setting("", "Text whose attention weights are drawn (empty: the first line of the split).")
    batch_size: int = setting(32, "Windows per forward pass.")
    device: str = setting("auto", "auto, cpu, cuda or mps.")

    def check(self) -> None:
        if self.split not in SPLITS:
            self._fail("split", f"must be one of {', '.join(SPLITS)}")
        if not 1 <= self.chars <= MAX_INSPECT_CHARS:
            self._fail("chars", f"must be between 1 and {MAX_INSPECT_CHARS:,} (one page element per character)")
        if self.batch_size < 1:
            self._fail("batch_size", "must be at least 1")


EvalProtocol = Literal["sliding", "nanogpt"]
"""How `fundamentallm evaluate` gives each scored character its context (`fundamentallm.evaluate`)."""


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    split: str = setting("val", "Split to evaluate: train, val or test.")
    protocol: EvalProtocol = setting(
        "sliding",
        "'sliding': overlapping windows, each character scored with at least context - stride characters of "
        "context (the model as used); 'nanogpt': non-overlapping windows tiled from the start, each character "
        "scored with only the context inside its window, as nanoGPT reports its loss (for a trained model, a "
        "higher figure).",
    )
    stride: int | None = setting(
        None,
        "Sliding-window stride, 1 to the context length (None: half the context); the nanogpt protocol's is "
        "the context length.",
    )
    batch_size: int = setting(32, "Windows per forward pass.")
    device: str = setting("auto", "auto, cpu, cuda or mps.")

    def check(self) -> None:
        if self.split not in SPLITS:
            self._fail("split", f"must be one of {', '.join(SPLITS)}")
        if self.stride is not None and self.stride < 1:
            self._fail("stride", "must be at least 1")
        if self.batch_size < 1:
            self._fail("batch_size", "must be at least 1")


def parse_duration(text: str | float) -> float:
    """Seconds from '90', '90s', '15m', '1h', '1h30m' (a bare number is seconds)."""
    if isinstance(text, (int, float)):
        return float(text)
    total, number = 0.0, ""
    units = {"s": 1, "m": 60, "h": 3600}
    for char in text.strip().lower():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            raise ConfigError(f"cannot read duration {text!r}; use e.g. 90s, 15m or 1h30m")
    if number:
        total += float(number)
    if total <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return total
