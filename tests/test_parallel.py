"""`make test` runs the suite in several processes (pytest-xdist) with tests/conftest.py's
scheduler: a module's tests in one process (its module-scoped fixtures built once), and the
modules on the shared services in one process together."""

from __future__ import annotations

import json

from conftest import run_suite_with_this_conftest

MODULE = """
import json, os, pytest

@pytest.fixture(scope="module")
def built():
    with open({log!r}, "a") as log:
        log.write(json.dumps(["setup", __name__, os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")

@pytest.mark.parametrize("i", range(6))
def test_runs(built, i):
    with open({log!r}, "a") as log:
        log.write(json.dumps(["test", __name__, os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")
"""


def test_a_module_runs_in_one_process_and_the_shared_services_modules_together(tmp_path):
    log = tmp_path / "log.jsonl"
    names = ["test_a", "test_b", "test_c", "test_postgres", "test_reliability_services"]
    done = run_suite_with_this_conftest(tmp_path, {name: MODULE.format(log=str(log)) for name in names}, "-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    setups = [module for kind, module, _ in events if kind == "setup"]
    assert sorted(setups) == sorted(names)  # each module's fixture built once: no module split
    workers = {}
    for _kind, module, worker in events:
        workers.setdefault(module, set()).add(worker)
    assert all(len(found) == 1 for found in workers.values()), workers
    assert workers["test_postgres"] == workers["test_reliability_services"]
    assert len(set().union(*workers.values())) == 2  # and both processes had work
