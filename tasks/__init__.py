"""Prefect tasks: each a thin wrapper over one library function, passing small records on."""
