"""Under CI=true a skip fails the session unless its test is on conftest's short allow-list."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# as `make test` runs the suite (pytest-xdist: the tests run in worker processes, and their
# reports reach the summary through the controller)
PARALLEL = ["-n", "2"]


def _pytest(tmp_path: Path, ci: str | None, parallel: list[str]) -> subprocess.CompletedProcess:
    import os

    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    shutil.copy(HERE / "conftest.py", tests / "conftest.py")
    (tests / "test_reliability_crash.py").write_text(
        "import pytest\n"
        "def test_a_full_disk_gives_a_clear_error_and_corrupts_nothing():\n"
        "    pytest.skip('the kernel refuses the mount')\n"
    )
    (tests / "test_other.py").write_text(
        "import pytest\n"
        "from conftest import skip_or_fail\n"
        "def test_passes():\n    pass\n"
        "def test_plain_skip():\n    pytest.skip('no reason that CI accepts')\n"
        "def test_missing_browser():\n    skip_or_fail('Chromium is not installed')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--rootdir", str(tmp_path), *parallel, "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("parallel", [[], PARALLEL], ids=["one-process", "xdist"])
def test_skips_fail_under_ci_except_the_allowed_ones(tmp_path, parallel):
    done = _pytest(tmp_path, "true", parallel)
    assert done.returncode == 1, done.stdout
    assert "FAILED tests/test_other.py::test_plain_skip" in done.stdout
    assert "FAILED tests/test_other.py::test_missing_browser" in done.stdout
    assert "SKIPPED [1] tests/test_reliability_crash.py" in done.stdout
    assert "allowed: mounting a tmpfs needs more than root" in done.stdout  # the reason, printed
    assert "2 failed, 1 passed, 1 skipped" in done.stdout


@pytest.mark.parametrize("parallel", [[], PARALLEL], ids=["one-process", "xdist"])
def test_skips_stay_skips_outside_ci(tmp_path, parallel):
    done = _pytest(tmp_path, None, parallel)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 3 skipped" in done.stdout
