"""Import hygiene: the library never imports Prefect, and importing any module of the project
(the library, the flows, the tasks, the deployment scripts) has no side effects."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Found from the files, not by importing packages, so a module that cannot be imported is still listed.
LIBRARY = sorted(_module_name(p) for p in (ROOT / "fundamentallm").rglob("*.py"))
ENTRY_POINTS = sorted(_module_name(p) for d in ("flows", "tasks") for p in (ROOT / d).rglob("*.py"))
# Scripts, not a package: imported by path, as `python deployments/NAME.py` would load them.
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deployments").glob("*.py"))

LIGHT = ("fundamentallm", "fundamentallm.cli", "fundamentallm.config", "fundamentallm.data.prepare")
LIGHT += ("fundamentallm.data.dataset",)
"""Modules the CLI needs before it knows the command: they must not pull in the heavy dependencies."""
HEAVY = ("torch", "great_expectations", "prefect")


# The library never imports Prefect ------------------------------------------------------


def _is_prefect(name: str) -> bool:
    # prefect_* are Prefect's integration packages (prefect_dask, ...); each imports prefect.
    return name == "prefect" or name.startswith(("prefect.", "prefect_"))


def prefect_imports(source: str) -> list[int]:
    """Lines of `source` that import Prefect: ``import``/``from`` statements anywhere (in a
    function too), and ``importlib.import_module``/``__import__`` of a literal name."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        if any(_is_prefect(name) for name in names):
            lines.append(node.lineno)
    return lines


def test_the_prefect_import_finder_finds_every_form():
    planted = (
        "import os, prefect.client as c\n"
        "def f():\n"
        "    from prefect import flow\n"
        "    import importlib\n"
        "    return importlib.import_module('prefect.runtime'), __import__('prefect_dask')\n"
        "from prefecture import x\n"
        "from . import prefect\n"
    )
    assert prefect_imports(planted) == [1, 3, 5, 5]


def test_library_source_never_imports_prefect():
    offenders = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "fundamentallm").rglob("*.py"))
        if (lines := prefect_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"Prefect imported by the library (file: lines): {offenders}"


# Importing has no side effects ----------------------------------------------------------

# Run in a fresh interpreter per module: snapshot, import, report what changed as JSON.
CHILD = r"""
import importlib, importlib.util, json, logging, os, sys, threading

target = sys.argv[1]
root = logging.getLogger()
environment, handlers, level = dict(os.environ), list(root.handlers), root.level
threads = {t.ident for t in threading.enumerate()}
if target.endswith(".py"):
    spec = importlib.util.spec_from_file_location("imported_script", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
else:
    importlib.import_module(target)
after = dict(os.environ)
model = getattr(sys.modules.get("mlflow.models.model"), "__mlflow_model__", None)
report = {
    "environment": {
        k: [environment.get(k), after.get(k)]
        for k in sorted(environment.keys() | after.keys())
        if environment.get(k) != after.get(k)
    },
    "root logger handlers": [repr(h) for h in root.handlers if h not in handlers],
    "root logger level": [] if root.level == level else [level, root.level],
    "threads": [t.name for t in threading.enumerate() if t.ident not in threads],
    "mlflow model": [] if model is None else [repr(model)],
    "loaded": [name for name in ("torch", "great_expectations", "prefect", "mlflow") if name in sys.modules],
}
sys.stdout.write("\n" + json.dumps(report) + "\n")
"""


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _import_in_fresh_process(target: str, scratch: Path) -> dict:
    dirs = {name: scratch / name for name in ("cwd", "HOME", "TMPDIR")}
    for directory in dirs.values():
        directory.mkdir(parents=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "HOME": str(dirs["HOME"]),
        "TMPDIR": str(dirs["TMPDIR"]),
        "PYTHONDONTWRITEBYTECODE": "1",  # compiled files would go into the checkout, not here
    }
    script = str(ROOT / target) if target.endswith(".py") else target
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, script],
        cwd=dirs["cwd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        return {"import failed": [proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode]}
    printed, _, last = proc.stdout.rstrip("\n").rpartition("\n")
    report = json.loads(last)
    report["printed"] = [printed.strip()] if printed.strip() else []
    # Checked after the process has exited: atexit handlers and background threads count too.
    for name, directory in dirs.items():
        report[f"files in {name}"] = _files(directory)
    return report


DEPENDENCIES = {
    "prefect": "prefect.main",  # what `from prefect import flow` loads: it sets up Prefect's logging
    "mlflow": "mlflow.pyfunc",
    "torch": "torch",
    "great_expectations": "great_expectations",
}
"""The third-party packages a module may import where it needs them, and the module whose import
stands for each: what importing that alone changes is the package's doing, not the project's."""


def _own_effects(report: dict, baselines: dict[str, dict]) -> dict[str, list]:
    """What a module's import changed, less what the dependencies it loaded change by themselves
    (environment variables compared by name: their values, such as session ids, differ per run)."""
    allowed: dict[str, set] = {}
    for package in report.get("loaded", []):
        for what, found in baselines[package].items():
            allowed.setdefault(what, set()).update(found if isinstance(found, list) else found.keys())
    own = {}
    for what, found in report.items():
        if what == "loaded":
            continue
        if isinstance(found, dict):
            found = {k: v for k, v in found.items() if k not in allowed.get(what, set())}
        else:
            found = [x for x in found if what == "mlflow model" or x not in allowed.get(what, set())]
        if found:
            own[what] = found
    return own


@pytest.fixture(scope="module")
def import_reports(tmp_path_factory) -> tuple[dict[str, dict], dict[str, dict]]:
    """What importing each module changed, and what importing each dependency alone changes:
    each from a fresh process (two at a time)."""
    scratch = tmp_path_factory.mktemp("imports")
    targets = [*LIBRARY, *ENTRY_POINTS, *SCRIPTS, *DEPENDENCIES.values()]
    workers = max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        found = pool.map(lambda t: _import_in_fresh_process(t, scratch / t.replace("/", "_")), targets)
        reports = dict(zip(targets, found, strict=True))
    baselines = {package: reports.pop(module) for package, module in DEPENDENCIES.items()}
    return reports, baselines


@pytest.mark.heavy
def test_every_module_is_checked(import_reports):
    reports, baselines = import_reports
    assert set(reports) == {*LIBRARY, *ENTRY_POINTS, *SCRIPTS}
    assert all("import failed" not in report for report in baselines.values()), baselines
    assert {"fundamentallm", "fundamentallm.data.validate", "fundamentallm.mlflow_model"} <= set(LIBRARY)
    assert {"flows.train_pipeline", "tasks.data", "tasks.pipeline"} <= set(ENTRY_POINTS)
    assert {"deployments/services.py", "deployments/automations.py"} <= set(SCRIPTS)


@pytest.mark.heavy
def test_importing_any_module_starts_nothing_writes_nothing_and_registers_nothing(import_reports):
    """Checked after each import: no file or directory in the working directory, HOME or TMPDIR,
    the same os.environ, no handler or level on the root logger, no new thread, no model set
    with mlflow.models.set_model, nothing printed."""
    reports, baselines = import_reports
    changes = {target: _own_effects(report, baselines) for target, report in reports.items()}
    changes = {target: found for target, found in changes.items() if found}
    assert changes == {}, "importing these modules had side effects:\n" + "\n".join(
        f"  {target}: {json.dumps(found)}" for target, found in changes.items()
    )


def test_the_side_effect_check_sees_each_kind_of_effect(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import logging, os, pathlib, threading, time\n"
        "pathlib.Path('made-here').mkdir()\n"
        "(pathlib.Path.home() / '.planted').write_text('x')\n"
        "os.environ['PLANTED'] = '1'\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "threading.Thread(target=time.sleep, args=(5,), name='planted', daemon=True).start()\n"
        "import mlflow.models\n"
        "mlflow.models.set_model(lambda model_input: model_input)\n"
        "print('hello')\n"
    )
    report = _import_in_fresh_process(str(planted), tmp_path / "scratch")
    effects = _own_effects(report, {"mlflow": {"environment": {"_MLFLOW_TELEMETRY_SESSION_ID": []}}})
    assert effects["files in cwd"] == ["made-here"]
    assert ".planted" in effects["files in HOME"]
    assert effects["environment"] == {"PLANTED": [None, "1"]}
    assert len(effects["root logger handlers"]) == 1 and effects["root logger level"] == [30, 20]
    assert effects["threads"] == ["planted"]
    assert len(effects["mlflow model"]) == 1
    assert effects["printed"] == ["hello"]


@pytest.mark.heavy
def test_no_library_module_loads_prefect(import_reports):
    reports, _ = import_reports
    loading = [m for m in LIBRARY if "prefect" in reports[m].get("loaded", ["prefect"])]
    assert loading == [], f"importing these library modules loads prefect: {loading}"


@pytest.mark.heavy
def test_the_cli_and_config_import_no_heavy_dependency(import_reports):
    reports, _ = import_reports
    heavy = {m: [n for n in reports[m].get("loaded", HEAVY) if n in HEAVY] for m in LIGHT}
    assert heavy == {m: [] for m in LIGHT}, f"imported eagerly: {heavy}"


@pytest.mark.heavy
def test_flows_and_tasks_import_from_the_checkout():
    proc = subprocess.run(
        [sys.executable, "-c", "import flows.train_pipeline, tasks.data, tasks.pipeline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
