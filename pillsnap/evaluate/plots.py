"""D-9 pictures: confusion heatmap of the most-confused classes, ROC/PR curves, detections drawn on images.

Figures use matplotlib's object API on the Agg canvas: no pyplot state, no display, no backend switching,
safe from worker threads. Fonts are the ones bundled with matplotlib / Pillow (nothing is downloaded).
"""
from __future__ import annotations

import colorsys
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from pillsnap.evaluate.curves import MacroCurves, curves_summary, macro_ovr_curves
from pillsnap.core.jsonio import write_json_atomic
from pillsnap.metrics.classification import most_confused_pairs

PathLike = Union[str, Path]
ImageLike = Union[np.ndarray, Image.Image, PathLike]
MAX_HEATMAP_CLASSES = 50  # never draw an N×N matrix larger than this


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def classes_in_pairs(pairs: Sequence[Mapping[str, Any]], max_classes: int = MAX_HEATMAP_CLASSES) -> List[int]:
    """Class indices of the pairs, most-confused first, stopping before a pair would exceed max_classes."""
    if not 2 <= max_classes <= MAX_HEATMAP_CLASSES:
        raise ValueError(f"max_classes={max_classes} must be in [2, {MAX_HEATMAP_CLASSES}]")
    chosen: List[int] = []
    for pair in pairs:
        new = [c for c in (pair["index_a"], pair["index_b"]) if c not in chosen]
        if len(chosen) + len(new) > max_classes:
            break
        chosen += new
    return chosen


def plot_confusion_subset(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[int], path: PathLike,
    class_names: Optional[Sequence[str]] = None,
) -> Path:
    """Heatmap of mistakes among `classes` only (rows: true, columns: predicted; the diagonal is left blank)."""
    k = len(classes)
    if not 0 < k <= MAX_HEATMAP_CLASSES:
        raise ValueError(f"a confusion heatmap takes 1..{MAX_HEATMAP_CLASSES} classes, got {k}")
    t, p, chosen = np.asarray(y_true), np.asarray(y_pred), np.asarray(classes)
    keep = (t != p) & np.isin(t, chosen) & np.isin(p, chosen)
    position = {int(c): i for i, c in enumerate(classes)}
    rows = np.array([position[int(c)] for c in t[keep]], dtype=np.int64)
    cols = np.array([position[int(c)] for c in p[keep]], dtype=np.int64)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (rows, cols), 1)
    labels = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
    size = 3 + 0.28 * k
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Reds")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mistakes")
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Most-confused classes ({k})")
    if k <= 20:
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7)
    return _save(fig, path)


def save_confusion_report(
    y_true: Sequence[int], y_pred: Sequence[int], out_dir: PathLike,
    class_names: Optional[Sequence[str]] = None, top_n: int = 20, name: str = "classification",
) -> Dict[str, Any]:
    """confusion_<name>.json (top-N pairs) and confusion_<name>.png (heatmap of those classes only)."""
    out_dir = Path(out_dir)
    pairs = most_confused_pairs(y_true, y_pred, class_names, top_n)
    summary: Dict[str, Any] = {"top_n": top_n, "pairs": pairs, "json": str(out_dir / f"confusion_{name}.json"), "png": None}
    # No confusions at all: still draw the (diagonal) matrix of the first classes, so the report always has it.
    classes = classes_in_pairs(pairs) or sorted({int(c) for c in y_true})[:MAX_HEATMAP_CLASSES]
    if classes:
        summary["png"] = str(plot_confusion_subset(y_true, y_pred, classes, out_dir / f"confusion_{name}.png", class_names))
    summary["heatmap_classes"] = len(classes)
    write_json_atomic(out_dir / f"confusion_{name}.json", summary)
    return summary


def plot_roc_pr(curves: MacroCurves, out_dir: PathLike, name: str = "classification") -> Tuple[Path, Path]:
    out_dir = Path(out_dir)
    roc = Figure(figsize=(5, 5))
    ax = roc.add_subplot()
    ax.plot(curves.grid, curves.mean_tpr, label=f"macro OvR (AUC={_fmt(curves.macro_roc_auc)})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    _style(ax, "false positive rate", "true positive rate", f"ROC, {curves.classes_evaluated} classes")
    pr = Figure(figsize=(5, 5))
    ax = pr.add_subplot()
    ax.plot(curves.grid, curves.mean_precision, label=f"macro OvR (AP={_fmt(curves.macro_average_precision)})")
    _style(ax, "recall", "precision", f"Precision-recall, {curves.classes_evaluated} classes")
    return _save(roc, out_dir / f"roc_{name}.png"), _save(pr, out_dir / f"pr_{name}.png")


def _style(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right")


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def save_roc_pr_report(
    y_true: Sequence[int], y_prob: np.ndarray, out_dir: PathLike,
    class_names: Optional[Sequence[str]] = None, name: str = "classification",
) -> Dict[str, Any]:
    """roc_<name>.png, pr_<name>.png and roc_pr_<name>.json (the AUC numbers); returns the JSON dict."""
    curves = macro_ovr_curves(y_true, y_prob)
    summary = curves_summary(curves, class_names)
    if curves.classes_evaluated:
        roc_path, pr_path = plot_roc_pr(curves, out_dir, name)
        summary.update(roc_png=str(roc_path), pr_png=str(pr_path))
    write_json_atomic(Path(out_dir) / f"roc_pr_{name}.json", summary)
    return summary


def load_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as img:
        return img.convert("RGB")


def _color(label: str) -> Tuple[int, int, int]:
    hue = int(hashlib.md5(label.encode()).hexdigest()[:4], 16) / 0xFFFF  # stable colour per label across images
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _box(box: Mapping[str, Any], index: int) -> Tuple[List[float], str]:
    if "xyxy" not in box:
        raise ValueError(f"box {index}: needs 'xyxy' = [x1, y1, x2, y2] in pixels, got keys {sorted(box)}")
    x1, y1, x2, y2 = (float(v) for v in box["xyxy"])
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {index}: xyxy={box['xyxy']} has x2 < x1 or y2 < y1")
    text = str(box.get("label", "pill"))
    if box.get("score") is not None:
        text += f" {float(box['score']):.2f}"
    return [x1, y1, x2, y2], text


def draw_detections(
    image: ImageLike, boxes: Sequence[Mapping[str, Any]], out_path: PathLike,
    ground_truth: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Predicted boxes ({"xyxy", "label", "score", optional "color"}) drawn with labels; ground truth, if given, in
    thin white."""
    canvas = load_rgb(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(12, width * 6))
    for i, gt in enumerate(ground_truth):
        draw.rectangle(_box(gt, i)[0], outline=(255, 255, 255), width=1)
    for i, box in enumerate(boxes):
        xyxy, text = _box(box, i)
        color = tuple(box["color"]) if box.get("color") else _color(str(box.get("label", "pill")))
        draw.rectangle(xyxy, outline=color, width=width)
        left, top, right, bottom = draw.textbbox((xyxy[0], xyxy[1]), text, font=font)
        lift = bottom - top + 2 if xyxy[1] - (bottom - top) - 2 >= 0 else 0  # label above the box when it fits
        draw.rectangle([left, top - lift, right + 2, bottom - lift], fill=color)
        draw.text((xyxy[0] + 1, xyxy[1] - lift), text, fill=(0, 0, 0), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path


def save_thumbnail(image: ImageLike, out_path: PathLike, max_side: int = 160) -> Path:
    """A small PNG of an input or crop, referenced by a hard case's thumbnail_path."""
    thumb = load_rgb(image)
    thumb.thumbnail((max_side, max_side))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    thumb.save(out_path, format="PNG")
    return out_path
