"""Classifier augmentation on whole uint8 batches: one vectorised pass, on the GPU when there is one.

Every random choice of a sample comes from its own seed (EpochSampler gives each position one), drawn as a fixed
row of uniforms, so an augmented sample is a pure function of (index, seed): resume and OOM replay see the same
pixels whatever the batch it lands in. Mixup / CutMix pair samples inside a batch (timm's Mixup, seeded by the
batch's first sample), so those two also depend on the batch's composition.

Order: one affine per sample (90-degree turns and flips, free rotation and scale about the pill's centre,
translation, the policy's geometric ops), clamped so the pill's box stays in the frame, applied by one
grid_sample; then colour (brightness, contrast, saturation, hue, per-channel gain) and the policy's colour ops,
normalisation, random erasing, mixup/cutmix.
The policy ops follow torchvision's RandAugment / TrivialAugmentWide tables (magnitudes in 31 bins).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pillsnap.config import AugmentConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BINS = 31
_DRAWS = 28  # uniforms per sample; each augmentation reads its own columns (below)
(U_HFLIP, U_VFLIP, U_ROT90, U_ANGLE, U_SCALE, U_TX, U_TY, U_BRIGHT, U_CONTRAST, U_SAT, U_HUE, U_GAIN_R, U_GAIN_G,
 U_GAIN_B, U_ERASE, U_ERASE_AREA, U_ERASE_ASPECT, U_ERASE_X, U_ERASE_Y) = range(19)
U_POLICY = 19  # 3 columns per policy op (which op, magnitude bin, sign), up to 3 ops
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOUR = ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
POLICY_OPS = ("Identity", *GEOMETRIC, *COLOUR)


def sample_uniforms(seeds: Sequence[int]) -> torch.Tensor:
    """(N, _DRAWS) float64 uniforms, one row per seed."""
    rows = [np.random.default_rng(int(s) & 0x7FFF_FFFF_FFFF_FFFF).random(_DRAWS) for s in seeds]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, _DRAWS, dtype=torch.float64)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) NCHW -> float32 normalised with the ImageNet statistics."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _policy_magnitude(op: str, bin_index: torch.Tensor, wide: bool, size: int) -> torch.Tensor:
    """The op's magnitude for each magnitude bin (torchvision's tables)."""
    frac = bin_index.double() / (BINS - 1)
    if op in ("ShearX", "ShearY"):
        return frac * (0.99 if wide else 0.3)
    if op in ("TranslateX", "TranslateY"):  # as a fraction of the side
        return frac * ((32.0 / size) if wide else 150.0 / 331.0)
    if op == "Rotate":
        return frac * (135.0 if wide else 30.0)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return frac * (0.99 if wide else 0.9)
    if op == "Posterize":
        return 8 - (bin_index.double() / ((BINS - 1) / (6 if wide else 4))).round()
    if op == "Solarize":
        return 1.0 - frac
    return torch.zeros_like(frac)


class BatchAugment:
    """train(images_u8, seeds, boxes, labels) -> (normalised float images, targets) for a whole batch.

    boxes: (N, 4) pill boxes (cx, cy, w, h) as fractions of the sample frame; w = h = 0 when unknown.
    targets: the labels, or soft targets (N, num_classes) when mixup / cutmix mixed the batch.
    """

    def __init__(self, cfg: AugmentConfig, image_size: int, num_classes: int, label_smoothing: float = 0.0):
        self.cfg, self.size, self.num_classes = cfg, image_size, num_classes
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                               label_smoothing=label_smoothing, num_classes=num_classes)

    @property
    def soft_targets(self) -> bool:
        return self.mixup is not None

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor, boxes: torch.Tensor,
                 labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not len(images):
            return normalise(images), labels
        u = sample_uniforms(seeds.tolist()).to(images.device)
        ops, bins, signs = self._policy_choices(u)
        x = images.float() / 255.0
        x = self._geometry(x, u, boxes.to(images.device).double(), ops, bins, signs)
        x = self._colour(x, u)
        x = self._policy_colour(x, ops, bins, signs)
        x = normalise(x.clamp_(0.0, 1.0))
        x = self._erase(x, u)
        if self.mixup is not None and len(x) % 2 == 0:
            x, labels = self._mix(x, labels, int(seeds[0]))
        return x.contiguous(), labels

    # ------------------------------------------------------------------ geometry
    def _geometry(self, x: torch.Tensor, u: torch.Tensor, boxes: torch.Tensor, ops, bins, signs) -> torch.Tensor:
        c = self.cfg
        n = len(x)
        lossless = torch.eye(3, dtype=torch.float64, device=x.device).repeat(n, 1, 1)
        if c.hflip:
            lossless[:, 0, 0] = torch.where(u[:, U_HFLIP] < 0.5, -1.0, 1.0)
        if c.vflip:
            lossless[:, 1, 1] = torch.where(u[:, U_VFLIP] < 0.5, -1.0, 1.0)
        if c.rot90:
            lossless = _rotation(torch.floor(u[:, U_ROT90] * 4) * 90.0) @ lossless
        angle = (2 * u[:, U_ANGLE] - 1) * c.rotate_degrees
        scale = c.scale[0] + u[:, U_SCALE] * (c.scale[1] - c.scale[0])
        shift = (2 * u[:, U_TX:U_TY + 1] - 1) * c.translate * 2  # [-1, 1] coordinates span 2
        shear = torch.zeros(n, 2, dtype=torch.float64, device=x.device)
        for k, op in enumerate(POLICY_OPS):
            for slot in range(len(ops)):
                chosen = ops[slot] == k
                if op not in GEOMETRIC or not chosen.any():
                    continue
                mag = (_policy_magnitude(op, bins[slot], self.wide, self.size) * signs[slot])[chosen]
                if op == "Rotate":
                    angle[chosen] += mag
                elif op == "ShearX":
                    shear[chosen, 0] += mag
                elif op == "ShearY":
                    shear[chosen, 1] += mag
                else:
                    shift[chosen, 0 if op == "TranslateX" else 1] += 2 * mag
        linear = _rotation(angle) @ _shear(shear) @ _scale(scale)
        centre = (lossless[:, :2, :2] @ (2 * boxes[:, :2] - 1).unsqueeze(-1)).squeeze(-1)
        half = boxes[:, 2:] if c.keep_box_in_frame else torch.zeros_like(boxes[:, 2:])
        corners = torch.stack([half * torch.tensor(s, dtype=torch.float64, device=x.device)
                               for s in ((1, 1), (1, -1), (-1, 1), (-1, -1))], 1)  # (N, 4, 2) about the centre
        offsets = (lossless[:, None, :2, :2] @ corners.unsqueeze(-1)).squeeze(-1)
        offsets = (linear[:, None, :2, :2] @ offsets.unsqueeze(-1)).squeeze(-1)
        if c.keep_box_in_frame:
            extent = (offsets.amax(1) - offsets.amin(1)).amax(1)
            shrink = torch.clamp(2.0 / extent.clamp_min(1e-9), max=1.0)  # a box wider than the frame shrinks
            linear[:, :2, :2] *= shrink[:, None, None]
            offsets = offsets * shrink[:, None, None]
            target = centre + shift
            shift = target.clamp(-1 - offsets.amin(1), 1 - offsets.amax(1)) - centre
        forward = _translate(centre + shift) @ linear @ _translate(-centre) @ lossless
        identity = torch.eye(3, dtype=torch.float64, device=x.device)
        moved = (forward - identity).abs().amax((1, 2)) > 1e-9
        if not moved.any():
            return x
        theta = torch.linalg.inv(forward[moved])[:, :2].to(x.dtype)
        grid = F.affine_grid(theta, list(x[moved].shape), align_corners=False)
        x = x.clone()
        x[moved] = F.grid_sample(x[moved], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return x

    # ------------------------------------------------------------------ colour
    def _colour(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        col = lambda i, span: (1 + (2 * u[:, i] - 1) * span).to(x.dtype).view(-1, 1, 1, 1)  # noqa: E731
        if c.brightness:
            x = x * col(U_BRIGHT, c.brightness)
        if c.contrast:
            mean = _grey(x).mean((1, 2, 3), keepdim=True)
            x = mean + (x - mean) * col(U_CONTRAST, c.contrast)
        if c.saturation:
            grey = _grey(x)
            x = grey + (x - grey) * col(U_SAT, c.saturation)
        if c.hue:
            x = _rotate_hue(x, ((2 * u[:, U_HUE] - 1) * c.hue * 2 * math.pi).to(x.dtype))
        if c.channel_gain:
            gains = 1 + (2 * u[:, U_GAIN_R:U_GAIN_B + 1] - 1) * c.channel_gain
            x = x * gains.to(x.dtype).view(-1, 3, 1, 1)
        return x

    @property
    def wide(self) -> bool:
        return self.cfg.policy == "trivialaugment"

    def _policy_choices(self, u: torch.Tensor):
        """Per slot: op index into POLICY_OPS, magnitude bin, sign (+1 / -1)."""
        policy = self.cfg.policy
        if policy == "none":
            return [], [], []
        slots = 1 if policy == "trivialaugment" else max(1, min(3, self.cfg.policy_ops))
        ops, bins, signs = [], [], []
        for slot in range(slots):
            base = U_POLICY + 3 * slot
            ops.append(torch.floor(u[:, base] * len(POLICY_OPS)).long().clamp_max(len(POLICY_OPS) - 1))
            if policy == "trivialaugment":
                bins.append(torch.floor(u[:, base + 1] * BINS).long().clamp_max(BINS - 1))
            else:
                bins.append(torch.full_like(ops[-1], int(self.cfg.policy_magnitude)))
            signs.append(torch.where(u[:, base + 2] < 0.5, -1.0, 1.0).to(u.dtype))
        return ops, bins, signs

    def _policy_colour(self, x: torch.Tensor, ops, bins, signs) -> torch.Tensor:
        for slot in range(len(ops)):
            for k, op in enumerate(POLICY_OPS):
                chosen = ops[slot] == k
                if op not in COLOUR or not chosen.any():
                    continue
                mag = _policy_magnitude(op, bins[slot], self.wide, self.size)[chosen].to(x.dtype)
                sign = signs[slot][chosen].to(x.dtype)
                x = x.clone() if not x.is_contiguous() else x
                x[chosen] = _COLOUR_OPS[op](x[chosen].clamp(0, 1), mag, sign)
        return x

    # ------------------------------------------------------------------ erasing and mixing
    def _erase(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        p = self.cfg.erasing
        if p <= 0:
            return x
        erase = u[:, U_ERASE] < p
        if not erase.any():
            return x
        area = 0.02 + u[:, U_ERASE_AREA] * (0.2 - 0.02)
        log_ratio = math.log(0.3) + u[:, U_ERASE_ASPECT] * (math.log(1 / 0.3) - math.log(0.3))
        ratio = torch.exp(log_ratio)
        h = torch.sqrt(area * ratio).clamp_max(1.0)
        w = torch.sqrt(area / ratio).clamp_max(1.0)
        top, left = u[:, U_ERASE_Y] * (1 - h), u[:, U_ERASE_X] * (1 - w)
        grid = (torch.arange(self.size, device=x.device, dtype=torch.float64) + 0.5) / self.size
        rows = (grid[None] >= top[:, None]) & (grid[None] < (top + h)[:, None])
        cols = (grid[None] >= left[:, None]) & (grid[None] < (left + w)[:, None])
        mask = (rows[:, :, None] & cols[:, None, :]) & erase[:, None, None]
        return x.masked_fill(mask[:, None], 0.0)  # 0 after normalisation = the mean colour (timm's "const")

    def _mix(self, x: torch.Tensor, labels: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        state = np.random.get_state()
        np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy's global generator
        try:
            return self.mixup(x, labels)
        finally:
            np.random.set_state(state)


# ---------------------------------------------------------------------- helpers
def _rotation(degrees: torch.Tensor) -> torch.Tensor:
    r = torch.deg2rad(degrees.double())
    m = torch.eye(3, dtype=torch.float64, device=degrees.device).repeat(len(r), 1, 1)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = torch.cos(r), -torch.sin(r), torch.sin(r), torch.cos(r)
    return m


def _scale(s: torch.Tensor) -> torch.Tensor:
    m = torch.eye(3, dtype=torch.float64, device=s.device).repeat(len(s), 1, 1)
    m[:, 0, 0], m[:, 1, 1] = s, s
    return m


def _shear(sh: torch.Tensor) -> torch.Tensor:
    m = torch.eye(3, dtype=torch.float64, device=sh.device).repeat(len(sh), 1, 1)
    m[:, 0, 1], m[:, 1, 0] = sh[:, 0], sh[:, 1]
    return m


def _translate(t: torch.Tensor) -> torch.Tensor:
    m = torch.eye(3, dtype=torch.float64, device=t.device).repeat(len(t), 1, 1)
    m[:, :2, 2] = t
    return m


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rotate_hue(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    """Hue turn as a rotation of the chroma plane in YIQ (linear, so one batched matmul)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=x.dtype, device=x.device)
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(radians), torch.sin(radians)
    rot = torch.zeros(len(x), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = from_yiq @ rot @ to_yiq  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, x)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return b + (a - b) * factor.view(-1, 1, 1, 1)


def _sharpness(x, mag, sign):
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    return _blend(x, blurred, 1 + mag * sign)


def _autocontrast(x, mag, sign):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _equalize(x, mag, sign):
    n, ch, h, w = x.shape
    values = (x * 255).round().long().clamp(0, 255).view(n * ch, h * w)
    hist = torch.zeros(n * ch, 256, device=x.device, dtype=x.dtype).scatter_add_(1, values, torch.ones_like(x).view(n * ch, -1))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1) * 255).clamp(0, 255)
    return (lut.gather(1, values) / 255).view(n, ch, h, w)


_COLOUR_OPS: Dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Brightness": lambda x, m, s: x * (1 + m * s).view(-1, 1, 1, 1),
    "Color": lambda x, m, s: _blend(x, _grey(x), 1 + m * s),
    "Contrast": lambda x, m, s: _blend(x, _grey(x).mean((1, 2, 3), keepdim=True), 1 + m * s),
    "Sharpness": _sharpness,
    "Posterize": lambda x, m, s: torch.floor(x * 255 / (2 ** (8 - m)).view(-1, 1, 1, 1))
    * (2 ** (8 - m)).view(-1, 1, 1, 1) / 255,
    "Solarize": lambda x, m, s: torch.where(x >= m.view(-1, 1, 1, 1), 1 - x, x),
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}
