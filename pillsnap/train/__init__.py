"""Training, built from parts (see ARCHITECTURE.md):

  units/     one unit per model (classifier, detector): model, loss, optimizer, schedule, scaler, EMA, state
  loops/     thin loops that drive units: engine (sequential = the classifier alone, interleaved = both, d:c),
             ultralytics (the sequential detector on ultralytics' trainer), streams (sample-exact data streams)
  services/  what every loop shares: OOM state machine + guard, checkpointer (one "improved?" rule), the one LR
             schedule, telemetry (D-10 line, Annex 7 tags), health monitors, precision/compile policy
  tuning/    auto batch (Annex 1) and worker autotune (Annex 2) for both models
  setup/     stage settings (D-13) and pre-training checks

What the orchestration tasks call is re-exported here.
"""
from pillsnap.train.loops.engine import SimulatedCrash
from pillsnap.train.loops.interleaved import train_interleaved
from pillsnap.train.loops.sequential import train_classifier
from pillsnap.train.loops.ultralytics import train_detector_sequential as train_detector
from pillsnap.train.results import TrainResult
from pillsnap.train.setup.prechecks import run_prechecks
from pillsnap.train.setup.stage_settings import stage_config
from pillsnap.train.tuning.plans import tune_batch, tune_workers

__all__ = ["SimulatedCrash", "TrainResult", "run_prechecks", "stage_config", "train_classifier", "train_detector",
           "train_interleaved", "tune_batch", "tune_workers"]
