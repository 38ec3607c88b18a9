"""Prefect flows: wiring of tasks only; the work is done in `fundamentallm`."""
