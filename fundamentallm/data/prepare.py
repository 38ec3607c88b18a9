"""The whole data stage in one call: ingest, validate, encode."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fundamentallm.config import DEFAULT_CONTEXT_LENGTH, DataConfig, min_split_tokens
from fundamentallm.data.encode import DatasetRecord, encode
from fundamentallm.data.ingest import DocumentsRecord, ingest
from fundamentallm.data.validate import ValidationRecord, validate_documents
from fundamentallm.progress import Progress, null_progress


@dataclass(frozen=True)
class PrepareResult:
    documents: DocumentsRecord
    validation: ValidationRecord
    dataset: DatasetRecord
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare(
    config: DataConfig,
    out_dir: str | Path,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    data_docs: bool = True,
    progress: Progress = null_progress,
) -> PrepareResult:
    """Ingest `config.ingest.sources`, validate the documents, encode them into shards under `out_dir`.

    Every split must hold enough characters for a model of `context_length`
    (`fundamentallm.config.min_split_tokens`): validation checks it, encoding refuses less.
    """
    need = min_split_tokens(context_length)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    documents = ingest(config.ingest, out_dir, progress=progress)
    seconds["ingest"] = time.perf_counter() - started
    mark = time.perf_counter()
    validation = validate_documents(
        documents, config.validation, config.encode, out_dir, min_split_tokens=need, data_docs=data_docs
    )
    seconds["validate"] = time.perf_counter() - mark
    mark = time.perf_counter()
    dataset = encode(
        documents.path,
        config.encode,
        out_dir,
        min_split_tokens=need,
        progress=progress,
    )
    seconds["encode"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    return PrepareResult(documents, validation, dataset, seconds)
