"""The benchmark scripts run (on tiny inputs): a documented command must not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prose

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.heavy  # trains models or runs several processes: not in the quick subset


def test_bench_prepare_smoke(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("".join(prose(i, 2000) for i in range(3)))
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_prepare.py",
            "--shakespeare",
            str(text),
            "--synthetic-mb",
            "1",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MB/s" in proc.stdout and "peak RSS" in proc.stdout
    assert (tmp_path / "r.json").read_text().count('"mb_s"') == 2


def test_bench_serve_smoke(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("".join(prose(i, 2000) for i in range(3)))
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_serve.py",
            "--source",
            str(text),
            "--steps",
            "5",
            "--requests",
            "16",
            "--threads",
            "4",
            "--max-new-tokens",
            "8",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "requests/s" in proc.stdout and "p99" in proc.stdout
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["wrong_answers"] == 0 and figures["requests"] == 16 and figures["requests_per_s"] > 0


def test_gpu_check_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh, tiny and on the CPU: `prepare`, then every step of the check."""
    text = tmp_path / "small.txt"
    text.write_text("".join(prose(i, 3000) for i in range(3)))
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SHAKESPEARE": str(text),
        "GPU_CHECK_DATA": str(tmp_path / "gpu-check"),
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_SMOKE": "1",
    }
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    prepared = subprocess.run([script, "prepare"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    out = tmp_path / "out"
    proc = subprocess.run([script, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for part in ("## 1. throughput", "MFU", "the trainer's step", "## 2. quality", "exact val loss of best.pt"):
        assert part in summary, summary
    for part in ("## 3.", "1 process, cpu", "in its last progress window", "speed-up from the cache", "## 5."):
        assert part in summary, summary
    assert "failed sections: none" in summary
    for name in ("quality.json", "quality-again.json"):
        quality = json.loads((out / name).read_text())
        assert quality["steps"] == 30 and quality["val_loss_sliding"] > 0 and quality["val_loss_nanogpt"] > 0
        assert 0 < quality["first_step_s"] < quality["wall_s"]
    # only small files come back from the GPU machine (at most 8): no run folders, no checkpoints
    assert sorted(p.name for p in out.iterdir()) == [
        "ddp.log",
        "quality-again.json",
        "quality-metrics.jsonl",
        "quality.json",
        "stderr.txt",
        "summary.txt",
    ]


def test_gpu_check_reports_a_failed_section_and_runs_the_rest(tmp_path):
    # A device that is not there: every section fails, each is reported, and the script exits non-zero.
    text = tmp_path / "small.txt"
    text.write_text("".join(prose(i, 3000) for i in range(3)))
    env = {**os.environ, "PYTHON": sys.executable, "SHAKESPEARE": str(text), "GPU_CHECK_DATA": str(tmp_path / "g")}
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    subprocess.run([script, "prepare"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    env |= {"GPU_CHECK_DEVICE": "cuda:7", "GPU_CHECK_SMOKE": "1"}
    proc = subprocess.run(
        [script, str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode != 0
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for n in (1, 2, 3, 4, 5):
        assert f"section {n} FAILED" in summary, summary
    assert "failed sections: 1 2 3 4 5" in summary and "cuda" in summary


def test_bench_prepare_one_file_against_another_tree(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("".join(prose(i, 2000) for i in range(3)))
    args = ["--shakespeare", str(text), "--one-file-mb", "1,2", "--repeats", "1", "--against", str(ROOT)]
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_prepare.py", *args, "--json", str(tmp_path / "r.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "r.json").read_text())
    # 2 sizes x 2 layouts x 2 trees, and a marginal rate per tree and layout
    assert sorted((r["mb"], r["layout"], r["tree"]) for r in rows) == sorted(
        (mb, layout, tree) for mb in (1, 2) for layout in ("one file", "many files") for tree in ("", f"{ROOT.name}: ")
    )
    assert proc.stdout.count("; peak RSS / corpus") == 4


def _bench_train(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bench_train_quality_evaluates_the_run_and_keeps_it_when_asked(tmp_path):
    # A small text in place of Tiny Shakespeare, the debug preset for 20 seconds: the run is trained as its
    # own process, evaluated exactly, and with --keep its directory (the curve, the checkpoints) stays.
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000)))
    common = ["quality", "--preset", "debug", "--budget", "20s"]
    common += ["--shakespeare", str(text), "--data", str(tmp_path / "data"), "--keep", str(tmp_path / "keep")]
    out = _bench_train(*common, "--json", str(tmp_path / "q.json"))
    (record,) = json.loads((tmp_path / "q.json").read_text())
    assert f"run 1: wall {record['wall_s']:.1f}s, {record['steps']} steps" in out and "median exact val loss" in out
    curve = [json.loads(line) for line in (tmp_path / "keep" / "run-1" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in curve if r["kind"] == "train"]
    assert steps[0] == 1 and steps[-1] <= record["steps"]  # the curve, from the first step on
    assert (tmp_path / "keep" / "run-1" / "latest.pt").is_file()
    again = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", *common], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 1 and "run-1 exists" in again.stderr  # a kept run is never overwritten


def test_bench_train_profile_throughput_and_attention_smoke():
    common = ["--warmup", "1", "--steps", "2"]
    out = _bench_train("profile", "--preset", "debug", "--dropout", "0.1", *common)
    assert "phases: forward" in out and "optimizer" in out
    shares = [float(line.rsplit(None, 1)[1].rstrip("%")) for line in out.splitlines() if " ms " in line]
    assert "matrix products" in out and "dropout and random" in out
    assert "optimizer arithmetic" in out  # the operators under the optimizer's step, by where they run
    assert sum(shares) == pytest.approx(100, abs=1)  # every operator's time in one kind or another
    out = _bench_train("throughput", "--presets", "debug", "--set", "model.n_layer=1", *common)
    assert "tokens/s" in out and "MFU" in out
    assert "debug: 1x32," in out  # the override reached the model (the preset has 2 layers)
    lines = _bench_train("attention", "--shapes", "2x2x16x8", "2x2x100x8", "2x2x600x8", *common[:2]).splitlines()
    assert len(lines) == 6 and all("fused / spelled out" in line for line in lines)
    # bf16: 16 and 100 positions spelled out (one slice: a few bytes of scores; 100 queries in two
    # blocks of 64), 600 not
    assert lines[3].endswith("spelled out in 1 tile(s): 1 slice(s) x 1 block(s) of queries")
    assert lines[4].endswith("spelled out in 2 tile(s): 1 slice(s) x 2 block(s) of queries")
    assert lines[5].endswith("fused")
    defaults = _bench_train("attention", "--dtypes", "float32", "--warmup", "0", "--repeats", "1").splitlines()
    assert len(defaults) == 5 and "B 64 H 6 T 256 D 64" in defaults[3]  # the default shapes, parsed
    bad = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", "attention", "--shapes", "16x4x128"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "'16x4x128': expected BATCHxHEADSxPOSITIONSxHEAD_DIM" in bad.stderr
    lines = _bench_train("activations", "--shapes", "2x3x8", "--warmup", "0", "--repeats", "1").splitlines()
    assert [line.split(":")[0] for line in lines] == ["float32 2x3x8", "bfloat16 2x3x8"]
    assert all(f" {name} " in line for line in lines for name in ("gelu", "gelu_exact", "relu2"))
    out = _bench_train("rotary", "--shape", "2x2x16x8", "--dtype", "float32", "--warmup", "0", "--repeats", "1")
    assert out.startswith("float32 B 2 H 2 T 16 D 8: no rotation ") and "eager function" in out


def test_bench_train_paired_alternates_a_setting_and_names_it_when_a_step_fails():
    # Steps of one preset alternate between a module-level setting as it is and changed. A value the
    # code cannot run with (query blocks of 0 positions, read by the spelled-out attention that dropout
    # takes) fails the changed steps: the toggle reaches the code; the error names the setting.
    common = ["--preset", "debug", "--dropout", "0.1", "--warmup", "1", "--pairs", "2"]
    out = _bench_train("paired", *common, "--toggle", "fundamentallm.model.QUERY_BLOCK=8")
    assert "fundamentallm.model.QUERY_BLOCK = 64 (as is) against 8 (changed), 2 pairs of steps" in out
    assert "changed / as is, median of the pairs" in out
    for toggle, message in (
        ("fundamentallm.model.QUERY_BLOCK=0", "a step with fundamentallm.model.QUERY_BLOCK = 0 failed: ValueError"),
        ("fundamentallm.model.NO_SUCH_SETTING=1", "no module-level setting 'fundamentallm.model.NO_SUCH_SETTING'"),
        ("fundamentallm.model.QUERY_BLOCK=sixty", "'sixty' is not a Python literal"),
        ("fundamentallm.model.QUERY_BLOCK=8 --compile", "eager steps only"),
    ):
        bad = subprocess.run(
            [sys.executable, "benchmarks/bench_train.py", "paired", *common, "--toggle", *toggle.split()],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr
    # the dtypes' short names, as --precision spells them
    lines = _bench_train("attention", "--dtypes", "bf16", "--shapes", "2x2x16x8", "--warmup", "0", "--repeats", "1")
    assert lines.startswith("bfloat16 B 2 H 2 T 16 D 8: ")
