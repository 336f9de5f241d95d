"""The shipped optimization path on a CPU: bf16 autocast, channels_last and a compiled model inside the loops.

torch runs all three on a CPU, so this is the code a GPU run of configs/pillsnap.yaml executes. The compile is
traced by `aot_eager` (same dynamo graphs, recompiles and fallbacks; no code generation, which takes minutes per
model on 2 cores); one test compiles with inductor itself.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

from pillsnap.core.checkpoints import load_checkpoint
from pillsnap.train import SimulatedCrash
from pillsnap.infer.onnx_files import export_classifier_onnx
from pillsnap.models.classifier import load_classifier
from pillsnap.models.detector import load_detector_checkpoint
from pillsnap.train.services.oom_state_machine import AMP_FP16, GLOBAL_BATCH_CHANGE, MICROBATCHING
from tests.unit.train.support import RepeatedOom, assert_same_weights, final_weights, run

SHIPPED_PATH = ("optimization.amp=true", "optimization.amp_dtype=bf16", "optimization.channels_last=true",
                "optimization.torch_compile=reduce-overhead", "optimization.compile_backend=aot_eager")
CLASSIFIER = ("classifier",)  # the tests that follow one model's compiled graphs
SHORT = ("train.classification.epochs=1", "train.detection.epochs=1", "train.max_steps_per_epoch=3",
         "train.oom.cooldown_sec=0")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """dynamo keeps per-code-object state for the whole process: once one run saw a second batch size, every later
    compile of the same forward starts with a dynamic batch and never recompiles. Each test starts from none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _symbolic(example_inputs) -> bool:
    """A graph dynamo recompiled for a dynamic batch: its size arrives as a SymInt input (or a symbolic dim)."""
    return any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and
                                              any(isinstance(d, torch.SymInt) for d in x.shape))
               for x in example_inputs)


class RecordingBackend:
    """aot_eager, recording each graph dynamo hands it: whether its shapes are symbolic (dynamo recompiled for a
    second batch size). Graph breaks give several graphs per compile, so the count is of graphs, not compiles.
    `fail_on` raises instead, at the first graph matching it ("any" or "symbolic"): a compiler that breaks."""

    def __init__(self, fail_on: str = ""):
        self.graphs, self.fail_on = [], fail_on

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        symbolic = _symbolic(example_inputs)
        if self.fail_on == "any" or (self.fail_on == "symbolic" and symbolic):
            self.fail_on = ""
            raise RuntimeError("test backend: this graph does not compile")
        self.graphs.append(symbolic)
        return aot_eager(gm, example_inputs)


def test_interleaved_trains_bf16_channels_last_compiled_and_its_checkpoints_load_eagerly(
        make_config, tmp_path, tiny_stage):
    results = run(make_config, tmp_path, tiny_stage, "interleaved", *SHIPPED_PATH, *SHORT)
    assert set(results) == {"classifier", "detector"}
    for result in results.values():
        assert "device=cpu amp=bfloat16" in result.policy and "channels_last=True" in result.policy
        assert "compile=default backend=aot_eager" in result.policy and "needs CUDA graphs" in result.policy
        assert result.compile == "compiled" and result.global_step > 0
        assert torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
    # The compiled wrapper never reaches a checkpoint: plain module keys, loadable by an eager model.
    for model, weights in final_weights(tmp_path / "stage_1").items():
        assert not any("_orig_mod" in k for k in weights), model
    cfg = make_config(tmp_path)
    _, cmap = tiny_stage
    classifier, labels = load_classifier(cfg, results["classifier"].best_checkpoint, cmap)
    image = torch.rand(2, 3, cfg.classification.image_size, cfg.classification.image_size)
    assert classifier(image).shape == (2, len(labels))
    onnx = export_classifier_onnx(classifier, tmp_path / "c.onnx", cfg.classification.image_size, 17, True)
    assert onnx.stat().st_size > 0
    detector = load_detector_checkpoint(results["detector"].best_checkpoint)
    assert detector(torch.rand(1, 3, 64, 64)) is not None
    # ... and the reverse: an eager checkpoint warm-starts a compiled, channels_last run.
    init = {"classifier": results["classifier"].best_checkpoint, "detector": results["detector"].best_checkpoint}
    again = run(make_config, tmp_path / "warm", tiny_stage, "interleaved", *SHIPPED_PATH, *SHORT,
                init_checkpoints=init)
    assert all(r.compile == "compiled" for r in again.values())


def test_an_oom_walks_s1_s2_s3_with_the_compiled_model_recompiling_at_the_new_batch(
        make_config, tmp_path, tiny_stage):
    plain = RecordingBackend()
    policy_line = run(make_config, tmp_path / "plain", tiny_stage, "sequential", *SHIPPED_PATH, *SHORT,
                      compile_backend=plain, models=CLASSIFIER)["classifier"].policy
    assert plain.graphs and not any(plain.graphs)  # one batch size: static graphs only
    backend = RecordingBackend()
    # 3 OOMs at step 2: S1 (fp16 + GradScaler), S2 (bs 8 -> 4 x 2), S3 (max_grad_accum=2 reached: G 8 -> 4).
    result = run(make_config, tmp_path, tiny_stage, "sequential", *SHIPPED_PATH, *SHORT,
                 "train.oom.max_grad_accum=2", compile_backend=backend, models=CLASSIFIER,
                 injectors={"classifier": RepeatedOom(2, 3)})["classifier"]
    assert [e["action"] for e in result.oom_events] == [AMP_FP16, MICROBATCHING, GLOBAL_BATCH_CHANGE]
    assert result.oom_events[0]["autocast"] == "fp16 + GradScaler"
    assert result.compile == "compiled" and result.global_step >= 3 and "amp=bfloat16" in policy_line
    assert any(backend.graphs), "the micro-batch of 4 ran the graphs compiled for 8: no recompile seen"
    state = load_checkpoint(tmp_path / "stage_1/checkpoints/last.pt")["units"]["classifier"]
    assert json.loads(state["oom_state_json"])["amp_dtype"] == "fp16" and state["scaler"]["scale"] > 0


@pytest.mark.parametrize("when", ["any", "symbolic"], ids=["at-the-first-step", "after-the-s2-recompile"])
def test_a_compile_failure_falls_back_to_eager_once_and_replays_the_step(make_config, tmp_path, tiny_stage, caplog,
                                                                         when):
    oom = {"classifier": RepeatedOom(2, 2)}  # S1, then S2 (bs 8 -> 4 x 2): the recompile at step 2
    reference = run(make_config, tmp_path / "eager", tiny_stage, "sequential", *SHIPPED_PATH, *SHORT,
                    "optimization.torch_compile=none", injectors=oom, models=CLASSIFIER)["classifier"]
    oom = {"classifier": RepeatedOom(2, 2)}
    with caplog.at_level(logging.WARNING, logger="pillsnap.train.services.policy"):
        result = run(make_config, tmp_path, tiny_stage, "sequential", *SHIPPED_PATH, *SHORT,
                     compile_backend=RecordingBackend(fail_on=when), injectors=oom, models=CLASSIFIER)["classifier"]
    warnings = [r.getMessage() for r in caplog.records if "falling back to eager" in r.getMessage()]
    assert len(warnings) == 1 and "does not compile" in warnings[0]
    assert result.compile == "fell_back"
    # The failed step was replayed, not lost: the same steps, OOM decisions and finite losses as the eager run.
    assert result.global_step == reference.global_step
    assert [e["action"] for e in result.oom_events] == [e["action"] for e in reference.oom_events]
    assert len(result.history) == len(reference.history)
    assert torch.isfinite(torch.tensor([h["train_loss"] for h in result.history])).all()


def test_a_compiled_bf16_run_killed_mid_epoch_resumes_exactly(make_config, tmp_path, tiny_stage):
    # As in the eager resume test: the shipped single photos, mosaic in the first epoch and closed in the second.
    shipped = (*SHIPPED_PATH, "detection.include_single_images=true", "detection.close_mosaic_epochs=1")
    run(make_config, tmp_path / "a", tiny_stage, "interleaved", *shipped)
    with pytest.raises(SimulatedCrash):
        run(make_config, tmp_path / "b", tiny_stage, "interleaved", *shipped, "train.crash_at_step=5")
    resumed = run(make_config, tmp_path / "b", tiny_stage, "interleaved", *shipped, "train.crash_at_step=5")
    assert resumed["classifier"].resumed_from_step == 4 and resumed["classifier"].compile == "compiled"
    assert_same_weights(final_weights(tmp_path / "a/stage_1"), final_weights(tmp_path / "b/stage_1"))


@pytest.mark.slow
def test_inductor_compiles_the_classifier_step_on_a_cpu(make_config, tmp_path, tiny_stage):
    result = run(make_config, tmp_path, tiny_stage, "sequential", *SHIPPED_PATH[:-1], "train.classification.epochs=1",
                 "train.max_steps_per_epoch=2", models=CLASSIFIER)["classifier"]
    assert "backend=inductor" in result.policy and result.compile == "compiled" and result.global_step == 2
