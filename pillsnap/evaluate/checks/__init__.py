"""Stage checks: the registry (registry.py: name -> definition + measurement) and the evidence a stage run left
(evidence.py: what the measurements read, from the run's own artifacts)."""
