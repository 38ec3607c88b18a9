"""The command line: the happy path, --help, and bad input that must fail cleanly."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import prose
from typer.testing import CliRunner

from fundamentallm import cli
from fundamentallm.cli import app, setting_options
from fundamentallm.config import DataConfig, EvalConfig, InspectConfig, RunConfig, SampleConfig
from fundamentallm.presets import preset

runner = CliRunner()


def prepare(*args: str):
    return runner.invoke(app, ["prepare", "--no-progress", "--no-data-docs", *args])


def leftovers(out: Path) -> list[str]:
    """Anything a failed run must not leave: shards, manifests, vocabularies, temporary files."""
    if not out.exists():
        return []
    names = ("manifest.json", "vocab.json")
    return [
        str(p)
        for p in out.rglob("*")
        if p.name in names
        or p.name.startswith(".tmp-")
        or (p.suffix == ".parquet" and p.parent.parent.name == "datasets")
    ]


@pytest.mark.parametrize("command", [[], ["prepare"], ["corpora"], ["config"]])
def test_help_on_every_command(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_prepare_prints_what_it_made_and_is_idempotent(corpus_dir, tmp_path):
    out = tmp_path / "out"
    args = [str(corpus_dir), "--out", str(out), "--context-length", "32", "--shard-tokens", "5000", "--json"]
    first = prepare(*args)
    assert first.exit_code == 0, first.output
    record = json.loads(first.output)
    assert record["documents"]["documents"] == 5
    assert record["dataset"]["reused"] is False
    assert sum(record["dataset"]["tokens"].values()) > 10_000
    second = json.loads(prepare(*args).output)
    assert second["dataset"]["reused"] is True
    assert second["dataset"]["manifest_path"] == record["dataset"]["manifest_path"]
    table = prepare(str(corpus_dir), "--out", str(out), "--context-length", "32")
    assert table.exit_code == 0
    for word in ("documents", "vocabulary", "tokens", "shards", "dataset"):
        assert word in table.output


def test_settings_from_file_and_overrides(corpus_dir, tmp_path):
    settings = tmp_path / "data.json"
    settings.write_text(
        json.dumps({"encode": {"split": "hash", "train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2}})
    )
    result = prepare(
        str(corpus_dir),
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(settings),
        "--context-length",
        "16",
        "--json",
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path(json.loads(result.output)["dataset"]["manifest_path"]).read_text())
    assert manifest["config"]["split"] == "hash"
    bad = prepare(str(corpus_dir), "--set", "encode.shard_size=3")
    assert bad.exit_code == 2 and "unknown setting 'encode.shard_size'" in bad.output
    bad = prepare(str(corpus_dir), "--splits", "0.5,0.1")
    assert bad.exit_code == 2 and "must add up to 1" in bad.output


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _binary_dir(root: Path) -> Path:
    root.mkdir()
    (root / "a.bin").write_bytes(b"\x7fELF\x00\x00binary")
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return root


BAD_INPUTS = {
    "missing path": (lambda tmp: tmp / "nope.txt", r"nope\.txt: no such file or directory"),
    "empty file": (lambda tmp: _write(tmp / "empty.txt", b""), r"empty\.txt: empty file"),
    "empty directory": (lambda tmp: (tmp / "void").mkdir() or tmp / "void", r"void: directory holds no files"),
    "only binary files": (
        lambda tmp: _binary_dir(tmp / "bins"),
        r"no usable text in .*a\.bin: binary file \(NUL byte at offset 4\).*b\.png: binary file",
    ),
    "invalid utf-8": (
        lambda tmp: _write(tmp / "latin.txt", b"na\xefve " + prose(1).encode()),
        r"latin\.txt: invalid UTF-8 at byte offset 2",
    ),
    "too small for the context": (
        lambda tmp: _write(tmp / "short.txt", b"a short text\n"),
        r"1 of 12 expectations failed:.*context_length \+ 1 = 257",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_nonzero_with_one_clear_message_and_leaves_nothing(case, tmp_path):
    make, pattern = BAD_INPUTS[case]
    source = make(tmp_path)
    out = tmp_path / "out"
    result = prepare(str(source), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    assert re.search(pattern, result.output, re.DOTALL), result.output
    assert leftovers(out) == []


@pytest.mark.heavy
def test_console_script_runs_as_installed(corpus_dir, tmp_path):
    """The `fundamentallm` entry point in a real process, as a user runs it."""
    script = Path(sys.executable).with_name("fundamentallm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fundamentallm.cli"]
    proc = subprocess.run(
        [*command, "prepare", str(corpus_dir), "--out", str(tmp_path / "o"), "--context-length", "32", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["validation"]["success"] is True
    proc = subprocess.run([*command, "prepare", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"


def test_corpora_and_config_listings():
    listing = runner.invoke(app, ["corpora"])
    assert all(name in listing.output for name in ("default", "tinyshakespeare", "enwik8"))
    settings = runner.invoke(app, ["config"])
    names = ("encode.shard_tokens", "ingest.encoding_policy", "ingest.part_bytes", "encode.train_bytes")
    assert all(name in settings.output for name in names)


def test_directory_filters_and_hash_split_from_the_command_line(corpus_dir, tmp_path):
    (corpus_dir / "skip.md").write_text(prose(7))
    for i in range(10, 30):
        (corpus_dir / f"more{i}.txt").write_text(prose(i, 60))
    result = prepare(
        str(corpus_dir),
        "--include",
        "*.txt",
        "--exclude",
        "sub",
        "--split",
        "hash",
        "--splits",
        "0.5,0.25,0.25",
        "--context-length",
        "8",
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["documents"]["documents"] == 24  # doc0..3 and more10..29: skip.md not included, sub/ excluded
    manifest = json.loads(Path(record["dataset"]["manifest_path"]).read_text())
    assert manifest["config"]["split"] == "hash" and manifest["config"]["val_fraction"] == 0.25


def test_error_messages_with_brackets_are_printed_as_they_are(tmp_path):
    result = prepare("--out", str(tmp_path / "o"), "--set", "encode.split=[1]")
    assert result.exit_code == 2
    assert "got [1]" in result.output


def _commands() -> dict[str, tuple[typer.models.CommandInfo, object]]:
    """Command name -> (its typer registration, its click command)."""
    group = typer.main.get_command(app)
    found = {}
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        found[name] = (info, group.commands[name])
    return found


def test_options_that_are_settings_take_their_default_and_help_from_the_setting():
    declared = {name: setting_options(info.callback) for name, (info, _) in _commands().items()}
    assert {s.key for s in declared["sample"].values()} == {f.name for f in dataclasses.fields(SampleConfig)}
    assert {s.key for s in declared["inspect"].values()} == {f.name for f in dataclasses.fields(InspectConfig)} - {
        "batch_size"
    }
    assert {s.key for s in declared["evaluate"].values()} == {f.name for f in dataclasses.fields(EvalConfig)} - {
        "batch_size"
    }
    assert {s.key for s in declared["train"].values()} == {
        "train.max_steps",
        "train.device",
        "train.precision",
        "train.compile",
        "train.processes",
        "train.init_from",
    }
    assert {s.key for s in declared["prepare"].values()} == {
        "ingest.include",
        "ingest.exclude",
        "ingest.encoding_policy",
        "encode.split",
        "encode.shard_tokens",
    }
    for command, settings in declared.items():
        params = {p.name: p for p in _commands()[command][1].params}
        for name, setting in settings.items():
            default, text = next((d, t) for key, _, d, t in setting.config.describe() if key == setting.key)
            option = params[name]
            assert text and text in option.help, (command, name)
            flags = {part for flag in setting.flags for part in flag.split("/")}  # --compile/--no-compile
            assert flags == {*option.opts, *option.secondary_opts}, (command, name)
            if command in ("sample", "inspect", "evaluate"):  # the option's value is the setting's value
                assert option.default == default, (command, name)
            else:  # leaving the option out leaves the preset or settings file alone
                assert option.default is None, (command, name)


def test_sample_options_left_out_give_the_default_sampling_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_sampler", lambda checkpoint, device: None)
    monkeypatch.setattr(cli, "_stream", lambda sampler, prompt, config: seen.append(config))
    assert runner.invoke(app, ["sample", "model.pt"]).exit_code == 0
    args = ["sample", "model.pt", "-n", "7", "-t", "0", "--top-k", "3", "--stop", "a", "--stop", "bc"]
    assert runner.invoke(app, [*args, "--unknown", "unk"]).exit_code == 0
    assert seen == [
        SampleConfig(),
        SampleConfig(max_new_tokens=7, temperature=0.0, top_k=3, stop=("a", "bc"), unknown="unk"),
    ]


def test_config_lists_every_setting_a_user_can_set_and_which_command_takes_it():
    table = runner.invoke(app, ["config"])
    assert table.exit_code == 0, table.output
    for name in ("encode.shard_tokens", "train.lr", "model.n_layer", "temperature", "--max-new-tokens"):
        assert name in table.output

    rows = json.loads(runner.invoke(app, ["config", "--json"]).output)
    listed = {(row["command"], row["setting"]): row for row in rows}
    assert {name for command, name in listed if command == "prepare"} == {n for n, *_ in DataConfig.describe()}
    assert {name for command, name in listed if command == "train"} == {n for n, *_ in RunConfig.describe()}
    assert {name for command, name in listed if command == "sample"} == {n for n, *_ in SampleConfig.describe()}
    assert {name for command, name in listed if command == "evaluate"} == {n for n, *_ in EvalConfig.describe()}
    assert {name for command, name in listed if command == "inspect"} == {n for n, *_ in InspectConfig.describe()}
    assert listed["evaluate", "protocol"]["options"] == ["--protocol"]
    assert listed["evaluate", "stride"]["default"] is None
    assert listed["inspect", "chars"]["options"] == ["--chars"] and listed["inspect", "chars"]["default"] == 3000
    shard_tokens = listed["prepare", "encode.shard_tokens"]
    assert shard_tokens["default"] == 1 << 24 and shard_tokens["options"] == ["--shard-tokens"]
    assert shard_tokens["type"] == "int" and "Tokens per Parquet shard" in shard_tokens["help"]
    assert listed["sample", "temperature"]["default"] == 0.8
    assert listed["sample", "temperature"]["options"] == ["--temperature", "-t"]
    assert listed["train", "train.lr"]["options"] == []  # --set train.lr=... only
    # train starts from a preset: its values are the defaults, the `train` command's preset unless told
    assert listed["train", "model.n_layer"]["default"] == preset("cpu-small").model.n_layer
    debug = json.loads(runner.invoke(app, ["config", "--json", "--preset", "debug"]).output)
    assert next(r for r in debug if r["setting"] == "model.n_layer")["default"] == preset("debug").model.n_layer == 2
