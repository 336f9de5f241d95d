"""Batch augmentation: a pure function of (pixels, seed), pill-safe by default, every policy op runs batched."""
import dataclasses

import pytest
import torch

from pillsnap.config import AugmentConfig, ConfigError, check_augment_config, load_config
from pillsnap.data.augment import POLICY_OPS, BatchAugment, normalise

PLAIN = dict(rot90=False, rotate_degrees=0.0, scale=[1.0, 1.0], translate=0.0, brightness=0.0, contrast=0.0,
             saturation=0.0, hue=0.0, channel_gain=0.0, crop_view=0.0)


def _batch(n=6, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.2]] * n)
    return images, torch.arange(100, 100 + n), boxes, torch.arange(n) % 3


def _pill_images(n, size, box):
    """Black frames with one white pill rectangle at `box` (cx, cy, w, h as fractions)."""
    cx, cy, w, h = box
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x0, x1 = int((cx - w / 2) * size), int((cx + w / 2) * size)
    y0, y1 = int((cy - h / 2) * size), int((cy + h / 2) * size)
    images[:, :, y0:y1, x0:x1] = 255
    return images


def test_a_sample_is_a_pure_function_of_its_seed_whatever_its_batch():
    aug = BatchAugment(AugmentConfig(policy="randaugment", erasing=0.5), 48, 3)
    images, seeds, boxes, labels = _batch()
    whole, _ = aug(images, seeds, boxes, labels)
    alone, _ = aug(images[3:4], seeds[3:4], boxes[3:4], labels[3:4])
    reordered, _ = aug(images.flip(0), seeds.flip(0), boxes.flip(0), labels.flip(0))
    assert torch.allclose(whole[3], alone[0], atol=1e-5) and torch.allclose(whole, reordered.flip(0), atol=1e-5)
    other, _ = aug(images, seeds + 1, boxes, labels)
    assert not torch.allclose(whole, other)


@pytest.mark.parametrize("policy", ["none", "randaugment"])
def test_the_opencv_and_torch_executors_agree(policy):
    cfg = AugmentConfig(policy=policy)
    images, seeds, boxes, labels = _batch(n=12, size=48)
    images = torch.nn.functional.interpolate(images[:, :, ::4, ::4].float(), size=48, mode="bilinear").to(torch.uint8)
    cv2_out, _ = BatchAugment(cfg, 48, 3, executor="cv2")(images, seeds, boxes, labels)
    torch_out, _ = BatchAugment(cfg, 48, 3, executor="torch")(images, seeds, boxes, labels)
    diff = (cv2_out - torch_out).abs()
    assert diff.mean() < 0.02 and torch.quantile(diff.flatten(), 0.99) < 0.1  # interpolation rounding only


def test_plain_settings_are_exactly_the_evaluation_normalisation():
    cfg = AugmentConfig(**PLAIN)
    images, seeds, boxes, labels = _batch()
    out, targets = BatchAugment(cfg, 48, 3)(images, seeds, boxes, labels)
    assert torch.allclose(out, normalise(images), atol=1e-5) and torch.equal(targets, labels)


@pytest.mark.parametrize("executor", ["cv2", "torch"])
def test_a_crop_view_shows_the_pill_as_inference_crops_it(executor):
    """crop_view=1: the padded pill box stretched to the frame, as crop_pixels cuts a detection's crop."""
    from PIL import Image

    from pillsnap.infer.preprocess import crop_pixels

    size, box, padding = 96, (0.3, 0.6, 0.25, 0.15), 0.15
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.randint(0, 256, (1, 3, 12, 12), generator=g).float(), size=size,
                                             mode="bilinear", align_corners=False).to(torch.uint8)
    cfg = AugmentConfig(**{**PLAIN, "crop_view": 1.0})
    out, _ = BatchAugment(cfg, size, 3, executor=executor, crop_padding=padding)(
        smooth, torch.arange(1), torch.tensor([box]), torch.zeros(1, dtype=torch.long))
    pixel_box = [(box[0] - box[2] / 2) * size, (box[1] - box[3] / 2) * size, box[2] * size, box[3] * size]
    photo = Image.fromarray(smooth[0].permute(1, 2, 0).numpy())
    expected = normalise(torch.from_numpy(crop_pixels(photo, pixel_box, size, padding)).permute(2, 0, 1)[None])
    assert (out - expected).abs().mean() < 0.08  # the same region; only the resampling differs


def test_defaults_never_mirror_and_keep_the_pill_in_the_frame():
    size, box = 64, (0.82, 0.2, 0.3, 0.24)  # a pill near a corner: free rotation would push it out
    images = _pill_images(64, size, box)
    out, _ = BatchAugment(AugmentConfig(), size, 3)(images, torch.arange(64), torch.tensor([box] * 64),
                                                    torch.zeros(64, dtype=torch.long))
    pixels = out * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1)
    inside = (pixels.mean(1) > 0.5).float().sum((1, 2))  # bright pill pixels left in each frame
    area = (box[2] * size) * (box[3] * size)
    assert (inside > 0.75 * area).all(), inside.min()
    cfg = AugmentConfig()
    assert not cfg.hflip and not cfg.vflip and cfg.policy == "none"


def test_without_the_box_rule_a_large_shift_loses_the_pill():
    size, box = 64, (0.82, 0.2, 0.3, 0.24)
    cfg = AugmentConfig(**{**PLAIN, "translate": 0.5, "keep_box_in_frame": False})
    images = _pill_images(32, size, box)
    out, _ = BatchAugment(cfg, size, 3)(images, torch.arange(32), torch.tensor([box] * 32),
                                        torch.zeros(32, dtype=torch.long))
    assert ((out.mean(1) > 1.0).float().sum((1, 2)) < 0.5 * box[2] * box[3] * size * size).any()


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_every_policy_op_runs_on_a_batch(policy):
    cfg = AugmentConfig(policy=policy, policy_ops=3)
    images, _, boxes, labels = _batch(n=200, size=32)
    out, _ = BatchAugment(cfg, 32, 3)(images, torch.arange(200), boxes[:1].expand(200, 4), labels.repeat(200)[:200])
    assert out.shape == (200, 3, 32, 32) and torch.isfinite(out).all()
    assert len(POLICY_OPS) == 14


def test_mixup_gives_soft_targets_that_sum_to_one():
    cfg = AugmentConfig(**PLAIN, mixup=0.8, cutmix=1.0)
    images, seeds, boxes, labels = _batch(n=8)
    aug = BatchAugment(cfg, 48, 5, label_smoothing=0.1)
    out, targets = aug(images, seeds, boxes, labels)
    again, targets_again = aug(images, seeds, boxes, labels)
    assert targets.shape == (8, 5) and torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.equal(out, again) and torch.equal(targets, targets_again)  # seeded by the batch


def test_bad_values_are_named():
    assert "augment.scale" in check_augment_config(dataclasses.replace(AugmentConfig(), scale=[1.2, 0.8]))
    assert "augment.erasing" in check_augment_config(dataclasses.replace(AugmentConfig(), erasing=1.5))
    assert check_augment_config(AugmentConfig()) is None
    with pytest.raises(ConfigError, match=r"augment.hue=0.9"):
        load_config(profile="ci", overrides=["augment.hue=0.9"])


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_the_policy_colour_ops_keep_to_the_batchs_device(policy):
    """CUDA refuses arithmetic between a CUDA batch and host tensors; the `meta` device refuses it the same way, so
    every colour op of the policy runs here on a meta batch with its choices made on the host, as on a GPU."""
    from pillsnap.data.augment import COLOUR, POLICY_OPS

    aug = BatchAugment(AugmentConfig(policy=policy, policy_ops=1), 32, 3)
    colour_ops = [k for k, op in enumerate(POLICY_OPS) if op in COLOUR]
    n = 2 * len(colour_ops)
    ops = [torch.tensor(colour_ops * 2)]
    bins, signs = [torch.arange(n) % 10 + 1], [torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()]
    x = torch.rand(n, 3, 32, 32, device="meta")
    out = aug._policy_colour(x, ops, bins, signs)
    assert out.device.type == "meta" and out.shape == (n, 3, 32, 32)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_the_device_path_reads_nothing_back_and_never_waits_for_the_device(policy):
    """The whole device path (warp, colour with contrast, every policy op, erasing, mixup) on a `meta` batch: a
    meta tensor has no values, so any read back to the host (.item, .tolist, bool(), .cpu) fails here as it
    would synchronise a GPU; and every host-to-device copy is non-blocking (a blocking one waits for the
    device's queue)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.blocking = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                    and str(kwargs.get("device")) == "meta" and not kwargs.get("non_blocking", False):
                self.blocking.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    cfg = AugmentConfig(policy=policy, policy_ops=3, erasing=0.5, mixup=0.2)
    aug = BatchAugment(cfg, 32, 5, executor="torch")
    images = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device="meta")
    labels = torch.empty(16, dtype=torch.long, device="meta")
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.2]] * 16)
    with Copies() as copies:
        out, targets = aug(images, torch.arange(16), boxes, labels)
    assert out.device.type == targets.device.type == "meta" and out.shape == (16, 3, 32, 32)
    assert copies.blocking == []
