"""The benchmark scripts run (on tiny inputs): a documented command must not rot."""

from __future__ import annotations

import json
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
