"""Prefect flows: data preparation, stage, progressive (scheduled), final test."""
