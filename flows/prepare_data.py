"""The `prepare-data` flow: ingest -> validate -> encode."""

from __future__ import annotations

from prefect import flow

from fundamentallm.config import DataConfig
from tasks.data import encode_task, ingest_task, validate_task


@flow(name="prepare-data")
def prepare_data(config: DataConfig = DataConfig(), out_dir: str = "data") -> dict:  # noqa: B008 (frozen, immutable)
    """Turn corpus sources into a validated, encoded dataset; returns the dataset record."""
    documents = ingest_task(config.ingest, out_dir)
    validation = validate_task(documents, config.validation, config.encode, out_dir)
    dataset = encode_task(
        documents, config.encode, out_dir, config.validation.context_length + 1, wait_for=[validation]
    )
    return dataset.to_dict()


if __name__ == "__main__":
    prepare_data()
