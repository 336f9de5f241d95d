"""Training, built from parts (see docs/architecture.md):

  run.py     train_stage: the stage's models as members of ONE loop, whatever the strategy
  units/     one unit per model (classifier, detector): model, loss, optimizer, schedule, scaler, EMA, OOM state
  loops/     the loop (engine: sequential = one model after the other, interleaved = d:c steps), its members,
             sample-exact data streams
  services/  what every model shares: OOM state machine + step guard, checkpoint policy (one "improved?" rule),
             early stopping, the one LR schedule, telemetry (D-10 line, Annex 7 tags), health monitors,
             precision/compile policy
  tuning/    auto batch (Annex 1) and worker autotune (Annex 2) for both models
  setup/     stage settings (D-13) and pre-training checks

What the orchestration tasks call is re-exported here.
"""
from pillsnap.train.loops.engine import SimulatedCrash
from pillsnap.train.results import TrainResult
from pillsnap.train.run import stage_models, train_stage
from pillsnap.train.preflight import run_preflight
from pillsnap.train.stage_settings import stage_config
from pillsnap.train.tuning.plans import tune_batch, tune_workers

__all__ = ["SimulatedCrash", "TrainResult", "run_preflight", "stage_config", "stage_models", "train_stage",
           "tune_batch", "tune_workers"]
