"""Benchmark of the data stage (`prepare`: ingest -> validate -> encode).

Times `prepare` on Tiny Shakespeare and on a synthetic corpus of at least 200 MB, each
run in a fresh subprocess with a fresh output directory, and prints MB/s and peak
memory. Targets on the 2-core reference machine: at least 50 MB/s end to end on the
large corpus, and peak memory under 3x the corpus size.

"End to end" is the `prepare()` call, from the first byte read to the manifest written,
with the libraries already imported; the one-off import cost (Great Expectations alone
takes several seconds) is printed separately, as is the resident memory of the
imported libraries before any data is read.

    python benchmarks/bench_prepare.py                 # both corpora, 3 runs each
    python benchmarks/bench_prepare.py --synthetic-mb 50 --repeats 1
    python benchmarks/bench_prepare.py --one-file-mb 100,300 --repeats 3
    python benchmarks/bench_prepare.py --one-file-mb 100,300 --repeats 3 --against /tmp/before

`--one-file-mb` compares one big file with the same bytes as many files, at each size given:
per size the MB/s of `prepare()` and the peak RSS of the child process against the corpus,
and between the smallest and the largest size the marginal rate (extra megabytes over extra
seconds), which leaves out what a run costs whatever its size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpus import shakespeare  # same directory

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import great_expectations, pandas  # noqa: F401  (import cost measured apart from the data work)
from fundamentallm.config import DataConfig
from fundamentallm.data.prepare import prepare
import_s = time.perf_counter() - t0
def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
base_kb = rss_kb()
config = DataConfig.from_dict(json.loads(sys.argv[1]))
t = time.perf_counter()
result = prepare(config, sys.argv[2], data_docs=False)
seconds = time.perf_counter() - t
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"import_s": import_s, "seconds": seconds, "stages": result.seconds,
                  "base_mb": base_kb / 1024, "peak_mb": peak_kb / 1024,
                  "tokens": result.dataset.tokens, "vocab": result.dataset.vocab_size}))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def make_synthetic(source: Path, target: Path, megabytes: int, one_file: bool = False) -> int:
    """Write a directory of ~1 MB documents built from `source`'s lines, shuffled per file
    (so none is a duplicate); every fourth file carries non-ASCII text, so both the ASCII
    fast path and the general Unicode path are exercised. Returns the total bytes.

    With `one_file` the same documents are written one after another into the single file
    `target` instead: mostly ASCII with multi-byte characters throughout, like enwik8."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    if one_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "wb")  # noqa: SIM115 (closed below)
    else:
        target.mkdir(parents=True, exist_ok=True)
    total, index = 0, 0
    while total < megabytes * 1_000_000:
        rng = random.Random(index)
        picked = rng.sample(lines, k=min(len(lines), 25_000))
        text = "".join(picked)
        if index % 4 == 0:
            text = text.replace("the ", "thé ").replace("And ", "Ånd ").replace("--", "\u2014")
        data = text.encode("utf-8")
        if one_file:
            out.write(data)
        else:
            (target / f"doc-{index:05d}.txt").write_bytes(data)
        total += len(data)
        index += 1
    if one_file:
        out.close()
    return total


def run_once(config: dict, corpus_bytes: int, repo: Path = REPO) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as out:
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, json.dumps(config), out],
            capture_output=True,
            text=True,
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed:\n{proc.stderr}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["mb_s"] = corpus_bytes / 1e6 / record["seconds"]
    record["peak_ratio"] = record["peak_mb"] * 1024 * 1024 / corpus_bytes
    record["data_ratio"] = (record["peak_mb"] - record["base_mb"]) * 1024 * 1024 / corpus_bytes
    return record


def report(name: str, corpus_bytes: int, runs: list[dict]) -> dict:
    med = {
        key: statistics.median(r[key] for r in runs)
        for key in ("seconds", "mb_s", "peak_mb", "base_mb", "peak_ratio", "data_ratio", "import_s")
    }
    stages = {s: statistics.median(r["stages"][s] for r in runs) for s in runs[0]["stages"]}
    print(f"\n{name}: {corpus_bytes / 1e6:.1f} MB, {len(runs)} run(s), medians")
    print(f"  prepare          {med['seconds']:.2f} s  ->  {med['mb_s']:.1f} MB/s")
    print("  stages           " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    print(
        f"  peak RSS         {med['peak_mb']:.0f} MB = {med['peak_ratio']:.2f}x corpus "
        f"(libraries alone {med['base_mb']:.0f} MB; above that {med['data_ratio']:.2f}x corpus)"
    )
    print(f"  imports          {med['import_s']:.1f} s (once per process, not in the figures above)")
    print("  all runs MB/s    " + ", ".join(f"{r['mb_s']:.1f}" for r in runs))
    return {"name": name, "bytes": corpus_bytes, **med, "stages": stages, "runs": [r["mb_s"] for r in runs]}


def one_file_vs_many(
    shakespeare: Path, sizes: list[int], repeats: int, base: dict, against: Path | None = None
) -> list[dict]:
    """At each size, the synthetic corpus as one file and as many files; then the marginal rates.

    With `against` (another checkout, e.g. `git worktree add /tmp/before <commit>`), each run of
    this tree is followed by the same run of that one, on the same files: load on a shared
    machine then falls on both alike."""
    trees = {"": REPO, **({f"{against.name}: ": against} if against else {})}
    results = []
    for megabytes in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-corpus-") as corpus_dir:
            corpora = {}
            for layout in ("one file", "many files"):
                target = Path(corpus_dir) / ("corpus.txt" if layout == "one file" else "docs")
                size = make_synthetic(shakespeare, target, megabytes, one_file=layout == "one file")
                corpora[layout] = ({**base, "ingest": {"sources": [str(target)]}}, size)
            runs: dict[tuple[str, str], list[dict]] = {}
            for _ in range(repeats):
                for layout, (config, size) in corpora.items():
                    for tree, repo in trees.items():
                        runs.setdefault((tree, layout), []).append(run_once(config, size, repo))
            for (tree, layout), tree_runs in runs.items():
                size = corpora[layout][1]
                row = report(f"{tree}{layout}, {megabytes} MB", size, tree_runs)
                results.append({**row, "tree": tree, "layout": layout, "mb": megabytes})
    print("\nmarginal rate, smallest to largest size (extra MB / extra seconds of prepare):")
    for tree in trees:
        for layout in ("one file", "many files"):
            rows = sorted((r for r in results if r["layout"] == layout and r["tree"] == tree), key=lambda r: r["bytes"])
            small, large = rows[0], rows[-1]
            marginal = "n/a (one size, or the larger was not slower)"
            if large["bytes"] > small["bytes"] and large["seconds"] > small["seconds"]:
                rate = (large["bytes"] - small["bytes"]) / 1e6 / (large["seconds"] - small["seconds"])
                marginal = f"{rate:.1f} MB/s"
            print(
                f"  {tree}{layout:10s}  {small['mb']} -> {large['mb']} MB: {marginal}; "
                f"peak RSS / corpus {small['peak_ratio']:.2f}x -> {large['peak_ratio']:.2f}x"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shakespeare", type=Path, help="path to tinyshakespeare.txt (default: the shared copy, else downloaded)"
    )
    parser.add_argument("--synthetic-mb", type=int, default=200, help="size of the synthetic corpus in MB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per corpus (the median is reported)")
    parser.add_argument(
        "--one-file-mb",
        help="comma-separated sizes in MB (e.g. 100,300): one big file against many files, instead of the default runs",
    )
    parser.add_argument(
        "--against", type=Path, help="with --one-file-mb: another checkout to run alternately with this one"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.shakespeare = shakespeare(args.shakespeare)

    print(f"machine: {os.cpu_count()} CPUs, {cpu_name()}, python {sys.version.split()[0]}")
    results = []
    base = {
        "encode": {"train_fraction": 0.9, "val_fraction": 0.1, "test_fraction": 0.0},
    }
    if args.one_file_mb:
        sizes = [int(mb) for mb in args.one_file_mb.split(",")]
        results = one_file_vs_many(args.shakespeare, sizes, args.repeats, base, args.against)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    size = args.shakespeare.stat().st_size
    config = {**base, "ingest": {"sources": [str(args.shakespeare)]}}
    results.append(report("tinyshakespeare", size, [run_once(config, size) for _ in range(args.repeats)]))

    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as corpus_dir:
        started = time.perf_counter()
        size = make_synthetic(args.shakespeare, Path(corpus_dir), args.synthetic_mb)
        print(f"\n(synthetic corpus written in {time.perf_counter() - started:.1f} s)")
        config = {**base, "ingest": {"sources": [corpus_dir]}}
        results.append(
            report(f"synthetic {args.synthetic_mb} MB", size, [run_once(config, size) for _ in range(args.repeats)])
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
