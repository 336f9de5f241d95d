"""D-6 final test: refused until Stage 4 is GO + approved with checkpoints; the sealed test split is NEVER opened
before that (proved with an audit hook over every file open and directory listing); then it runs exactly once."""
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path, run_import, run_subset, run_validation
from pillsnap.data.subsets import read_subset
from pillsnap.evaluate.final_test import FinalTestRefused, results_path, run_final_test
from pillsnap.core import layout
from pillsnap.ledger import Ledger, StageRecord

_recording = []  # the active recorder: an O_APPEND file descriptor, or nothing
AUDITED = {"open", "os.listdir", "os.scandir", "os.open"}


def _audit(event, args):
    if _recording and event in AUDITED and args and isinstance(args[0], (str, bytes, Path)):
        path = args[0].decode(errors="replace") if isinstance(args[0], bytes) else str(args[0])
        # os.write raises no audit event, and the descriptor survives fork: pool workers (the preprocessing
        # cache, validation) record into the same file
        os.write(_recording[-1], (path.replace("\n", " ") + "\n").encode())


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while a recorder is active


@contextlib.contextmanager
def recorded_opens(monkeypatch, log_file: Path):
    """Every path opened or listed meanwhile (here and in forked workers): Python opens (PIL, json, numpy) via the
    audit hook, plus cv2.imread, which reads files in C++ without an audit event."""
    import cv2

    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    real_imread = cv2.imread

    def imread(path, *args):
        os.write(fd, f"{path}\n".encode())
        return real_imread(path, *args)

    monkeypatch.setattr(cv2, "imread", imread)
    opened = []
    _recording.append(fd)
    try:
        yield opened
    finally:
        _recording.remove(fd)
        os.close(fd)
        monkeypatch.setattr(cv2, "imread", real_imread)
        opened += log_file.read_text().splitlines()


def _under(paths, folder):
    folder = str(Path(folder).resolve())
    return [p for p in paths if str(Path(p).resolve()).startswith(folder + "/") or str(Path(p).resolve()) == folder]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: avoid thread oversubscription
    yield
    torch.set_num_threads(before)


def _record(cfg, decision="GO", choice="proceed", **extra):
    Ledger.of(cfg.exp_dir).record(StageRecord(stage=4, decision=decision, choice=choice, reasons=["by hand"], **extra))


def test_refuses_without_an_approved_stage4_and_its_checkpoint(make_config, tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(FinalTestRefused, match="no Stage 4 decision"):
        run_final_test(cfg)
    _record(cfg, decision="NO_GO", choice="stop")
    with pytest.raises(FinalTestRefused, match="Stage 4 is not approved: NO_GO"):
        run_final_test(cfg)
    _record(cfg, decision="NO_GO", choice="proceed", chosen_by="policy")  # a policy never overrides a NO_GO
    with pytest.raises(FinalTestRefused, match="not approved: NO_GO .*'proceed' by policy"):
        run_final_test(cfg)
    _record(cfg, choice="stop")
    with pytest.raises(FinalTestRefused, match="not approved: GO .*'stop'"):
        run_final_test(cfg)
    for approved in ({}, {"decision": "NO_GO", "chosen_by": "human", "overridden": ["ACC_BELOW_TARGET"]}):
        _record(cfg, **approved)  # GO + proceed, or a person's proceed over a NO_GO: past the ledger gate
        with pytest.raises(FinalTestRefused, match="classifier checkpoint missing: .*stage_4/checkpoints/best.pt"):
            run_final_test(cfg)


@pytest.fixture(scope="module")
def before_final(tmp_path_factory, tiny_aihub, make_config):
    """Every pre-final-test step under the recorder: import, validation, subset, a tiny training, evaluation,
    and the refused final test. Returns (cfg, opened paths, refusal message)."""
    from pillsnap.evaluate.stage_eval import evaluate_classifier
    from pillsnap.train import train_classifier

    cfg = make_config(tmp_path_factory.mktemp("final"), f"synth.out_dir={tiny_aihub}", f"paths.data_root={tiny_aihub}",
                      "logging.tensorboard=false", "train.classification.epochs=1")
    log_file = tmp_path_factory.mktemp("audit") / "opened.txt"
    with pytest.MonkeyPatch.context() as mp, recorded_opens(mp, log_file) as opened:
        run_import(cfg, show_progress=False)
        run_validation(cfg, show_progress=False)
        run_subset(cfg, 1)
        subset, _ = read_subset(cfg.exp_dir, 1)
        class_map = ClassMap.load(class_map_path(cfg))
        result = train_classifier(cfg, subset, class_map, layout.stage_dir(cfg.exp_dir, 1), show_progress=False)
        reports = layout.stage_dir(cfg.exp_dir, 1) / "reports"
        evaluate_classifier(cfg, Path(result.best_checkpoint), subset, class_map, reports)
        with pytest.raises(FinalTestRefused) as refused:
            run_final_test(cfg)
    return cfg, list(opened), str(refused.value)


def test_the_test_split_is_never_opened_before_the_final_test(before_final, tiny_aihub):
    cfg, opened, refusal = before_final
    assert "no Stage 4 decision" in refusal
    assert len(_under(opened, tiny_aihub / "train")) > 50  # the recorder works: training photos were read
    assert _under(opened, tiny_aihub / "val") == []  # ... and not one sealed test file or folder


def _approve_stage4(cfg):
    """Stage 4 by hand: the stage-1 classifier as its best.pt, a random detector, a GO + proceed record."""
    from pillsnap.models.detector import backbone_name, build_detector, detector_payload
    from pillsnap.core.checkpoints import save_checkpoint

    target = layout.classifier_checkpoint(cfg.exp_dir, 4)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(layout.classifier_checkpoint(cfg.exp_dir, 1), target)
    model = build_detector(cfg.detection, cfg.exp_dir / "detector_model")
    save_checkpoint(layout.detector_checkpoint(cfg.exp_dir, 4),
                    detector_payload(model, backbone_name(cfg.detection), cfg.detection.image_size))
    _record(cfg, metrics={"accuracy": 0.9, "macro_f1": 0.85, "top5": 1.0})


def test_runs_once_after_an_approved_stage4(before_final, tiny_aihub, monkeypatch, tmp_path):
    cfg = before_final[0]
    _approve_stage4(cfg)
    with recorded_opens(monkeypatch, tmp_path / "opened.txt") as opened:
        results = run_final_test(cfg)
    assert _under(opened, tiny_aihub / "val")  # only now is the sealed split read
    written = json.loads(results_path(cfg).read_text())
    assert written["recommendation"] == results["recommendation"]
    assert {"test_results", "business_goals", "recommendation", "ready_for_production", "improvements"} <= set(written)
    cls = written["test_results"]["classification"]
    assert {"accuracy", "macro_f1", "top5"} <= set(cls) and cls["n"] == written["test_data"]["single_images"] == 12
    det = written["test_results"]["detection"]
    assert det["measured"] and "mAP_0.5" in det and written["test_data"]["combination_images"] == 2
    combo = written["test_results"]["combination"]
    assert combo["measured"] and combo["crops_classified"] == combo["detections"] and combo["pills"] > 0
    goals = written["business_goals"]
    assert set(goals) == {"single_accuracy", "single_macro_f1", "combination_mAP_0.5", "overall_target_met"}
    assert goals["overall_target_met"] is False and written["recommendation"] == "NEEDS_IMPROVEMENT"
    assert written["ready_for_production"] is False and written["improvements"]
    gap = written["val_vs_test"]["metrics"]["classification.accuracy"]
    assert gap["val"] == 0.9 and gap["gap"] == pytest.approx(0.9 - cls["accuracy"])
    assert Ledger.of(cfg.exp_dir).final_test["results"] == str(results_path(cfg))
    with pytest.raises(FinalTestRefused, match="already ran"):
        run_final_test(cfg)
    assert run_final_test(cfg, force=True)["recommendation"] == "NEEDS_IMPROVEMENT"
