"""What a retraining run needs to know about the champion, before training and after.

Before training (`look_before_training`), once the corpus is ingested:

- **whether to train**: with ``retrain = "on-change"``, a run whose corpus hash and training
  settings (`training_digest`) equal those the champion was trained with has nothing to do;
- **how the corpus drifted** since the champion's (`fundamentallm.drift`), from the ingestion
  report kept with the champion's MLflow run;
- **the champion's checkpoint**, downloaded now so that a champion that cannot be read fails
  the run before any training, not after it;
- **the warm-start source** (``init_from``: a registered model or a checkpoint file), checked
  against the model to train (same shape but for the vocabulary) before any training.

After training (`compare_with_champion`): the champion scored on the challenger's validation
(and test) data with the same exact evaluator, whatever data it was trained on, so the
promotion rule compares figures on the same characters (`fundamentallm.registry.Comparison`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fundamentallm.config import EncodeConfig, ModelConfig, RunConfig
from fundamentallm.drift import DriftReport, corpus_drift
from fundamentallm.errors import CheckpointError, RegistryError
from fundamentallm.fsutil import sha256_json
from fundamentallm.registry import Comparison, champion_version, download_checkpoint

INGEST_REPORT_ARTIFACT = "data/ingest-report.json"
"""Where each pipeline run keeps its corpus's ingestion report in MLflow (the drift report reads it)."""


def training_digest(run_config: RunConfig, encode: EncodeConfig, init_from: str | None) -> str:
    """A digest of everything that shapes training besides the corpus: the model and training
    settings, the split and encoding settings, and the warm-start source. Two runs with the same
    corpus hash and digest train the same model."""
    from fundamentallm.data.encode import output_settings

    return sha256_json({"run": run_config.to_dict(), "encode": output_settings(encode), "init_from": init_from or ""})


@dataclass(frozen=True)
class ChampionRef:
    """The champion a run starts from: which version, what it was trained on, its checkpoint here."""

    model_name: str
    version: str
    run_id: str
    dataset_id: str | None
    corpus_hash: str | None
    training_digest: str | None
    checkpoint: str

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


@dataclass(frozen=True)
class WarmStartSource:
    """Where a warm-started run takes its weights from."""

    source: str
    """What the user named (``models:/...`` or a checkpoint path)."""
    checkpoint: str
    """The checkpoint file on this machine."""
    parent_model: str | None = None
    parent_version: str | None = None


@dataclass(frozen=True)
class RetrainPlan:
    """The decision to train or not, and what training starts from."""

    retrain: bool
    reason: str
    champion: ChampionRef | None = None
    drift: DriftReport | None = None
    warm_start: WarmStartSource | None = None

    def training_config(self, run_config: RunConfig) -> RunConfig:
        """`run_config` with the warm-start checkpoint filled in."""
        if self.warm_start is None:
            return run_config
        return replace(run_config, train=replace(run_config.train, init_from=self.warm_start.checkpoint))

    def markdown(self) -> str:
        lines = ["# Retraining\n", f"**{'Training' if self.retrain else 'Skipped'}**: {self.reason}\n"]
        if self.champion is not None:
            lines.append(f"Champion: `{self.champion.uri}` (MLflow run `{self.champion.run_id}`)\n")
        if self.warm_start is not None:
            lines.append(f"Warm start from `{self.warm_start.source}`\n")
        if self.drift is not None:
            lines.append(self.drift.markdown())
        return "\n".join(lines)


def look_before_training(
    tracker: Any,
    *,
    model_name: str,
    retrain: str,
    corpus_hash: str,
    digest: str,
    ingest_report: dict[str, Any],
    model: ModelConfig,
    init_from: str | None,
) -> RetrainPlan:
    """Find the champion of `model_name` and decide whether to train (see the module docstring).

    Raises `RegistryError` or `CheckpointError`, naming the model or file, when the champion or
    the warm-start source cannot be read or does not fit.
    """
    current = champion_version(tracker.client, model_name)
    if current is None:
        reason = f"no champion of {model_name} yet"
        return RetrainPlan(True, reason, warm_start=resolve_warm_start(init_from, model))
    tags = current.tags
    same_corpus = tags.get("corpus_hash") == corpus_hash
    same_settings = tags.get("training_digest") == digest
    where = f"champion version {current.version} of {model_name}"
    if retrain == "on-change" and same_corpus and same_settings:
        reason = (
            f"the corpus ({corpus_hash[:16]}) and the training settings are those {where} was trained with: "
            "nothing to retrain, nothing registered"
        )
        return RetrainPlan(False, reason, champion=_reference(current, model_name, checkpoint=""))
    changed = [
        what for what, same in (("the corpus", same_corpus), ("the training settings", same_settings)) if not same
    ]
    if retrain == "always":
        reason = f"retrain is 'always' ({' and '.join(changed) or 'nothing'} changed since {where})"
    else:
        reason = f"{' and '.join(changed)} changed since {where} was trained"
    try:
        checkpoint = download_checkpoint(f"models:/{model_name}/{current.version}")
    except (RegistryError, CheckpointError) as exc:
        raise RegistryError(
            f"{where} cannot be read, so this run could not be compared with it ({exc}); repair or delete that "
            "version, or move the champion alias, before retraining"
        ) from exc
    champion = _reference(current, model_name, checkpoint=str(checkpoint))
    drift = _drift(champion, ingest_report)
    return RetrainPlan(True, reason, champion, drift, resolve_warm_start(init_from, model))


def _reference(version: Any, model_name: str, checkpoint: str) -> ChampionRef:
    return ChampionRef(
        model_name=model_name,
        version=str(version.version),
        run_id=version.run_id,
        dataset_id=version.tags.get("dataset_id"),
        corpus_hash=version.tags.get("corpus_hash"),
        training_digest=version.tags.get("training_digest"),
        checkpoint=checkpoint,
    )


def _drift(champion: ChampionRef, ingest_report: dict[str, Any]) -> DriftReport | None:
    """The drift since the champion's corpus; None when its run kept no ingestion report (an older run)."""
    from fundamentallm.tracking import download_artifacts

    try:
        old = json.loads(download_artifacts(f"runs:/{champion.run_id}/{INGEST_REPORT_ARTIFACT}").read_text("utf-8"))
    except RegistryError:
        return None
    return corpus_drift(old, ingest_report)


def resolve_warm_start(init_from: str | None, model: ModelConfig) -> WarmStartSource | None:
    """The checkpoint a warm start loads, fetched and checked against the model to train.

    A registered model (``models:/name@alias``, ``models:/name/3``) is downloaded; a file or URL
    is read. Its model must match `model` but for the vocabulary (`CheckpointError` naming each
    difference otherwise).
    """
    if not init_from:
        return None
    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.warmstart import check_source

    parent_model = parent_version = None
    if init_from.startswith("models:/"):
        from fundamentallm.tracking import model_version

        parent_model, parent_version, _ = model_version(init_from)
        checkpoint = str(download_checkpoint(f"models:/{parent_model}/{parent_version}"))
    else:
        checkpoint = init_from
    source = load_checkpoint(checkpoint)
    check_source(source.config.model, model, init_from)
    return WarmStartSource(init_from, checkpoint, parent_model, parent_version)


def compare_with_champion(
    current: Any | None,
    plan: RetrainPlan,
    *,
    dataset_path: str,
    dataset_id: str,
    figures: dict[str, dict[str, Any]],
    margin_bpc: float,
) -> Comparison:
    """The challenger (`figures`: its exact evaluation, by split) against the champion `current`,
    on the challenger's data: the champion is scored afresh there with the same evaluator, unless
    its recorded figure is already that (same dataset, same evaluator version)."""
    from fundamentallm.evaluate import EVALUATOR_VERSION, evaluate

    val, test = figures["val"], figures.get("test")
    base = Comparison(
        challenger_val_bpc=val["bits_per_char"],
        challenger_dataset=dataset_id,
        challenger_test_bpc=test["bits_per_char"] if test else None,
        challenger_unknown=val["unknown_characters"],
        margin_bpc=margin_bpc,
    )
    if current is None:
        return base
    tags = current.tags
    base = replace(base, champion_version=str(current.version), champion_dataset=tags.get("dataset_id"))
    if tags.get("dataset_id") == dataset_id and tags.get("evaluator") == str(EVALUATOR_VERSION):
        recorded_test = tags.get("test_bpc")
        return replace(
            base,
            champion_val_bpc=float(tags["val_bpc"]),
            champion_test_bpc=float(recorded_test) if recorded_test and test else None,
            champion_unknown=int(tags["unknown_chars"]) if "unknown_chars" in tags else None,
        )
    if plan.champion is not None and plan.champion.version == str(current.version) and plan.champion.checkpoint:
        checkpoint = plan.champion.checkpoint
    else:  # the champion moved since this run looked: read the new one
        checkpoint = str(download_checkpoint(f"models:/{current.name}/{current.version}"))
    on_val = evaluate(checkpoint, dataset_path, "val", other_vocabulary=True)
    on_test = evaluate(checkpoint, dataset_path, "test", other_vocabulary=True) if test else None
    return replace(
        base,
        champion_val_bpc=on_val.bits_per_char,
        champion_test_bpc=on_test.bits_per_char if on_test else None,
        champion_unknown=on_val.unknown_characters,
        rescored=True,
    )
