"""The data stage: ingest corpus sources, validate them, encode them into Parquet shards."""
