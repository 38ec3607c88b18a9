"""Import hygiene: the library never imports Prefect, and imports have no side effects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_library_source_never_imports_prefect():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "fundamentallm").rglob("*.py")
        if any(line.lstrip().startswith(("import prefect", "from prefect")) for line in path.read_text().splitlines())
    ]
    assert offenders == []


def test_importing_everything_starts_nothing_and_writes_nothing(tmp_path):
    code = (
        "import sys, os, logging\n"
        "import fundamentallm, fundamentallm.cli, fundamentallm.config\n"
        "import fundamentallm.data.prepare, fundamentallm.data.dataset\n"
        "assert 'prefect' not in sys.modules, 'prefect imported by the library'\n"
        "assert 'great_expectations' not in sys.modules, 'great_expectations imported eagerly'\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
        "assert not logging.getLogger().handlers, 'logging configured at import'\n"
        "assert os.listdir('.') == [], os.listdir('.')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr


def test_flows_and_tasks_import_from_the_checkout():
    proc = subprocess.run(
        [sys.executable, "-c", "import flows.train_pipeline, tasks.data, tasks.pipeline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
