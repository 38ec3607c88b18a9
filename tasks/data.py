"""Data-stage tasks: ingest, validate, encode.

Ingestion and encoding are cached on content: the key of ingestion is a digest of what the
sources hold (never their paths alone) and the settings; the key of encoding is the corpus
hash and the encoding settings. A cached record points at files on disk: `cached` calls such a
task and, when the record's files were deleted since, runs it again with a fresh cache.

Encoding runs in the flow's process (`encode` in `fundamentallm.data.encode`, two writer
threads) or, with `EncodeConfig.workers` > 1, as the subflow `encode-parallel`: the plan in
the flow's process, the shards as `encode-shard` tasks mapped over a local Dask cluster of
`workers` single-threaded processes, then the manifest. Both write the same bytes, and
`workers` is not part of the cache key or the dataset id, so either finds the other's output.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from fundamentallm.config import EncodeConfig, IngestConfig, ValidationConfig
from fundamentallm.data.encode import (
    DatasetRecord,
    EncodePlan,
    ShardSpec,
    config_hash,
    dataset_dir,
    encode,
    encode_shard,
    finish_encode,
    plan_encode,
)
from fundamentallm.data.ingest import DocumentsRecord, ingest
from fundamentallm.data.sources import fingerprint
from fundamentallm.data.validate import ValidationRecord, validate_documents
from fundamentallm.errors import DownloadError, FundamentaLLMError
from fundamentallm.fsutil import sha256_json, staging_dir


def _ingest_key(context: Any, parameters: dict[str, Any]) -> str | None:
    config: IngestConfig = parameters["config"]
    content = fingerprint(config.sources, config.include, config.exclude)
    if content is None:  # e.g. an unpinned URL: its content is unknown until downloaded
        return None
    return "ingest-" + sha256_json([content, config.to_dict(), os.path.abspath(parameters["out_dir"])])


def _encode_key(context: Any, parameters: dict[str, Any]) -> str:
    documents: DocumentsRecord = parameters["documents"]
    config: EncodeConfig = parameters["config"]
    target = dataset_dir(parameters["out_dir"], documents.corpus_hash, config)
    return "encode-" + sha256_json(
        [documents.corpus_hash, config_hash(config), str(target.resolve()), parameters["min_split_tokens"]]
    )


def cached(cached_task: Any, *args: Any) -> Any:
    """Call a cached task; when the record it returns names files no longer on disk, run it again."""
    record = cached_task(*args)
    if not record.is_on_disk():
        record = cached_task.with_options(refresh_cache=True)(*args)
    return record


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry downloads that failed and unexpected I/O errors, not bad input (a missing file stays missing)."""
    try:
        state.result()
    except DownloadError:
        return True
    except FundamentaLLMError:
        return False
    except OSError:
        return True
    return False


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient,
    cache_key_fn=_ingest_key,
    persist_result=True,
    timeout_seconds=4 * 3600,
)
def ingest_task(config: IngestConfig, out_dir: str) -> DocumentsRecord:
    """Read and normalise the corpus sources into the documents table (retried: sources may be remote)."""
    return ingest(config, out_dir)


@task(name="validate", timeout_seconds=3600)
def validate_task(
    documents: DocumentsRecord,
    config: ValidationConfig,
    encode_config: EncodeConfig,
    out_dir: str,
    min_split_tokens: int,
) -> ValidationRecord:
    """Check the documents table against the expectation suites; fails the run on a failed expectation."""
    return validate_documents(documents, config, encode_config, out_dir, min_split_tokens=min_split_tokens)


@task(name="encode", cache_key_fn=_encode_key, persist_result=True, timeout_seconds=4 * 3600)
def encode_task(documents: DocumentsRecord, config: EncodeConfig, out_dir: str, min_split_tokens: int) -> DatasetRecord:
    """Encode the documents into vocabulary, Parquet shards and manifest (a no-op when already done).

    With `config.workers` > 1 the shards are written by the `encode-parallel` subflow on a
    local Dask cluster; the cache key, and the output, are the same either way.
    """
    if config.workers > 1:
        return encode_parallel.with_options(task_runner=dask_task_runner(config.workers))(
            documents, config, out_dir, min_split_tokens
        )
    return encode(documents.path, config, out_dir, min_split_tokens=min_split_tokens)


# Parallel encoding: plan, mapped shards, finish ----------------------------------------
# Inputs and results are small records and files on disk: nothing to cache or persist.


@task(name="encode-plan", cache_policy=NO_CACHE, persist_result=False)
def encode_plan_task(
    documents: DocumentsRecord, config: EncodeConfig, out_dir: str, min_split_tokens: int
) -> EncodePlan:
    """Vocabulary, split counts and shard specs (reads metadata only; finds a finished dataset)."""
    return plan_encode(documents.path, config, out_dir, min_split_tokens=min_split_tokens)


@task(name="encode-shard", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=transient)
def encode_shard_task(spec: ShardSpec, directory: str) -> dict[str, Any]:
    """Write one shard into the staging directory; returns its manifest entry and which process
    wrote it (`writer`, not part of the manifest). Retried once on an I/O error."""
    return {**encode_shard(spec, directory), "writer": f"{socket.gethostname()}:{os.getpid()}"}


@task(name="encode-finish", cache_policy=NO_CACHE, persist_result=False)
def encode_finish_task(plan: EncodePlan, shards: list[dict[str, Any]], directory: str) -> DatasetRecord:
    """Check the shards against the plan, write vocabulary and manifest, publish the dataset directory."""
    return finish_encode(plan, shards, directory)


def dask_task_runner(workers: int) -> Any:
    """A Dask task runner on a local cluster of `workers` single-threaded processes (no dashboard)."""
    from prefect_dask import DaskTaskRunner  # imports dask.distributed: only when asked for

    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )


@flow(name="encode-parallel", validate_parameters=False)
def encode_parallel(
    documents: DocumentsRecord, config: EncodeConfig, out_dir: str, min_split_tokens: int
) -> DatasetRecord:
    """Encode with the shards as mapped tasks on this flow's task runner (a Dask cluster when
    called through `encode_task`); publishes nothing unless every shard was written."""
    plan = encode_plan_task(documents, config, out_dir, min_split_tokens)
    if plan.existing is not None:
        return plan.existing
    with staging_dir(plan.dataset_dir) as stage:
        directory = str(Path(stage).resolve())
        futures = encode_shard_task.map(plan.shards, directory=unmapped(directory))
        # Wait for every shard, failed or not, so that none is still writing when the stage is removed.
        wait(futures)
        shards = [future.result() for future in futures]  # raises the first shard's failure
        writers = sorted({shard["writer"] for shard in shards})
        get_run_logger().info(
            "wrote %d shards (%d tokens) in %d process(es): %s", len(shards), plan.tokens, len(writers), writers
        )
        return encode_finish_task(plan, shards, directory)
