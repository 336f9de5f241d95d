"""Metric arithmetic (numpy only): classification and detection scores. No models, no files."""
