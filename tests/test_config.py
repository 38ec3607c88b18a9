import dataclasses
import json

import pytest

from fundamentallm.config import (
    DataConfig,
    EncodeConfig,
    IngestConfig,
    RunConfig,
    ValidationConfig,
    flatten,
    load_config_file,
    parse_override,
)
from fundamentallm.errors import ConfigError


def test_defaults_build_and_round_trip():
    config = DataConfig()
    assert DataConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_every_setting_has_a_description():
    rows = list(DataConfig.describe())
    assert len(rows) > 20
    for name, _type, _default, text in rows:
        assert text, f"{name} has no help text"


def test_unknown_keys_are_refused_with_the_known_ones_listed():
    with pytest.raises(ConfigError, match=r"unknown setting shard_size in DataConfig\.encode; known: .*shard_tokens"):
        DataConfig.from_dict({"encode": {"shard_size": 10}})
    with pytest.raises(ConfigError, match="unknown setting"):
        DataConfig.from_dict({"trian": {}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"encode": {"shard_tokens": "many"}}, "must be an integer"),
        ({"encode": {"shard_tokens": True}}, "must be an integer"),
        ({"encode": {"split": "random"}}, "must be one of 'contiguous', 'hash'"),
        ({"encode": {"train_fraction": 0.8}}, "must add up to 1"),
        ({"encode": {"train_fraction": 0.95, "val_fraction": 0.0, "test_fraction": 0.05}}, "val_fraction must be"),
        ({"encode": {"shard_tokens": 0}}, "shard_tokens must be at least 1"),
        ({"ingest": {"sources": []}}, "must name at least one source"),
        ({"ingest": {"sources": "file.txt"}}, "must be a list"),
        ({"ingest": {"encoding_policy": "lenient"}}, "must be one of"),
        ({"validation": {"max_control_share": 1.5}}, r"must be in \[0, 1\]"),
        ({"validation": {"min_documents": 0}}, "min_documents must be at least 1"),
        ({"validation": {"max_charset_size": 1}}, "must be at least min_charset_size"),
    ],
)
def test_bad_values_fail_at_construction(data, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_dict(data)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"dropout": 1.0}, r"ModelConfig\.dropout must be in \[0, 1\); got 1\.0"),
        ({"attention_dropout": 1.0}, r"ModelConfig\.attention_dropout must be in \[0, 1\) or None; got 1\.0"),
        ({"attention_dropout": -0.1}, r"ModelConfig\.attention_dropout must be in \[0, 1\) or None; got -0\.1"),
        ({"attention_dropout": "high"}, "attention_dropout must be a number"),
    ],
)
def test_bad_dropout_rates_fail_at_construction_naming_the_setting(model, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"model": model})
    assert RunConfig.from_dict({"model": {"attention_dropout": None}}).model.attention_dropout is None


def test_configs_are_frozen():
    config = EncodeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.shard_tokens = 5  # type: ignore[misc]


def test_lists_become_tuples_and_ints_become_floats():
    config = IngestConfig.from_dict({"sources": ["a", "b"], "max_binary_control_share": 1})
    assert config.sources == ("a", "b")
    assert isinstance(config.max_binary_control_share, float)


def test_dotted_overrides():
    config = DataConfig().with_overrides({"encode.shard_tokens": 99, "validation.min_documents": 8})
    assert config.encode.shard_tokens == 99
    assert config.validation.min_documents == 8
    with pytest.raises(ConfigError, match=r"'validation\.context_length' was removed: .*--context-length"):
        DataConfig().with_overrides({"validation.context_length": 64})
    with pytest.raises(ConfigError, match=r"unknown setting 'encode\.nope'"):
        DataConfig().with_overrides({"encode.nope": 1})
    with pytest.raises(ConfigError, match="unknown setting"):
        DataConfig().with_overrides({"nope.shard_tokens": 1})


def test_flatten_gives_the_dotted_keys_overrides_take():
    nested = {"encode": {"shard_tokens": 99, "split": "hash"}, "ingest": {"sources": ["a"]}, "validation": {}}
    flat = flatten(nested)
    assert flat == {"encode.shard_tokens": 99, "encode.split": "hash", "ingest.sources": ["a"]}
    assert DataConfig().with_overrides(flat) == DataConfig.from_dict(nested)


def test_digest_tracks_content():
    assert EncodeConfig().digest() == EncodeConfig().digest()
    assert EncodeConfig().digest() != EncodeConfig(shard_tokens=7).digest()


def test_parse_override():
    assert parse_override("encode.shard_tokens=12") == ("encode.shard_tokens", 12)
    assert parse_override("encode.split=hash") == ("encode.split", "hash")
    assert parse_override('ingest.sources=["a","b"]') == ("ingest.sources", ["a", "b"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("encode.split")


def test_config_files(tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text('[encode]\nsplit = "hash"\n[validation]\nmin_documents = 3\n')
    config = DataConfig.from_dict(load_config_file(toml))
    assert config.encode.split == "hash"
    assert config.validation == ValidationConfig(min_documents=3)
    toml.write_text("[validation]\ncontext_length = 64\n")  # a settings file from before the setting moved
    with pytest.raises(ConfigError, match=r"validation\.context_length was removed: .*--context-length"):
        DataConfig.from_dict(load_config_file(toml))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.json")
