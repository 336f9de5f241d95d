"""The shipped optimization path on a CPU: bf16 autocast, channels_last and a compiled model inside the loops.

torch runs all three on a CPU, so this is the code a GPU run of configs/pillsnap.yaml executes. The compile is
traced by `aot_eager` (same dynamo graphs, recompiles and fallbacks; no code generation, which takes minutes per
model on 2 cores); one test compiles with inductor itself.
"""
from __future__ import annotations

import logging

import pytest
import torch

from pillsnap.core.checkpoints import load_checkpoint
from pillsnap.infer.onnx_files import export_classifier_onnx
from pillsnap.models.classifier import load_classifier
from pillsnap.models.detector import load_detector_checkpoint
from pillsnap.train.services.oom import AMP_FP16, GLOBAL_BATCH_CHANGE, MICROBATCHING
from tests.unit.train.support import RepeatedOom, final_weights, run

SHIPPED_PATH = ("optimization.amp=true", "optimization.amp_dtype=bf16", "optimization.channels_last=true",
                "optimization.torch_compile=reduce-overhead", "optimization.compile_backend=aot_eager")
SHORT = ("train.classification.epochs=1", "train.detection.epochs=1", "train.max_steps_per_epoch=3",
         "train.oom.cooldown_sec=0")


class CountingBackend:
    """aot_eager, counting the graphs dynamo handed it (graph breaks included, so not a recompile count)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.calls += 1
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


def test_an_oom_walks_s1_s2_s3_with_the_compiled_model_and_finishes(make_config, tmp_path, tiny_stage):
    backend = CountingBackend()
    policy_line = run(make_config, tmp_path / "plain", tiny_stage, "sequential", *SHIPPED_PATH, *SHORT,
                      compile_backend=CountingBackend())["classifier"].policy
    # 3 OOMs at step 2: S1 (fp16 + GradScaler), S2 (bs 8 -> 4 x 2), S3 (max_grad_accum=2 reached: G 8 -> 4).
    result = run(make_config, tmp_path, tiny_stage, "sequential", *SHIPPED_PATH, *SHORT,
                 "train.oom.max_grad_accum=2", compile_backend=backend,
                 injectors={"classifier": RepeatedOom(2, 3)})["classifier"]
    assert [e["action"] for e in result.oom_events] == [AMP_FP16, MICROBATCHING, GLOBAL_BATCH_CHANGE]
    assert result.oom_events[0]["autocast"] == "fp16 + GradScaler"
    assert result.compile == "compiled" and result.global_step >= 3 and "amp=bfloat16" in policy_line
    assert backend.calls >= 1  # the compiled path ran; whether S2/S3 recompile is not shown here
    state = load_checkpoint(tmp_path / "stage_1/checkpoints/last.pt")
    assert state["units"]["classifier"]["amp"] == "fp16" and state["units"]["classifier"]["scaler"]["scale"] > 0


@pytest.mark.slow
def test_inductor_compiles_the_classifier_step_on_a_cpu(make_config, tmp_path, tiny_stage):
    result = run(make_config, tmp_path, tiny_stage, "sequential", *SHIPPED_PATH[:-1], "train.classification.epochs=1",
                 "train.max_steps_per_epoch=2")["classifier"]
    assert "backend=inductor" in result.policy and result.compile == "compiled" and result.global_step == 2
