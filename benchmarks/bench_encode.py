"""Benchmark of parallel encoding: the encode step with 1 and 2 worker processes.

Ingests a synthetic corpus (the one `bench_prepare.py` builds) once, then times encoding it
into a fresh output directory, median of `--repeats` runs, two ways:

- **library**: `plan_encode`, then `encode_shard` for every shard on a process pool of N
  workers (started inside the timing: a user pays for it), then `finish_encode`. N = 1 is
  the pieces run one after another in one worker. Timed again on a pool started (and its
  modules imported) beforehand, which isolates the encoding work itself. `encode()` (this
  process, two writer threads) is timed too, as the reference.
- **prefect**: the pipeline's `encode` task in a flow under a temporary Prefect API, with
  `EncodeConfig.workers` = 1 (the task encodes in the flow's process) and N (the
  `encode-parallel` subflow on a local Dask cluster of N single-threaded processes, started
  and stopped inside the timing). One untimed flow run first absorbs the one-off costs of a
  process's first flow run. Off with `--no-prefect`.

Every run's shards are checked byte for byte against the reference run's. MB/s is corpus
bytes (UTF-8 text) per second.

    python benchmarks/bench_encode.py                       # 200 MB, workers 1 and 2, 3 runs each
    python benchmarks/bench_encode.py --synthetic-mb 20 --repeats 1 --no-prefect
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_prepare import make_synthetic  # noqa: E402 (same directory)
from corpus import shakespeare  # noqa: E402 (same directory)

from fundamentallm.config import EncodeConfig, IngestConfig  # noqa: E402
from fundamentallm.data.encode import encode, encode_shard, finish_encode, plan_encode  # noqa: E402
from fundamentallm.data.ingest import ingest  # noqa: E402
from fundamentallm.fsutil import staging_dir  # noqa: E402

CONFIG = EncodeConfig(train_fraction=0.9, val_fraction=0.1, test_fraction=0.0)


def process_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def encode_on(pool: ProcessPoolExecutor, documents_path: str, out_dir: Path) -> str:
    """plan -> shards on the pool's processes -> finish; returns the dataset directory."""
    plan = plan_encode(documents_path, CONFIG, out_dir)
    with staging_dir(plan.dataset_dir) as stage:
        shards = list(pool.map(encode_shard, plan.shards, [stage] * len(plan.shards)))
        return finish_encode(plan, shards, stage).path


def encode_with_processes(documents_path: str, out_dir: Path, workers: int) -> str:
    """The same on a pool started for the occasion (its start-up is part of the cost)."""
    with process_pool(workers) as pool:
        return encode_on(pool, documents_path, out_dir)


def _ready(_: int) -> int:
    return os.getpid()  # by now the worker has imported this module, and with it the encoder


def shard_bytes(dataset: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(dataset).iterdir())}


def timed(name: str, run: Callable[[Path], str], corpus_bytes: int, repeats: int, reference: dict | None) -> dict:
    seconds = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="bench-encode-"))
        try:
            started = time.perf_counter()
            dataset = run(out)
            seconds.append(time.perf_counter() - started)
            if reference is not None and shard_bytes(dataset) != reference:
                sys.exit(f"{name}: output differs from the reference run")
        finally:
            shutil.rmtree(out, ignore_errors=True)
    median = statistics.median(seconds)
    mb_s = corpus_bytes / 1e6 / median
    print(f"  {name:34s} {median:6.2f} s  {mb_s:6.1f} MB/s   (runs: {', '.join(f'{s:.2f}' for s in seconds)} s)")
    return {"name": name, "seconds": median, "mb_s": mb_s, "runs": seconds}


def prefect_runs(documents, corpus_bytes: int, workers: list[int], repeats: int, reference: dict) -> list[dict]:
    # The temporary server's telemetry cannot reach the network here, and fails noisily.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tasks.data import encode_task

    @flow(name="bench-encode")
    def encode_only(config: EncodeConfig, out_dir: str):
        return encode_task(documents, config, out_dir, 1).path

    results = []
    with prefect_test_harness(server_startup_timeout=120):
        with tempfile.TemporaryDirectory(prefix="bench-encode-warmup-") as out:
            encode_only(CONFIG, out)  # the first flow run of a process pays one-off costs: not timed
        for n in workers:
            label = "prefect, workers=1 (in the flow)" if n == 1 else f"prefect, workers={n} (Dask cluster)"
            config = CONFIG.replace(workers=n)
            results.append(
                timed(label, lambda out, c=config: encode_only(c, str(out)), corpus_bytes, repeats, reference)
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shakespeare", type=Path, help="path to tinyshakespeare.txt (default: the shared copy, else downloaded)"
    )
    parser.add_argument("--synthetic-mb", type=int, default=200, help="size of the synthetic corpus in MB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (the median is reported)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--no-prefect", action="store_true", help="time the library only")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.shakespeare = shakespeare(args.shakespeare)

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, load average at start {load:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-encode-corpus-") as tmp:
        corpus_bytes = make_synthetic(args.shakespeare, Path(tmp) / "corpus", args.synthetic_mb)
        documents = ingest(IngestConfig(sources=(str(Path(tmp) / "corpus"),)), Path(tmp) / "docs")
        plan = plan_encode(documents.path, CONFIG, Path(tmp) / "probe")
        print(
            f"corpus: {corpus_bytes / 1e6:.1f} MB in {plan.documents} documents, {plan.tokens:,} tokens, "
            f"{len(plan.shards)} shards of up to {CONFIG.shard_tokens:,} tokens; medians of {args.repeats}\n"
        )
        reference_dir = Path(tmp) / "reference"
        reference = shard_bytes(encode(documents.path, CONFIG, reference_dir).path)

        reference_run = timed(
            "encode() (1 process, 2 threads)",
            lambda out: encode(documents.path, CONFIG, out).path,
            corpus_bytes,
            args.repeats,
            reference,
        )
        results = [reference_run]
        library, warm = {}, {}
        for n in args.workers:
            library[n] = timed(
                f"library, {n} process(es)",
                lambda out, n=n: encode_with_processes(documents.path, out, n),
                corpus_bytes,
                args.repeats,
                reference,
            )
            results.append(library[n])
        for n in args.workers:
            with process_pool(n) as pool:
                list(pool.map(_ready, range(4 * n)))  # processes started, modules imported
                warm[n] = timed(
                    f"library, {n} process(es), pool warm",
                    lambda out, pool=pool: encode_on(pool, documents.path, out),
                    corpus_bytes,
                    args.repeats,
                    reference,
                )
            results.append(warm[n])
        prefect = {}
        if not args.no_prefect:
            timings = prefect_runs(documents, corpus_bytes, args.workers, args.repeats, reference)
            prefect = dict(zip(args.workers, timings, strict=True))
            results.extend(timings)

    print()
    base = min(args.workers)
    for n in args.workers:
        if n == base:
            continue
        print(f"ratio library {n} / {base} process(es): {library[n]['mb_s'] / library[base]['mb_s']:.2f}x")
        print(f"ratio library {n} / {base} process(es), pool warm: {warm[n]['mb_s'] / warm[base]['mb_s']:.2f}x")
        if prefect:
            print(f"ratio prefect workers={n} / workers={base}: {prefect[n]['mb_s'] / prefect[base]['mb_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"bytes": corpus_bytes, "load": load, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
