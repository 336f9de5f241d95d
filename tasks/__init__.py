"""Prefect tasks: thin wrappers (retries, cache policy, artifacts) around library calls."""
