"""Pre-training checks (v3 lessons, phases 1-2): resources first (GPU, RAM, disk, pretrained weights, the
stage's pixel cache), then the config. The stage flow runs them before any data work (the pixel cache, which
needs the stage's subset, is checked as soon as the subset exists).

Everything is checked and reported together, so one run names every shortfall instead of the first one.
`run_preflight` raises PreflightError whose message lists each problem with the numbers behind it.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil
import torch

from pillsnap.data.cache import DISK_MARGIN_BYTES, nearest_existing
from pillsnap.data.detector_store import DetectorStore
from pillsnap.data.manifest import read_manifest
from pillsnap.data.prepare import cache_root, manifest_path, manifest_samples, pixel_store, store_format
from pillsnap.data.row_format import RowFormat
from pillsnap.data.yolo_dataset import detection_rows

logger = logging.getLogger(__name__)

GB = 1e9
DETECTOR_STRIDE = 32  # YOLO downsamples by 32: other sizes are silently rounded by ultralytics


@dataclass
class PrecheckRequirements:
    min_free_disk_gb_data: float = 5.0  # preprocessing cache and validation reports grow next to the data
    min_free_disk_gb_exp: float = 5.0  # checkpoints (last/best/recovery), TensorBoard, exports
    min_available_ram_gb: float = 8.0
    min_free_gpu_gb: Optional[float] = None  # None: report GPU memory, do not require any


@dataclass
class PreflightItem:
    name: str
    ok: bool
    detail: str


@dataclass
class PreflightReport:
    results: List[PreflightItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def problems(self) -> List[str]:
        return [r.detail for r in self.results if not r.ok]

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "results": [asdict(r) for r in self.results]}


class PreflightError(RuntimeError):
    def __init__(self, report: PreflightReport):
        self.report = report
        super().__init__("pre-training checks failed: " + "; ".join(report.problems))


def check_disk(name: str, path: Path, min_free_gb: float,
               disk_usage: Callable[[Path], Any] = shutil.disk_usage) -> PreflightItem:
    free_gb = disk_usage(nearest_existing(path)).free / GB
    ok = free_gb >= min_free_gb
    relation = ">=" if ok else "<"
    return PreflightItem(name, ok, f"free disk at {path}: {free_gb:.1f} GB {relation} required {min_free_gb:g} GB")


def check_ram(min_available_gb: float, virtual_memory: Callable[[], Any] = psutil.virtual_memory) -> PreflightItem:
    available_gb = virtual_memory().available / GB
    ok = available_gb >= min_available_gb
    relation = ">=" if ok else "<"
    return PreflightItem("ram", ok, f"available RAM: {available_gb:.1f} GB {relation} required {min_available_gb:g} GB")


def _cuda_free_total() -> Optional[Tuple[int, int]]:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def check_gpu(min_free_gb: Optional[float],
              gpu_free_total: Callable[[], Optional[Tuple[int, int]]] = _cuda_free_total) -> PreflightItem:
    usage = gpu_free_total()
    if usage is None:
        ok = min_free_gb is None
        return PreflightItem("gpu", ok, "no GPU: training runs on CPU" if ok else
                           f"no GPU, but {min_free_gb:g} GB of free GPU memory is required")
    free_gb, total_gb = usage[0] / GB, usage[1] / GB
    ok = min_free_gb is None or free_gb >= min_free_gb
    required = "" if min_free_gb is None else f" ({'>=' if ok else '<'} required {min_free_gb:g} GB)"
    return PreflightItem("gpu", ok, f"free GPU memory: {free_gb:.1f} of {total_gb:.1f} GB{required}")


def data_dir_of(cfg: Any) -> Path:
    """Where this run reads (and caches next to) its images."""
    if cfg.data.source == "synthetic":
        return Path(cfg.synth.out_dir)
    if cfg.data.source == "csv" and cfg.paths.manifest_csv:
        return Path(cfg.paths.manifest_csv).parent
    return Path(cfg.paths.data_root)


def check_config(cfg: Any, stage: Optional[int] = None, class_map_size: Optional[int] = None,
                 model_num_classes: Optional[int] = None) -> List[PreflightItem]:
    """Sanity of values whose type is right but whose meaning is not (phase 2)."""
    problems: List[str] = []
    if cfg.classification.image_size <= 0:
        problems.append(f"classification.image_size={cfg.classification.image_size} must be positive")
    det_size = cfg.detection.image_size
    if cfg.detection.enabled and (det_size <= 0 or det_size % DETECTOR_STRIDE):
        problems.append(f"detection.image_size={det_size} must be a positive multiple of {DETECTOR_STRIDE}")
    for key in ("classification", "detection"):
        model_cfg = getattr(cfg.train, key)
        if model_cfg.batch_size < 1 or model_cfg.auto_batch_max < 1:
            problems.append(f"train.{key}: batch_size={model_cfg.batch_size} and auto_batch_max="
                            f"{model_cfg.auto_batch_max} must be >= 1")
    if not 0.0 < cfg.train.auto_batch_vram_headroom <= 1.0:
        problems.append(f"train.auto_batch_vram_headroom={cfg.train.auto_batch_vram_headroom} must be in (0, 1]")
    if cfg.train.oom.min_batch < 1 or cfg.train.oom.max_grad_accum < 1:
        problems.append(f"train.oom: min_batch={cfg.train.oom.min_batch} and max_grad_accum="
                        f"{cfg.train.oom.max_grad_accum} must be >= 1")
    if cfg.train.distributed.node_rank != 0:  # two flows would decide, report and write the ledger for one stage
        problems.append(f"train.distributed.node_rank={cfg.train.distributed.node_rank}: only node 0 runs a stage; "
                        "on this node run `pillsnap train-node`, which joins node 0's training")
    if class_map_size is not None and stage is not None:
        stage_classes = cfg.stage(stage).classes
        if stage_classes is not None and stage_classes > class_map_size:
            problems.append(f"data.stages[{stage}].classes={stage_classes} > class map size {class_map_size}")
    if class_map_size is not None and model_num_classes is not None and model_num_classes != class_map_size:
        problems.append(f"classifier has {model_num_classes} outputs but the class map has {class_map_size} "
                        "classes (one global class map: never remap)")
    if not problems:
        return [PreflightItem("config", True, "config values consistent")]
    return [PreflightItem("config", False, p) for p in problems]


def check_pretrained_weights(cfg: Any, reachable: Optional[Callable[[str], bool]] = None) -> List[PreflightItem]:
    """Each model's pretrained weights can be had (a local file, the download cache, or a reachable hub)."""
    from pillsnap.models.classifier import classifier_weights_source
    from pillsnap.models.detector import detector_weights_source

    results = []
    for name, source in (("weights_classifier", lambda: classifier_weights_source(cfg.classification, reachable)),
                         ("weights_detector", lambda: detector_weights_source(cfg.detection, reachable))):
        try:
            results.append(PreflightItem(name, True, f"pretrained weights: {source()}"))
        except (RuntimeError, OSError, ValueError) as e:  # the message names the key and the ways out
            results.append(PreflightItem(name, False, str(e)))
    return results


def describe_pixel_store(cfg: Any, ram_bytes: int, free_bytes: int) -> PreflightItem:
    """Information before any work: the store's size in each format for the manifest's samples, the RAM and the
    free disk, and the format chosen with its reason (the stage's own rows are checked by check_pixel_cache)."""
    c = cfg.dataloader.cache
    if not c.enabled:
        return PreflightItem("pixel_store", True, "dataloader.cache.enabled=false: no pixel store")
    if not manifest_path(cfg).is_file():
        return PreflightItem("pixel_store", True, f"format {c.format}: decided after import from the manifest's "
                             f"samples, RAM {ram_bytes / GB:.1f} GB and free disk {free_bytes / GB:.1f} GB")
    samples = manifest_samples(read_manifest(manifest_path(cfg)), cfg.data.include_combination_crops)
    size = cfg.classification.image_size
    raw, jpeg = (RowFormat(kind, c.jpeg_quality).estimated_row_bytes(size) * samples / GB for kind in ("raw", "jpeg"))
    fmt, why = store_format(cfg, ram_bytes, free_bytes)
    return PreflightItem("pixel_store", True,
                         f"{samples} samples at {size}px: raw {raw:.1f} GB, jpeg ~{jpeg:.1f} GB (estimated); RAM "
                         f"{ram_bytes / GB:.1f} GB, free disk {free_bytes / GB:.1f} GB at {cache_root(cfg)}; "
                         f"format {fmt.kind}: {why}")


def check_detector_store(cfg: Any, subset: Any, stage: int, classifier_bytes: int = 0) -> Optional[PreflightItem]:
    """The detector store must hold the stage's detector training photos (S×S×3 bytes each) beside the bytes the
    classifier's store still needs on the same disk."""
    if not (cfg.dataloader.cache.enabled and cfg.detection.enabled):
        return None
    rows = detection_rows(subset, cfg.detection.include_single_images, cfg.stage(stage).detector_images,
                          cfg.data.val_fraction)
    store = DetectorStore(cache_root(cfg), cfg.detection.image_size)
    plan = store.plan([(path, None) for path in rows.loc[rows["split"] == "train", "image_path"]])
    fits = plan.bytes_needed + classifier_bytes + DISK_MARGIN_BYTES <= plan.free_bytes
    verdict = "fits" if fits else "does NOT fit (set dataloader.cache.dir to a larger disk or free space)"
    both = f" + {classifier_bytes / GB:.2f} GB for the classifier's rows" if classifier_bytes else ""
    return PreflightItem("detector_store", fits, f"detector store at {store.dir}: {plan.describe()}{both}: {verdict}")


def check_pixel_cache(cfg: Any, samples: Sequence[Any]) -> PreflightItem:
    """The decode-once pixel store must hold this stage's samples: the rows it lacks x S x S x 3 bytes."""
    return _pixel_cache(cfg, samples)[0]


def check_stage_stores(cfg: Any, subset: Any, stage: int, samples: Sequence[Any]) -> List[PreflightItem]:
    """Both stores of a stage on their one disk: the classifier's rows, then the detector's beside them."""
    item, needed = _pixel_cache(cfg, samples)
    detector = check_detector_store(cfg, subset, stage, needed)
    return [item, *([detector] if detector else [])]


def _pixel_cache(cfg: Any, samples: Sequence[Any]) -> Tuple[PreflightItem, int]:
    if not cfg.dataloader.cache.enabled:
        return PreflightItem("pixel_cache", True, "dataloader.cache.enabled=false: images are decoded on the fly"), 0
    store = pixel_store(cfg, len(samples))
    plan = store.plan(samples)
    verdict = "fits" if plan.fits else "does NOT fit (set dataloader.cache.dir to a larger disk or free space)"
    return (PreflightItem("pixel_cache", plan.fits, f"pixel cache at {store.dir}: {plan.describe()}: {verdict}"),
            plan.bytes_needed)


def run_preflight(
    cfg: Any,
    *,
    stage: Optional[int] = None,
    cache_samples: Optional[Sequence[Any]] = None,
    class_map_size: Optional[int] = None,
    model_num_classes: Optional[int] = None,
    requirements: Optional[PrecheckRequirements] = None,
    disk_usage: Callable[[Path], Any] = shutil.disk_usage,
    virtual_memory: Callable[[], Any] = psutil.virtual_memory,
    gpu_free_total: Callable[[], Optional[Tuple[int, int]]] = _cuda_free_total,
    reachable: Optional[Callable[[str], bool]] = None,
    weights: bool = True,
) -> PreflightReport:
    """All checks; returns the report when everything passes, else raises PreflightError naming each shortfall."""
    req = requirements or PrecheckRequirements()
    report = PreflightReport([
        *(check_pretrained_weights(cfg, reachable) if weights else []),
        check_gpu(req.min_free_gpu_gb, gpu_free_total),
        check_ram(req.min_available_ram_gb, virtual_memory),
        check_disk("disk_data", data_dir_of(cfg), req.min_free_disk_gb_data, disk_usage),
        check_disk("disk_exp", Path(cfg.paths.exp_dir), req.min_free_disk_gb_exp, disk_usage),
        describe_pixel_store(cfg, virtual_memory().total, disk_usage(nearest_existing(cache_root(cfg))).free),
        *check_config(cfg, stage, class_map_size, model_num_classes),
        *([check_pixel_cache(cfg, cache_samples)] if cache_samples is not None else []),
    ])
    for result in report.results:
        (logger.info if result.ok else logger.error)("precheck %s: %s", result.name, result.detail)
    if not report.ok:
        raise PreflightError(report)
    return report
