"""Detection metrics: one NMS for torch and ONNX, ultralytics-compatible AP, and agreement with its val."""
import numpy as np
import pytest
import torch

from pillsnap.metrics.detection import box_iou, detection_metrics, match_detections
from pillsnap.infer.detection import (detection_samples, evaluate_detector, letterbox, load_bgr, map_detector, nms,
                                      nms_batch, onnx_raw_predictor, torch_raw_predictor)
from pillsnap.data.yolo_dataset import detection_rows
from pillsnap.models.detector import export_detector_onnx, load_detector_checkpoint
from tests.unit.detection_support import det_data, sequential_run  # noqa: F401  (session fixtures)


def _raw(rng, n=400, nc=1, size=160.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(4, 40, (n, 2))
    scores = rng.uniform(0, 1, (n, nc)) ** 3
    return np.concatenate([xy, wh, scores], 1).T.astype(np.float32)  # (4+nc, N) like the YOLO head


def greedy_nms(raw, conf, iou, max_det):
    """The rule written out plainly: best first, a box goes when its IoU with a kept box of its class > iou."""
    scores, cls = raw[4:].max(0), raw[4:].argmax(0)
    keep = scores > conf
    xywh, scores, cls = raw[:4].T[keep], scores[keep], cls[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if len(kept) < max_det and all(cls[j] != cls[i] or box_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= iou
                                       for j in kept):
            kept.append(i)
    return np.concatenate([boxes[kept], scores[kept, None], cls[kept, None].astype(np.float32)], 1)


@pytest.mark.parametrize("nc", [1, 3])
def test_nms_is_the_greedy_per_class_rule(nc):
    rng = np.random.default_rng(nc)
    raw = _raw(rng, nc=nc)
    ours, plain = nms(raw, conf=0.05, iou=0.5, max_det=1000), greedy_nms(raw, 0.05, 0.5, 1000)
    np.testing.assert_allclose(ours, plain, rtol=1e-6)
    assert np.all(np.diff(ours[:, 4]) <= 0) and len(ours) < (raw[4:].max(0) > 0.05).sum()
    assert len(nms(raw, 0.05, 0.5, max_det=7)) == 7


def test_nms_over_a_batch_keeps_images_apart():
    """One call for the batch: a box never suppresses one of another image, and each image's rows equal its own."""
    rng = np.random.default_rng(5)
    raw = np.stack([_raw(rng, nc=2) for _ in range(3)])
    raw[1] = raw[0]  # two identical images: each keeps all its boxes
    batched = nms_batch(torch.from_numpy(raw), 0.05, 0.5, 100)
    for image, rows in zip(raw, batched):
        np.testing.assert_allclose(rows, greedy_nms(image, 0.05, 0.5, 100), rtol=1e-6)
    np.testing.assert_array_equal(batched[0], batched[1])
    assert [len(r) for r in nms_batch(np.zeros((2, 5, 10), np.float32), 0.05, 0.5, 10)] == [0, 0]


def test_ap_precision_recall_match_ultralytics_ap_per_class():
    from ultralytics.utils.metrics import ap_per_class

    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 300)
    tp = np.sort(rng.uniform(0, 1, (300, 10)) < conf[:, None] * 0.9, axis=1)[:, ::-1]
    n_gt = 120
    ours = detection_metrics(tp, conf, n_gt)
    _, _, p, r, _, ap, *_ = ap_per_class(tp, conf, np.zeros(300), np.zeros(n_gt))
    assert ours["mAP_0.5"] == pytest.approx(ap[0, 0], abs=1e-9)
    assert ours["mAP_0.5_0.95"] == pytest.approx(ap[0].mean(), abs=1e-9)
    assert (ours["precision"], ours["recall"]) == (pytest.approx(p[0], abs=1e-9), pytest.approx(r[0], abs=1e-9))


def test_matching_is_greedy_by_confidence_and_one_to_one():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)
    pred = np.array([[0, 0, 10, 10, .9, 0], [0, 0, 10, 9, .8, 0], [21, 0, 30, 10, .7, 0]], float)
    correct = match_detections(pred, gt)
    assert correct[:, 0].tolist() == [True, False, True]  # the duplicate finds its target taken
    assert correct[2].sum() < 10  # IoU 0.9: correct up to 0.9, not at 0.95


def test_nothing_to_measure_is_nan_and_named():
    out = detection_metrics(np.zeros((0, 10), bool), np.zeros(0), n_gt=0)
    assert np.isnan(out["mAP_0.5"]) and "mAP_0.5" in out["not_measured"]
    assert detection_metrics(np.zeros((0, 10), bool), np.zeros(0), n_gt=5)["mAP_0.5"] == 0.0


def test_letterbox_is_pixel_identical_to_ultralytics_val_loader(det_data, tmp_path):  # noqa: F811
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset as ultralytics_dataset
    from ultralytics.utils import DEFAULT_CFG

    from pillsnap.data.yolo_dataset import build_yolo_dataset

    ds = build_yolo_dataset(det_data.manifest, tmp_path, 1)
    theirs = ultralytics_dataset(get_cfg(DEFAULT_CFG, {"imgsz": 160}), ds.val_list, 8, ds.ultralytics_data(),
                                 mode="val", stride=32)[0]
    ours, info = letterbox(load_bgr(theirs["im_file"]), 160)
    np.testing.assert_array_equal(np.round(ours * 255).astype(np.uint8), theirs["img"].numpy())
    assert (info.width, info.height) == tuple(theirs["ori_shape"][::-1])


@pytest.mark.slow
def test_map_agrees_with_ultralytics_val(sequential_run, det_data, monkeypatch):  # noqa: F811
    import ultralytics.data.utils as data_utils
    from ultralytics.models.yolo.detect import DetectionValidator

    monkeypatch.setattr(data_utils, "check_font", lambda *a, **k: None)  # its dataset check fetches a font
    model = load_detector_checkpoint(sequential_run.result["detector"].best_checkpoint)
    val_rows = detection_rows(det_data.manifest, include_single_images=False).query("split == 'val'")  # the photos the data yaml validates on
    ours = evaluate_detector(map_detector(model, 160, 8), detection_samples(val_rows))
    validator = DetectionValidator(args=dict(data=sequential_run.result["detector"].data["data_yaml"], imgsz=160, batch=8,
                                             conf=0.001, iou=0.7, max_det=300, rect=False, plots=False,
                                             device="cpu", verbose=False, save_json=False))
    theirs = validator(model=load_detector_checkpoint(sequential_run.result["detector"].best_checkpoint))
    assert ours["n_images"] == len(val_rows) and ours["n_gt"] == validator.metrics.nt_per_class.sum()
    assert ours["mAP_0.5"] > 0.1, "the cross-check needs a model that finds pills"
    assert ours["mAP_0.5"] == pytest.approx(theirs["metrics/mAP50(B)"], abs=0.005)
    assert ours["mAP_0.5_0.95"] == pytest.approx(theirs["metrics/mAP50-95(B)"], abs=0.005)


@pytest.mark.slow
def test_torch_and_onnx_paths_give_the_same_boxes(sequential_run, det_data, tmp_path):  # noqa: F811
    model = load_detector_checkpoint(sequential_run.result["detector"].best_checkpoint)
    onnx_path = export_detector_onnx(model, tmp_path / "det.onnx", image_size=160)
    batch = np.stack([letterbox(load_bgr(p), 160)[0] for p in det_data.rows("val")["image_path"][:4]])
    raw_torch, raw_onnx = torch_raw_predictor(model)(batch), onnx_raw_predictor(onnx_path)(batch)
    np.testing.assert_allclose(raw_onnx, raw_torch, rtol=1e-3, atol=1e-3)
    conf = float(raw_torch[:, 4].max()) / 2  # a threshold well clear of near-ties
    via_torch = [nms(r, conf, 0.5, 50) for r in raw_torch]
    via_onnx = [nms(r, conf, 0.5, 50) for r in raw_onnx]
    assert sum(len(d) for d in via_torch) > 0
    for a, b in zip(via_torch, via_onnx):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-2)
