"""The configuration's sections as typed dataclasses: what every key means and its default (the shipped values live
in configs/pillsnap.yaml). The evaluation sections (gates, advisor, checks) are in `evaluation.py`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import MISSING

from pillsnap.config.evaluation import EvaluationConfig


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names it."""


@dataclass
class PathsConfig:
    data_root: str = "data/aihub"  # AIHub layout root holding train/ (and val/ = the sealed test split)
    manifest_csv: Optional[str] = None  # a plain manifest CSV instead of the AIHub layout
    exp_dir: str = "exp/exp01"


@dataclass
class SynthConfig:
    out_dir: str = "data/synthetic"
    num_classes: int = 50
    images_per_class: int = 100
    # Unequal class sizes, as in the real release: class k gets a seeded count in [images_per_class_min,
    # images_per_class] (0 = every class gets images_per_class).
    images_per_class_min: int = 0
    test_images_per_class: int = 10
    combinations: int = 40  # distinct combination folders (2-5 pills each) in train
    test_combinations: int = 8
    images_per_combination: int = 4
    width: int = 976
    height: int = 1280
    pill_scale: float = 0.34  # a single pill's width as a fraction of the image width (camera distance)
    seed: int = 0
    workers: int = 0  # 0 = one per core


@dataclass
class StageSpec:
    classes: Optional[int] = None  # None = every class of the manifest
    images: Optional[int] = None  # single-pill TRAINING photos; None = all of those classes'
    # The detector's training photos: combination photos first (any K-codes: the detector has one class), then
    # the stage's single photos; None = all of them. Validation keeps the same share of val photos.
    detector_images: Optional[int] = None
    min_accuracy: float = 0.78
    max_latency_ms: float = 220.0
    min_coverage: float = 0.20
    min_eval_samples: int = 2000
    max_acc_drop: float = 0.02
    epsilon_acc: float = 0.002
    # Go/No-Go: classes of the release that lost every training photo to the quarantine or to import issues
    # (null: not gated at this stage; the shipped Stage 4, which trains every class, allows 0).
    max_lost_classes: Optional[int] = None


@dataclass
class ValidationConfig:
    check_images: bool = True  # decode every image (detects truncated / unreadable files)
    hash_duplicates: bool = True  # content-hash images to find duplicates across splits
    workers: int = 0  # 0 = one per core
    max_corrupt_fraction: float = 0.01
    max_missing_fraction: float = 0.01
    max_bbox_error_fraction: float = 0.01
    max_duplicate_fraction: float = 0.01
    fail_on_val_only_classes: bool = False
    min_images_per_class: int = 2


@dataclass
class PrepareConfig:
    """Data preparation in shards (validation + the first pixel-cache fill), on orchestration.task_runner."""
    shard_size: int = 3000  # photos per shard task: few enough task runs for the server, small enough to retry
    fill_cache: bool = True  # validation's decode also fills the classifier's pixel cache (when the disk holds it)


@dataclass
class DataConfig:
    source: str = "aihub"  # aihub | csv | synthetic
    seed: int = 42
    val_fraction: float = 0.15
    stages: Dict[int, StageSpec] = field(default_factory=dict)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    include_combination_crops: bool = False  # add combination pills (cropped) to classifier training
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class ClassificationConfig:
    backbone: str = "tf_efficientnetv2_s"
    image_size: int = 384
    pretrained: bool = True  # ImageNet weights: pretrained_path, else timm's hub cache (downloaded when online)
    pretrained_path: Optional[str] = None  # a local weights file (wins over the hub)
    drop_rate: float = 0.2
    drop_path_rate: float = 0.1
    crop_padding: float = 0.15  # padding around a detected box when classifying crops


@dataclass
class DetectionConfig:
    enabled: bool = True
    scale: str = "m"  # n | s | m | l | x
    image_size: int = 640
    activation: str = "silu"  # silu | relu | leaky_relu
    pretrained: bool = True  # COCO weights: pretrained_path, else ultralytics' yolo11{scale}.pt (downloaded when online)
    pretrained_path: Optional[str] = None  # a local .pt file (ultralytics or PillSnap checkpoint)
    conf_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_det: int = 50
    include_single_images: bool = True  # single photos have a box: the detector learns from them as well
    close_mosaic_epochs: int = 10  # ultralytics' recipe: the last epochs train on photos without mosaic


@dataclass
class AugmentConfig:
    """Classifier training augmentation, applied to whole uint8 batches (pillsnap.data.augment).

    Defaults suit pill photos: a mirror flip mirrors the imprint ("GS" becomes a glyph no photo shows), so both
    flips are off; 90-degree turns and free rotation are real (the camera circles the pill in 20-degree steps)
    and keep the imprint readable; geometry never moves the pill's box out of the frame; hue jitter is small so
    colour classes stay apart. For other data (a CSV of ordinary photos): policy, flips and keep_box_in_frame
    are the switches (see the README).
    """
    hflip: bool = False
    vflip: bool = False
    rot90: bool = True  # lossless quarter turns
    rotate_degrees: float = 180.0  # free rotation in [-d, d]
    scale: List[float] = field(default_factory=lambda: [0.9, 1.1])
    translate: float = 0.05  # fraction of the image side
    keep_box_in_frame: bool = True  # geometry is clamped so the pill's box (known from the labels) stays inside
    # Probability that a photo is seen as the padded crop of its pill box (classification.crop_padding): what
    # the classifier gets for each pill the detector finds in a combination photo.
    crop_view: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02  # fraction of a full turn
    channel_gain: float = 0.03  # per-channel (R, G, B) gain in [1-g, 1+g]: white balance of the light
    policy: str = "none"  # none | randaugment | trivialaugment
    policy_ops: int = 2  # RandAugment: ops per image
    policy_magnitude: int = 9  # RandAugment: magnitude bin of 31
    erasing: float = 0.0  # random-erasing probability
    mixup: float = 0.0  # timm Mixup alpha (0 = off)
    cutmix: float = 0.0  # timm CutMix alpha (0 = off)
    mix_prob: float = 1.0  # probability that a batch is mixed when mixup/cutmix are on


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    monitor: str = "macro_f1"
    mode: str = "max"
    patience: int = 7
    min_delta: float = 0.0


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9998
    # Ramp the decay up from 0 (timm's ModelEmaV3 warmup): early averages follow the weights instead of holding
    # the initial ones, as ultralytics' EMA does with its tau.
    warmup: bool = True


@dataclass
class OomConfig:
    # Guard-rail keys (D-8): they must be present in the config; the schema has no default for them.
    max_retries: int = MISSING
    max_grad_accum: int = MISSING
    min_batch: int = MISSING
    cooldown_sec: float = MISSING
    escalate_to_fp16: bool = MISSING
    # Fault injection (tests, drills): a synthetic OOM at these optimizer steps of the classifier / the detector.
    inject_at_steps: List[int] = field(default_factory=list)
    inject_detector_at_steps: List[int] = field(default_factory=list)
    inject_rank: Optional[int] = None  # with several training processes: inject on this rank only (None: every rank)


@dataclass
class ModelTrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1.0e-3
    auto_batch_tune: bool = True
    auto_batch_max: int = 64
    grad_clip: Optional[float] = None  # None: train.grad_clip
    ema: Optional[bool] = None  # None: train.ema.enabled


@dataclass
class StageOverride:
    batch_size_override: Optional[int] = None
    compile_mode: Optional[str] = None
    memory_format: Optional[str] = None
    num_workers_override: Optional[int] = None


@dataclass
class DistributedConfig:
    """More than one training process: torchrun inside the ONE training task (pillsnap/train/distributed/)."""
    nproc_per_node: str = "1"  # processes on this machine: a number, or "auto" = every visible GPU; 1 = in-process
    nnodes: int = 1  # machines; each runs the stage with its own node_rank
    node_rank: int = 0
    rdzv_endpoint: str = "127.0.0.1:29500"  # host:port of node 0, the same on every node
    backend: str = "auto"  # auto (nccl on CUDA, gloo on a CPU) | nccl | gloo
    # How long a rank waits in a collective before the group fails (torch's own default is 10 min for NCCL). Every
    # rank validates its slice and rank 0 alone only writes checkpoints (seconds), so what it must cover is one rank
    # far behind the others: a first-step compile or a validation slice on a slower GPU (minutes). 30 min leaves
    # that margin and still stops a group whose node died well within the hour.
    timeout_minutes: float = 30.0
    # BatchNorm statistics over the global batch: a collective in every forward, CUDA only (torch); the ranks then
    # cannot agree on an OOM recovery step (the others wait in that collective), so an OOM stops the run.
    sync_batchnorm: bool = False


@dataclass
class TrainConfig:
    strategy: str = "interleaved"  # sequential | interleaved
    interleave_ratio: List[int] = field(default_factory=lambda: [1, 1])
    grad_accum_steps: int = 1
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    warmup_steps: int = 500
    grad_clip: float = 1.0
    zero_grad_set_to_none: bool = True
    seed: int = 42
    deterministic: bool = False
    resume: str = "last"  # none | last
    recovery_every_steps: int = 500
    step_log_interval: int = 50
    max_steps_per_epoch: Optional[int] = None  # cap for smoke runs
    crash_at_step: Optional[int] = None  # fault injection: fail once at this global step (tests retries/resume)
    auto_batch_vram_headroom: float = 0.88
    classification: ModelTrainConfig = field(default_factory=ModelTrainConfig)
    detection: ModelTrainConfig = field(
        default_factory=lambda: ModelTrainConfig(epochs=50, batch_size=16, lr=1.0e-3, auto_batch_max=16)
    )
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    oom: OomConfig = field(default_factory=OomConfig)
    stage_overrides: Dict[str, StageOverride] = field(default_factory=dict)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class OptimizationConfig:
    amp: bool = True
    amp_dtype: str = "auto"  # auto | bf16 | fp16
    tf32: bool = True
    channels_last: bool = True
    torch_compile: str = "reduce-overhead"  # none | reduce-overhead | max-autotune
    # inductor generates kernels (what training uses); aot_eager traces the same graphs, recompiles and fallbacks
    # without generating code (seconds instead of minutes on a CPU: tests); eager runs dynamo alone.
    compile_backend: str = "inductor"


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: Optional[str] = None  # None = <exp_dir>/data/cache
    format: str = "auto"  # raw | jpeg | auto (raw while the rows fit in half the RAM): data/row_format.py
    jpeg_quality: int = 90


@dataclass
class DataloaderConfig:
    num_workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4
    drop_last: bool = True
    autotune_workers: bool = True
    autotune_candidates: List[int] = field(default_factory=lambda: [4, 8, 12, 16])
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class LossConfig:
    label_smoothing: float = 0.1
    use_class_weights: bool = False
    class_weight_mode: str = "inverse_frequency"  # inverse_frequency | effective_number
    weighted_sampler: bool = False


@dataclass
class InferenceConfig:
    mode: str = "auto"  # single | combo | auto
    engine: str = "torch"  # torch | onnx
    single_confidence_threshold: float = 0.30
    lazy_load_detector: bool = True
    device: str = "auto"  # auto | cpu | cuda: where predict / serve run, and where gate latency is measured


@dataclass
class ExportConfig:
    opset: int = 17
    dynamic_batch: bool = True
    parity_samples: int = 64
    min_top1_agreement: float = 0.995
    max_map_diff: float = 0.01


@dataclass
class ServeConfig:
    """The HTTP API (pillsnap serve) and the stage's API smoke test."""
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    require_api_key: bool = True
    api_keys_file: Optional[str] = None  # one key a line; PILLSNAP_API_KEYS (comma-separated) is read at the CLI
    max_request_mb: float = 20.0  # a larger body is refused with 413
    max_image_pixels: int = 40_000_000  # a larger photo is refused with 422 (a decompression bomb is larger still)
    max_batch_images: int = 16
    max_concurrency: int = 4  # photos processed at once; more wait
    max_waiting: int = 64  # requests waiting for a slot; more get 503
    micro_batch: bool = True  # concurrent requests share one classifier forward pass
    micro_batch_max: int = 32
    smoke_requests: int = 48  # the stage's API check: photos sent
    smoke_concurrency: int = 4  # … by this many clients at once
    smoke_timeout_s: float = 180.0  # start-up included
    min_image_side: int = 32  # a photo with a shorter side is refused with 422: no pill can be identified in it


@dataclass
class LoggingConfig:
    level: str = "INFO"
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class OrchestrationConfig:
    interactive_review: bool = False  # pause the flow for a human choice in the UI
    review_timeout_s: int = 3600
    unattended_policy: Dict[str, str] = field(
        default_factory=lambda: {"RECOMMEND_PROCEED": "proceed", "SUGGEST_OPTIMIZE": "stop", "WARN_STOP": "stop"}
    )
    webhook_url: Optional[str] = None
    task_runner: str = "local"  # data preparation's shards: local (this machine, one process pool) | dask
    dask_address: Optional[str] = None  # an existing dask.distributed scheduler; None = a local cluster
    dask_workers: int = 0  # the local cluster's worker processes; 0 = one per core


@dataclass
class PillSnapConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    @property
    def exp_dir(self) -> Path:
        return Path(self.paths.exp_dir)

    def stage(self, n: int) -> StageSpec:
        if n not in self.data.stages:
            raise ConfigError(f"data.stages: no stage {n} (have {sorted(self.data.stages)})")
        return self.data.stages[n]
