"""Under CI=true a skip fails the session unless its test is on conftest's short allow-list."""

from __future__ import annotations

import pytest
from conftest import run_suite_with_this_conftest

# as `make test` runs the suite (pytest-xdist: the tests run in worker processes, and their
# reports reach the summary through the controller)
PARALLEL = ["-n", "2"]
MODULES = {
    "test_reliability_crash": (
        "import pytest\n"
        "def test_a_full_disk_gives_a_clear_error_and_corrupts_nothing():\n"
        "    pytest.skip('the kernel refuses the mount')\n"
    ),
    "test_other": (
        "import pytest\n"
        "from conftest import skip_or_fail\n"
        "def test_passes():\n    pass\n"
        "def test_plain_skip():\n    pytest.skip('no reason that CI accepts')\n"
        "def test_missing_browser():\n    skip_or_fail('Chromium is not installed')\n"
    ),
}


def _pytest(tmp_path, ci: str | None, parallel: list[str]):
    return run_suite_with_this_conftest(tmp_path, MODULES, "-rA", *parallel, ci=ci)


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


@pytest.mark.parametrize(
    ("marker", "reason", "skipped", "allowed"),
    [
        (
            "avx512",
            "AVX512_SKIP",
            "Skipped: runs AVX-512 code",
            "allowed: a CPU without AVX-512 cannot run the kernels",
        ),
        (
            "amx",
            "AMX_SKIP",
            "Skipped: runs the attention kernel on AMX",
            "allowed: a CPU without AMX cannot run the tile",
        ),
    ],
)
def test_kernel_tests_skip_in_ci_only_where_the_cpu_cannot_run_them(
    tmp_path, monkeypatch, marker, reason, skipped, allowed
):
    # ATEN_CPU_CAPABILITY=avx2 holds PyTorch (and so `native.cpu_runs_avx512`) to AVX2 on any x86 CPU, where
    # neither the AVX-512 kernels nor the AMX one run: the marked test skips, allowed under CI=true, and its
    # body (which would fail) does not run; an unmarked test that skips for the same words still fails.
    modules = {
        "test_kernels": (
            "import pytest\n"
            f"from conftest import {reason}\n"
            f"@pytest.mark.{marker}\n"
            "def test_kernel():\n    assert False\n"
            f"def test_unmarked():\n    pytest.skip({reason})\n"
        )
    }
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    done = run_suite_with_this_conftest(tmp_path, modules, "-rA", "-p", "no:randomly", ci="true")
    assert f"tests/test_kernels.py::test_kernel: {skipped}" in done.stdout, done.stdout
    assert allowed in done.stdout
    assert "FAILED tests/test_kernels.py::test_unmarked" in done.stdout
    assert "1 failed, 1 skipped" in done.stdout
