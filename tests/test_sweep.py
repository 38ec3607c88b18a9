"""Sweeps: the search space, bad input, the ranking rule, and the train-sweep flow end to end."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
from conftest import write_corpus

from fundamentallm.config import DataConfig
from fundamentallm.errors import ConfigError
from fundamentallm.sweep import (
    SweepConfig,
    TrialResult,
    ahead,
    best_trial,
    leaderboard,
    run_locally,
    trial_key,
    trial_specs,
)

# The search space and bad input ----------------------------------------------------------------


def test_grid_points_are_every_combination_and_seeds_count_up():
    config = SweepConfig(preset="debug", grid=("train.lr=0.003,0.01", "model.n_layer=1,2"), seeds=2, max_steps=10)
    points = config.points()
    assert points == [
        {"train.lr": 0.003, "model.n_layer": 1},
        {"train.lr": 0.003, "model.n_layer": 2},
        {"train.lr": 0.01, "model.n_layer": 1},
        {"train.lr": 0.01, "model.n_layer": 2},
    ]
    specs = trial_specs(config)
    assert len(specs) == 8 and [s.point for s in specs] == [0, 0, 1, 1, 2, 2, 3, 3]
    base_seed = config.base_run_config().train.seed
    assert [s.seed for s in specs[:2]] == [base_seed, base_seed + 1]
    first = specs[0].config()
    assert first.train.lr == 0.003 and first.model.n_layer == 1 and first.train.max_steps == 10
    assert first.train.time_budget_s == 0  # a step budget replaces the preset's time budget
    keys = {trial_key("d1", s.run_config) for s in specs}
    assert len(keys) == 8  # seeds and settings tell trials apart
    assert trial_key("d1", specs[0].run_config) != trial_key("d2", specs[0].run_config)


def test_random_draws_are_reproducible_and_in_range():
    config = SweepConfig(
        preset="debug", random=("train.lr=0.001:0.1:log", "model.n_layer=1:3"), samples=5, sample_seed=7
    )
    points = config.points()
    assert points == SweepConfig.from_dict(config.to_dict()).points()  # the same seed draws the same points
    assert points != config.replace(sample_seed=8).points()
    assert len(points) == 5
    for point in points:
        assert 0.001 <= point["train.lr"] <= 0.1
        assert isinstance(point["model.n_layer"], int) and 1 <= point["model.n_layer"] <= 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grid": ("model.n_layers=1,2",)}, "unknown setting 'model.n_layers'"),
        ({"grid": ("model.n_layer=1,two",)}, "model.n_layer"),
        ({"grid": ()}, "the search space is empty"),
        ({"grid": ("train.lr=0.01",), "budget_s": 0.0}, "budget_s must be a positive number"),
        ({"grid": ("train.lr=0.01",), "max_steps": 0}, "max_steps must be a positive number"),
        ({"grid": ("train.seed=1,2",)}, "train.seed cannot be swept"),
        ({"grid": ("data.x=1,2",)}, "must start with 'model.' or 'train.'"),
        ({"random": ("train.lr=0.1:0.01",)}, "LO < HI"),
        ({"grid": ("train.lr=0.01",), "seeds": 0}, "seeds must be at least 1"),
    ],
)
def test_bad_input_fails_before_any_training(fields, message):
    with pytest.raises(ConfigError, match=message):
        SweepConfig(preset="debug", **fields)


def test_the_command_line_refuses_bad_input_without_starting_a_flow(capsys):
    def must_not_run(**kwargs):
        raise AssertionError("the flow started")

    assert run_locally(["--preset", "debug", "--grid", "model.n_layers=1,2"], must_not_run) == 2
    assert "unknown setting 'model.n_layers'" in capsys.readouterr().err
    assert run_locally(["--preset", "debug"], must_not_run) == 2
    assert "search space is empty" in capsys.readouterr().err
    assert run_locally(["--preset", "debug", "--grid", "train.lr=0.01", "--budget-s", "0"], must_not_run) == 2
    assert "budget_s must be a positive number" in capsys.readouterr().err


# The ranking rule ------------------------------------------------------------------------------


def _result(point: int, seed: int, loss: float, lr: float) -> TrialResult:
    return TrialResult(
        name=f"t-p{point}-s{seed}",
        point=point,
        seed=seed,
        settings={"train.lr": lr},
        key=f"k{point}{seed}",
        mlflow_run_id=f"run-{point}-{seed}",
        val_loss=loss,
        val_bpc=loss / 0.6931471805599453,
        val_bpb=loss / 0.6931471805599453,
        steps=10,
        tokens=1000,
        tokens_per_s=100.0,
        train_seconds=10.0,
        elapsed_seconds=11.0,
        best_checkpoint=f"/runs/{point}-{seed}/best.pt",
        curve=(),
    )


def test_a_point_wins_only_beyond_the_spread_over_seeds():
    clear = [
        _result(0, 1, 1.50, 0.01),
        _result(0, 2, 1.52, 0.01),
        _result(1, 1, 1.70, 0.003),
        _result(1, 2, 1.72, 0.003),
    ]
    board = leaderboard(clear, ["train.lr"], "30 steps")
    first, second = board.rows
    assert (first.point, second.point) == (0, 1)
    assert first.val_loss == pytest.approx(1.51) and first.spread == pytest.approx(statistics.stdev([1.50, 1.52]))
    assert ahead(first, second) and board.winner == first
    assert first.verdict == "ahead of #2 beyond the spread" and second.verdict == "behind #1 beyond the spread"
    assert best_trial(board, clear).name == "t-p0-s1"  # the winner's lower-loss seed

    # The same means with seeds that disagree: the difference (0.2) is inside the spreads (about 0.28 together).
    noisy = [
        _result(0, 1, 1.41, 0.01),
        _result(0, 2, 1.61, 0.01),
        _result(1, 1, 1.61, 0.003),
        _result(1, 2, 1.81, 0.003),
    ]
    board = leaderboard(noisy, ["train.lr"], "30 steps")
    assert [row.point for row in board.rows] == [0, 1]
    assert board.winner is None and best_trial(board, noisy) is None
    assert board.rows[0].verdict == "not separated from #2" and board.rows[1].verdict == "within the spread of #1"
    assert "No winner" in board.markdown() and "Rule:" in board.markdown()

    # One seed: no spread, so no point is said to beat another.
    single = [_result(0, 1, 1.2, 0.01), _result(1, 1, 1.9, 0.003)]
    board = leaderboard(single, ["train.lr"], "30 steps")
    assert board.winner is None and board.rows[0].spread is None
    assert board.rows[0].verdict == "one seed: no spread to judge by"


# The flow ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory, prefect_api, mlflow_store):
    root = tmp_path_factory.mktemp("sweep")
    corpus = write_corpus(root / "corpus", seed=300)
    return root, {
        "preset": "debug",
        "sources": [str(corpus)],
        "data": DataConfig.from_dict({"encode": {"shard_tokens": 1 << 16}}),
        "max_steps": 40,
        "data_dir": str(root / "data"),
        "runs_dir": str(root / "runs"),
    }


def _child_runs(parent_run_id: str) -> list:
    from fundamentallm.tracking import client

    mlflow_client = client()
    parent = mlflow_client.get_run(parent_run_id)
    return mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )


@pytest.mark.flow
def test_a_grid_sweep_trains_every_trial_as_a_child_run_and_ranks_the_points(sweep_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.train_sweep import train_sweep
    from fundamentallm.tracking import client

    _root, common = sweep_env
    state = train_sweep(
        **common,
        grid=["train.lr=0.001,0.01", "model.d_model=16,32"],
        seeds=2,
        experiment="test-sweep-grid",
        register_best=True,
        model_name="test-sweep-char",
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()

    # One parent run, eight child runs: each trial's settings, curve and exact figures.
    mlflow_client = client()
    parent = mlflow_client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dataset_id"] == result["dataset_id"]
    experiment_runs = mlflow_client.search_runs([parent.info.experiment_id])
    assert len(experiment_runs) == 9
    children = _child_runs(parent.info.run_id)
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert child.data.params["train.max_steps"] == "40"
        assert {"val_loss", "val_bpc", "val_bpb"} <= child.data.metrics.keys()
        assert len(mlflow_client.get_metric_history(child.info.run_id, "train_loss")) >= 2  # a curve
    assert {(c.data.params["train.lr"], c.data.params["model.d_model"]) for c in children} == {
        ("0.001", "16"),
        ("0.001", "32"),
        ("0.01", "16"),
        ("0.01", "32"),
    }

    # The leaderboard: four points, each over two seeds, ordered by the children's own exact figures.
    board = result["leaderboard"]
    assert len(board["rows"]) == 4 and all(row["seeds"] == 2 and row["spread"] is not None for row in board["rows"])
    by_point: dict[str, list[float]] = {}
    for child in children:
        by_point.setdefault(child.data.tags["sweep.point"], []).append(child.data.metrics["val_loss"])
    means = sorted((statistics.fmean(losses), int(point)) for point, losses in by_point.items())
    assert [row["point"] for row in board["rows"]] == [point for _mean, point in means]
    for row, (mean, point) in zip(board["rows"], means, strict=True):
        assert row["val_loss"] == pytest.approx(mean, rel=1e-9)
        assert row["spread"] == pytest.approx(statistics.stdev(by_point[str(point)]), rel=1e-9)
    first, second = board["rows"][:2]
    separated = second["val_loss"] - first["val_loss"] > first["spread"] + second["spread"]
    assert board["winner"] == (first["point"] if separated else None)
    # register_best: the winner's lower-loss trial becomes a model version (nothing without a winner).
    if separated:
        winners = [c for c in children if c.data.tags["sweep.point"] == str(first["point"])]
        best = min(winners, key=lambda c: c.data.metrics["val_loss"])
        version = mlflow_client.get_model_version("test-sweep-char", result["registration"]["version"])
        assert version.run_id == best.info.run_id and result["registration"]["champion"] is True
    else:
        assert result["registration"] is None

    # The pictures and the table: in the parent run and on the flow run's page.
    artifacts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "sweep")}
    assert {
        "sweep/leaderboard.json",
        "sweep/leaderboard.md",
        "sweep/val-loss-over-time.png",
        "sweep/val-loss-by-setting.png",
    } <= artifacts
    png = Path(mlflow_client.download_artifacts(parent.info.run_id, "sweep/val-loss-over-time.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with get_client(sync_client=True) as prefect_client:
        flow_artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in flow_artifacts if a.key}
    table = by_key["leaderboard"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert len(table) == 4 and table[0]["val loss (mean)"] == round(first["val_loss"], 4)
    assert "val-loss-over-time.png" in by_key["sweep"].data and "Rule:" in by_key["sweep"].data

    # `fundamentallm leaderboard DATASET`: the best recorded runs of this dataset at this budget, as MLflow has them.
    from typer.testing import CliRunner

    from fundamentallm.cli import app

    shown = CliRunner().invoke(app, ["leaderboard", result["dataset_id"], "--top", "3", "--json"])
    assert shown.exit_code == 0, shown.output
    entries = json.loads(shown.stdout)
    by_bpc = sorted(children, key=lambda c: c.data.metrics["val_bpc"])
    assert [e["run_id"] for e in entries] == [c.info.run_id for c in by_bpc[:3]]
    assert {e["budget"] for e in entries} == {"40 steps"} and {e["kind"] for e in entries} == {"sweep trial"}
    assert entries[0]["swept"] == json.loads(by_bpc[0].data.tags["sweep.settings"])
    text = CliRunner().invoke(app, ["leaderboard", result["dataset_id"]]).stdout
    assert "budget 40 steps:" in text and by_bpc[0].info.run_name in text


@pytest.mark.flow
def test_a_failed_trial_is_recorded_and_a_rerun_trains_only_what_did_not_finish(sweep_env, capsys):
    from flows.train_sweep import train_sweep
    from fundamentallm.tracking import client

    root, common = sweep_env
    # The second point warm-starts from a checkpoint that is not there yet: that trial fails in its
    # own process, after the first finished.
    missing = root / "warm" / "start.pt"
    params = {
        **common,
        "data": DataConfig(),  # as the command line below has it: the same dataset id
        "grid": ["train.init_from=," + str(missing)],
        "seeds": 1,
        "experiment": "test-sweep-rerun",
    }
    state = train_sweep(**params, return_state=True)
    assert state.is_failed()
    assert "1 of 2 trials failed" in state.message and str(missing) in state.message

    mlflow_client = client()
    (parent,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("test-sweep-rerun").experiment_id],
        filter_string="attributes.run_name LIKE 'sweep-%'",
    )
    children = {c.data.tags["sweep.point"]: c for c in _child_runs(parent.info.run_id)}
    assert children["0"].info.status == "FINISHED"
    assert children["1"].info.status == "FAILED" and str(missing) in children["1"].data.tags["failure_reason"]
    assert parent.info.status == "FAILED"
    # The finished trial is still ranked in the failed sweep's leaderboard.
    board = json.loads(Path(mlflow_client.download_artifacts(parent.info.run_id, "sweep/leaderboard.json")).read_text())
    assert [row["point"] for row in board["rows"]] == [0] and len(board["failed"]) == 1

    # Provide the checkpoint and run the sweep again: the finished trial is reused, the failed one trains.
    saved = mlflow_client.download_artifacts(children["0"].info.run_id, "trial.json")
    best = json.loads(Path(saved).read_text())["best_checkpoint"]
    missing.parent.mkdir(parents=True)
    shutil.copy(best, missing)
    # This time through the local entry point (`python -m flows.train_sweep`), as a person would.
    argv = ["--preset", "debug", "--source", common["sources"][0], "--grid", params["grid"][0], "--seeds", "1"]
    argv += ["--max-steps", "40", "--experiment", "test-sweep-rerun", "--json"]
    argv += ["--data-dir", common["data_dir"], "--runs-dir", common["runs_dir"]]
    capsys.readouterr()
    assert run_locally(argv, train_sweep) == 0
    again = json.loads(capsys.readouterr().out)
    reused = {t["point"]: t["reused"] for t in again["trials"]}
    assert reused == {0: True, 1: False}
    assert again["trials"][0]["mlflow_run_id"] == children["0"].info.run_id
    assert len(again["leaderboard"]["rows"]) == 2 and again["leaderboard"]["failed"] == []
    new_children = _child_runs(again["mlflow_run_id"])
    assert len(new_children) == 1 and new_children[0].info.status == "FINISHED"


def test_the_readme_sweep_command_parses_into_the_sweep_it_describes():
    import re
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Compare settings fairly\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    sweep_line = next(line for line in block.splitlines() if "flows.train_sweep" in line)
    words = shlex.split(sweep_line.split("#", 1)[0])
    assert words[:3] == [".venv/bin/python", "-m", "flows.train_sweep"]
    seen = {}
    assert run_locally(words[3:], lambda **kwargs: seen.update(kwargs) or _fake_result()) == 0
    assert seen["preset"] == "cpu-quick" and seen["grid"] == ["train.muon_lr=0.01,0.02,0.04"]
    assert seen["seeds"] == 2 and seen["budget_s"] == 60.0
    assert SweepConfig(preset=seen["preset"], grid=tuple(seen["grid"]), seeds=2, budget_s=60.0).points()
    assert "fundamentallm leaderboard DATASET_ID" in block


def _fake_result() -> dict:
    board = leaderboard([_result(0, 1, 1.5, 0.01)], ["train.lr"], "60 s")
    return {"leaderboard": board.to_dict(), "trials": [], "mlflow_run_id": "r", "dataset_id": "d"}
