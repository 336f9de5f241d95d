"""The stage-check registry: every configured name is measured from evidence, nothing passes by default."""
import copy

import pytest

from pillsnap.config import load_config
from pillsnap.evaluate.checks.registry import (ATTESTED, DEFINITIONS, FAIL, NOT_APPLICABLE, NOT_MEASURED, PASS,
                                               REGISTRY, STEP_TAGS, UNATTESTED, VAL_TAGS, StageEvidence,
                                               read_tensorboard_tags, run_checks)



@pytest.fixture(scope="module")
def cfg():
    return load_config()


def _epochs(n=3, rss=(500.0, 520.0, 530.0), throughput=(90.0, 100.0, 98.0), share=0.1, gpu=None):
    return [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "monitor": 0.5 + 0.1 * i, "steps": 10, "samples": 320,
             "throughput_img_s": throughput[i], "data_time_s": 0.01, "compute_time_s": 0.09, "data_share": share,
             "host_private_mb": rss[i], "gpu_peak_mb": None if gpu is None else gpu[i]} for i in range(n)]


def _probed_plan():
    return {"probed": True, "device": "cpu (host memory)", "batch_size": 8, "memory_fraction": 0.05,
            "probes": [[8, 400_000_000]], "reasons": ["cpu: host memory probed"]}


def _train(model):
    return {"model": model, "epochs_completed": 3, "epochs_planned": 3, "stopped_early": False, "best_metric": 0.7,
            "monitor": "macro_f1", "oom_events": [], "resumed_from_step": None, "tensorboard": "tb",
            "auto_batch": _probed_plan(),
            "data": {"pixel_cache": {"samples": 100, "cached": 100, "store": 1}} if model == "classifier" else {},
            "epochs": _epochs()}


def _tag(values=5, lo=0.1, hi=0.9):
    return {"values": values, "min": lo, "max": hi}


K_CODES = [f"K-{i:06d}" for i in range(50)]


def good_evidence(stage=1):
    tags = {m: {t: _tag() for t in (*STEP_TAGS, "perf/host_mem", *VAL_TAGS[m])} for m in ("classifier", "detector")}
    return StageEvidence(
        stage=stage,
        subset={"imbalance_ratio": 1.5, "per_class_train_min": 10, "per_class_train_max": 15, "classes": 50,
                "images_requested": 500, "train_single": 500, "train_k_codes": list(K_CODES)},
        manifest={"classes": 50, "usable_classes": list(K_CODES), "usable_photos": 700, "lost": {}},
        train={"classifier": _train("classifier"), "detector": _train("detector")},
        evaluation={"checkpoint": "best.pt", "n": 200, "logits_finite": True,
                    "multi_batch": {"photos": 64, "batch_size": 32, "flips": 0, "top1_agreement": 1.0,
                                    "max_logit_diff": 1e-6}},
        detector_probe={"loaded": True, "output_finite": True},
        export={"ok": True, "classifier": {"exported": True, "path": "c.onnx"},
                "detector": {"exported": True, "path": "d.onnx"}},
        api={"deployed": True, "requests": 48, "errors": 0, "p95_ms": 20.0,
             "monitoring": {"answered": 49, "requests": 49, "latency_observations": 49, "ok": True}},
        tensorboard=tags)


def statuses(cfg, evidence, attestations=None):
    return {name: r.status for name, r in run_checks(cfg, evidence, attestations).items()}


KIM = {"confirmed": True, "reviewer": "pharmacist kim", "at": "2026-12-02T10:00:00+00:00", "source": "ledger"}


def test_every_configured_check_is_in_the_registry_with_a_definition(cfg):
    configured = {n for s in cfg.evaluation.stages.values() for n in s.mandatory_checks}
    assert configured <= set(DEFINITIONS)
    assert set(cfg.evaluation.checks.attested) <= set(DEFINITIONS) - set(REGISTRY)  # attested: nothing to measure
    assert all(len(text) > 40 for text in DEFINITIONS.values())


def test_good_evidence_passes_everything_measurable_and_attested_checks_wait_for_a_named_person(cfg):
    got = statuses(cfg, good_evidence())
    assert {n for n, s in got.items() if s != PASS} == {"cloudflare_tunnel_setup"}
    assert got["cloudflare_tunnel_setup"] == UNATTESTED
    attested = run_checks(cfg, good_evidence(), {"cloudflare_tunnel_setup": KIM})["cloudflare_tunnel_setup"]
    assert attested.status == ATTESTED and attested.measured["reviewer"] == "pharmacist kim"
    assert "pharmacist kim" in attested.detail
    nameless = {**KIM, "reviewer": "  "}
    assert statuses(cfg, good_evidence(), {"cloudflare_tunnel_setup": nameless})["cloudflare_tunnel_setup"] == UNATTESTED
    said_no = {**KIM, "confirmed": False}
    assert statuses(cfg, good_evidence(), {"cloudflare_tunnel_setup": said_no})["cloudflare_tunnel_setup"] == FAIL


def test_nothing_is_true_by_default(cfg):
    got = statuses(cfg, StageEvidence(stage=1))
    assert not [n for n, s in got.items() if s in (PASS, ATTESTED)]
    assert got["cloudflare_tunnel_setup"] == UNATTESTED and got["memory_leak_test"] == NOT_MEASURED


def test_mandatory_flags_follow_the_stage(cfg):
    results = run_checks(cfg, good_evidence(stage=3))
    assert {n for n, r in results.items() if r.mandatory} == set(cfg.evaluation.stages[3].mandatory_checks)


def _broken(change):
    ev = copy.deepcopy(good_evidence())
    change(ev)
    return ev


def _cpu_placeholder_memory(ev):
    """What a CPU run used to write: perf/cuda_mem as a constant 0, and no host memory."""
    for tags in ev.tensorboard.values():
        tags.pop("perf/host_mem")
        tags["perf/cuda_mem"] = _tag(40, 0.0, 0.0)


def _unprobed(ev):
    """What a CPU run used to report: the configured batch kept 'because there is no CUDA'."""
    ev.train["detector"]["auto_batch"] = {"probed": False, "batch_size": 8, "memory_fraction": None, "probes": [],
                                          "reasons": ["cpu: keeping configured batch"]}


# Each row is realistic bad evidence of what the check measures; it must not pass.
@pytest.mark.parametrize("name, change, status", [
    ("classification_model_loading", lambda ev: ev.evaluation.update(logits_finite=False), FAIL),
    ("classification_model_loading", lambda ev: ev.evaluation.update(n=0), FAIL),
    ("detection_model_loading", lambda ev: ev.detector_probe.update(loaded=False, error="bad file"), FAIL),
    ("detection_model_loading", lambda ev: ev.detector_probe.update(output_finite=False), FAIL),
    ("detection_model_loading", lambda ev: setattr(ev, "detector_probe", None), NOT_MEASURED),
    ("onnx_conversion_success", lambda ev: ev.export.update(detector={"exported": False, "reason": "no ckpt"}), FAIL),
    ("onnx_conversion_success", lambda ev: ev.export.update(ok=False, failures=["classifier: parity"]), FAIL),
    ("onnx_conversion_success", lambda ev: setattr(ev, "export", None), NOT_MEASURED),
    ("pipeline_complete", lambda ev: ev.train["detector"].update(epochs_completed=1), FAIL),
    ("pipeline_complete", lambda ev: ev.export.update(ok=False, failures=["detector: mAP diff"]), FAIL),  # failed export
    ("pipeline_complete", lambda ev: ev.api.update(deployed=False, reason="no /ready"), FAIL),  # failed API
    ("pipeline_complete", lambda ev: setattr(ev, "api", None), FAIL),
    ("auto_batch_tuning_success", _unprobed, NOT_MEASURED),
    ("auto_batch_tuning_success", lambda ev: ev.train["classifier"]["auto_batch"].update(memory_fraction=0.97), FAIL),
    ("tensorboard_logging", lambda ev: ev.tensorboard["detector"].pop("perf/throughput"), FAIL),
    ("tensorboard_logging", lambda ev: ev.tensorboard["classifier"].update({"val/macro_f1": _tag(0)}), FAIL),
    ("tensorboard_logging", _cpu_placeholder_memory, FAIL),  # constant telemetry
    ("tensorboard_logging", lambda ev: ev.tensorboard["classifier"].update({"train/loss": _tag(30, 2.3, 2.3)}), FAIL),
    ("tensorboard_logging", lambda ev: ev.tensorboard["classifier"].pop("perf/host_mem"), FAIL),
    ("class_balance_verification", lambda ev: ev.subset.update(imbalance_ratio=12.0), FAIL),
    ("class_balance_verification", lambda ev: ev.subset.pop("imbalance_ratio"), NOT_MEASURED),
    ("memory_optimization_working", lambda ev: ev.train["classifier"]["data"]["pixel_cache"].update(cached=99), FAIL),
    ("memory_optimization_working", lambda ev: ev.train["detector"].update(epochs=_epochs(share=0.7)), FAIL),
    ("memory_leak_test", lambda ev: ev.train["classifier"].update(epochs=_epochs(rss=(500, 900, 1600))), FAIL),
    ("memory_leak_test", lambda ev: ev.train["detector"].update(epochs=_epochs(gpu=(4000, 4100, 5000))), FAIL),
    ("memory_leak_test", lambda ev: ev.train["detector"].update(epochs=_epochs(n=1)), NOT_MEASURED),
    ("stability_test_pass", lambda ev: ev.train["classifier"]["epochs"][1].update(train_loss=float("nan")), FAIL),
    ("stability_test_pass", lambda ev: ev.train["detector"].update(oom_events=[{}] * 6), FAIL),
    ("scalability_test_pass", lambda ev: ev.train["classifier"].update(
        epochs=_epochs(n=4, rss=(500, 510, 515, 520), throughput=(100.0, 100.0, 60.0, 50.0))), FAIL),
    # A cold first epoch hid this drop (medians 60 vs 57.5); the warm epochs fall from 100 to 57.5 img/s.
    ("scalability_test_pass", lambda ev: ev.train["classifier"].update(
        epochs=_epochs(n=4, rss=(500, 510, 515, 520), throughput=(20.0, 100.0, 60.0, 55.0))), FAIL),
    ("scalability_test_pass", lambda ev: ev.train["classifier"].update(epochs=_epochs(n=2)), NOT_MEASURED),
    ("multi_batch_processing", lambda ev: ev.evaluation["multi_batch"].update(flips=11, top1_agreement=53 / 64), FAIL),
    ("multi_batch_processing", lambda ev: ev.evaluation["multi_batch"].update(batch_size=1), FAIL),
    ("multi_batch_processing", lambda ev: ev.evaluation.pop("multi_batch"), NOT_MEASURED),
    ("full_dataset_processing", lambda ev: ev.subset.update(train_k_codes=K_CODES[:49]), FAIL),  # a class left out
    ("full_dataset_processing", lambda ev: ev.manifest.update(usable_classes=K_CODES + ["K-999999"]), FAIL),
    # Issue 28 point 8: a class whose every photo was quarantined, or whose labels all failed to import, used to
    # vanish from both sides; it is counted before the quarantine and named.
    ("full_dataset_processing", lambda ev: ev.manifest["lost"].update(
        {"K-999999": "all 3 training photos quarantined (validation findings)"}), FAIL),
    ("full_dataset_processing", lambda ev: ev.subset.update(train_single=499), FAIL),
    ("full_dataset_processing", lambda ev: setattr(ev, "manifest", None), NOT_MEASURED),
    ("production_api_deployment", lambda ev: ev.api.update(deployed=False), FAIL),
    ("production_api_deployment", lambda ev: ev.api.update(deployed=False, unsent=34, planned=48, requests=14), FAIL),
    ("production_api_deployment", lambda ev: setattr(ev, "api", None), NOT_MEASURED),
    ("automated_monitoring", lambda ev: ev.api["monitoring"].update(ok=False), FAIL),
    ("automated_monitoring", lambda ev: ev.api.update(deployed=False), FAIL),
    ("automated_monitoring", lambda ev: ev.api.pop("monitoring"), NOT_MEASURED),
    ("no_crashes", lambda ev: ev.train["classifier"].update(epochs_completed=2), FAIL),
    ("no_crashes", lambda ev: ev.train["detector"]["epochs"][2].update(train_loss=float("inf")), FAIL),
    ("memory_stable", lambda ev: ev.train["classifier"].update(oom_events=[{}] * 6), FAIL),
    ("memory_stable", lambda ev: ev.train["classifier"].update(epochs=_epochs(rss=(500, 900, 1600))), FAIL),
])
def test_each_check_fails_on_realistic_bad_evidence(cfg, name, change, status):
    assert statuses(cfg, _broken(change))[name] == status


def test_every_check_has_a_failing_case_above():
    rows = test_each_check_fails_on_realistic_bad_evidence.pytestmark[0].args[1]
    covered = {name for name, _, status in rows if status == FAIL}
    assert covered >= set(REGISTRY), sorted(set(REGISTRY) - covered)


def test_a_check_measured_here_can_never_be_attested_by_configuration():
    """Issue 28, reproduction 5: with production_api_deployment added to evaluation.checks.attested, `pillsnap attest`
    accepted an attestation for an API that never started. The attestable checks are fixed by the registry; a
    config may only narrow them, and a narrowed-out one is not measured (it blocks), never passed."""
    from pillsnap.config import ConfigError
    from pillsnap.evaluate.criteria import validate_evaluation_config

    widened = load_config(overrides=["evaluation.checks.attested=[cloudflare_tunnel_setup,production_api_deployment]"])
    with pytest.raises(ConfigError, match=r"evaluation.checks.attested: \['production_api_deployment'\] are measured"):
        validate_evaluation_config(widened.evaluation)
    answered = {"production_api_deployment": KIM, "cloudflare_tunnel_setup": KIM}
    never_served = _broken(lambda ev: ev.api.update(deployed=False))
    assert statuses(widened, never_served, answered)["production_api_deployment"] == FAIL  # measured all the same
    narrowed = load_config(overrides=["evaluation.checks.attested=[]"])
    validate_evaluation_config(narrowed.evaluation)
    assert statuses(narrowed, good_evidence(4), answered)["cloudflare_tunnel_setup"] == NOT_MEASURED


def test_a_gpu_less_run_measures_host_memory_only_and_early_stopping_counts_as_finished(cfg):
    ev = _broken(lambda ev: ev.train["classifier"].update(epochs_completed=2, stopped_early=True))
    got = run_checks(cfg, ev)
    assert got["memory_leak_test"].status == PASS and got["memory_leak_test"].measured["classifier"][
        "gpu_growth_mb"] is None
    assert got["no_crashes"].status == PASS and got["pipeline_complete"].status == PASS


def test_detector_off_rules_the_detector_checks_out_and_says_so(cfg):
    ev = _broken(lambda ev: (setattr(ev, "detection_expected", False),
                             ev.export.update(detector={"exported": False, "reason": "detection.enabled=false"})))
    got = run_checks(cfg, ev)
    assert got["detection_model_loading"].status == NOT_APPLICABLE
    assert "detection.enabled is false" in got["detection_model_loading"].detail
    assert got["onnx_conversion_success"].status == PASS
    assert got["onnx_conversion_success"].measured["exported"] == ["classifier"]  # not a detector never exported


def test_tensorboard_tags_are_read_from_event_files(tmp_path):
    from pillsnap.train.services.telemetry import TBWriter

    writer = TBWriter(tmp_path / "tb")
    for step in range(3):
        writer.scalar("train/loss", 1.0, step)
    writer.scalar("val/accuracy", 0.5, 0)
    writer.close()
    assert read_tensorboard_tags(tmp_path / "tb") == {"train/loss": {"values": 3, "min": 1.0, "max": 1.0},
                                                      "val/accuracy": {"values": 1, "min": 0.5, "max": 0.5}}
    assert read_tensorboard_tags(tmp_path / "nothing") == {}
