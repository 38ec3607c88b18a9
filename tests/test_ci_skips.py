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


def test_avx512_tests_skip_in_ci_only_where_pytorch_runs_the_cpu_below_avx512(tmp_path, monkeypatch):
    # ATEN_CPU_CAPABILITY=avx2 holds PyTorch (and so `native.cpu_runs_avx512`) to AVX2 on any x86 CPU: the
    # marked test skips, allowed under CI=true, and its body (which would fail) does not run; an unmarked
    # test that skips for the same words still fails.
    modules = {
        "test_kernels": (
            "import pytest\n"
            "from conftest import AVX512_SKIP\n"
            "@pytest.mark.avx512\n"
            "def test_kernel():\n    assert False\n"
            "def test_unmarked():\n    pytest.skip(AVX512_SKIP)\n"
        )
    }
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    done = run_suite_with_this_conftest(tmp_path, modules, "-rA", "-p", "no:randomly", ci="true")
    assert "tests/test_kernels.py::test_kernel: Skipped: runs AVX-512 code" in done.stdout, done.stdout
    assert "allowed: a CPU without AVX-512 cannot run the kernels" in done.stdout
    assert "FAILED tests/test_kernels.py::test_unmarked" in done.stdout
    assert "1 failed, 1 skipped" in done.stdout


def test_amx_tests_skip_in_ci_only_where_the_cpu_cannot_run_the_tile_kernel(tmp_path, monkeypatch):
    # Held to AVX2 (as above), no CPU runs the AMX kernel: the marked test skips, allowed under CI=true,
    # without running its body; an unmarked test skipping for the same words still fails.
    modules = {
        "test_tiles": (
            "import pytest\n"
            "from conftest import AMX_SKIP\n"
            "@pytest.mark.amx\n"
            "def test_tile_kernel():\n    assert False\n"
            "def test_unmarked():\n    pytest.skip(AMX_SKIP)\n"
        )
    }
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    done = run_suite_with_this_conftest(tmp_path, modules, "-rA", "-p", "no:randomly", ci="true")
    skipped = "tests/test_tiles.py::test_tile_kernel: Skipped: runs the attention kernel on AMX"
    assert skipped in done.stdout, done.stdout
    assert "allowed: a CPU without AMX cannot run the tile kernel" in done.stdout
    assert "FAILED tests/test_tiles.py::test_unmarked" in done.stdout
    assert "1 failed, 1 skipped" in done.stdout
