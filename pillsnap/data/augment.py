"""Classifier augmentation on whole uint8 batches: parameters for the whole batch at once, then one fused pass.

Every random choice of a sample comes from its own seed (EpochSampler gives each position one), drawn as a fixed
row of uniforms, so an augmented sample is a pure function of (index, seed): resume and OOM replay see the same
pixels whatever the batch it lands in. Mixup / CutMix pair samples inside a batch (timm's Mixup, seeded by the
batch's first sample), so those two also depend on the batch's composition.

Per sample, the batch computes ONE affine (with probability crop_view first the zoom onto the pill's padded box
that a detector crop of a combination photo shows - the box's padded rectangle stretched to the frame, exactly as
inference resizes a crop; then 90-degree turns and flips, free rotation and scale about the pill's centre,
translation, the policy's geometric ops; clamped so the pill's box stays in the frame) and ONE colour
matrix (brightness, contrast, saturation, hue and per-channel gain composed into v' = A v + t). Execution:
  GPU  (a CUDA batch): affine_grid + grid_sample, one batched matmul for colour, clamp, normalise.
  CPU  (the loader's workers): OpenCV per image on uint8 - warpAffine, a saturating 3x4 colour transform, a float
       transform that normalises - SIMD kernels with no intermediate float tensors (~60 ms per 32 x 384 px on
       one core, 5-10x faster than the same torch ops there).
Then the policy's colour ops (batched torch, on the images that drew each op), random erasing, mixup / cutmix.
The policy ops follow torchvision's RandAugment / TrivialAugmentWide tables (magnitudes in 31 bins). The two
executors agree up to interpolation rounding (under 1/255 of a pixel value).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pillsnap.config import AugmentConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's grayscale
BINS = 31
_DRAWS = 29  # uniforms per sample; each augmentation reads its own columns (below)
(U_HFLIP, U_VFLIP, U_ROT90, U_ANGLE, U_SCALE, U_TX, U_TY, U_BRIGHT, U_CONTRAST, U_SAT, U_HUE, U_GAIN_R, U_GAIN_G,
 U_GAIN_B, U_ERASE, U_ERASE_AREA, U_ERASE_ASPECT, U_ERASE_X, U_ERASE_Y) = range(19)
U_POLICY = 19  # 3 columns per policy op (which op, magnitude bin, sign), up to 3 ops
U_CROP = 28
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOUR = ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
POLICY_OPS = ("Identity", *GEOMETRIC, *COLOUR)


def sample_uniforms(seeds: Sequence[int]) -> torch.Tensor:
    """(N, _DRAWS) float64 uniforms, one row per seed."""
    rows = [np.random.default_rng(int(s) & 0x7FFF_FFFF_FFFF_FFFF).random(_DRAWS) for s in seeds]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, _DRAWS, dtype=torch.float64)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) NCHW -> float32 normalised with the ImageNet statistics."""
    scale = 1 / 255.0 if images.dtype == torch.uint8 else 1.0
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return images.float().mul_(scale / std).sub_(mean / std)  # in place: one pass after the conversion


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

    def __init__(self, cfg: AugmentConfig, image_size: int, num_classes: int, label_smoothing: float = 0.0,
                 executor: str = "auto", crop_padding: float = 0.15):
        """executor: auto (torch for CUDA batches, OpenCV for CPU batches), or torch / cv2 for either.
        crop_padding: classification.crop_padding, the margin of the crop views (as inference pads its crops)."""
        self.cfg, self.size, self.num_classes, self.executor = cfg, image_size, num_classes, executor
        self.crop_padding = crop_padding
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
        # Every parameter is drawn and composed on the host from the host's seeds and boxes; only the pixels live
        # on the device, and parameters go there with non-blocking copies: the step never waits for the device.
        u = sample_uniforms(seeds.tolist())
        ops, bins, signs = self._policy_choices(u)
        forward = self._geometry(u, boxes.cpu().double(), ops, bins, signs)  # no-op for host boxes
        colour, mean_gain = self._colour(u)
        policy_colour = any(POLICY_OPS[int(k)] in COLOUR for slot in ops for k in slot.unique())
        use_torch = self.executor == "torch" or (self.executor == "auto" and images.device.type == "cuda")
        if use_torch:
            colour = to_device(colour, images.device)
            if mean_gain is not None:
                colour[:, :, 3] += to_device(mean_gain, images.device) * mean_grey(images)[:, None]
            x = _apply_colour_torch(_warp_torch(images, forward), colour)
            x = normalise(self._policy_colour(x, ops, bins, signs)) if policy_colour else normalise(x)
        else:
            if mean_gain is not None:
                colour[:, :, 3] += mean_gain * mean_grey(images)[:, None]
            x = _warp_and_colour_cv2(images, forward, colour, normalised=not policy_colour)
            x = normalise(self._policy_colour(x, ops, bins, signs)) if policy_colour else x
        x = self._erase(x, u)
        if self.mixup is not None and len(x) % 2 == 0:
            x, labels = self._mix(x, labels, int(seeds[0]))
        return x, labels

    # ------------------------------------------------------------------ geometry
    def _crop_views(self, u: torch.Tensor, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 3) zooms that stretch the padded pill box to the frame (identity for the samples that keep the
        whole photo or have no box), and the pill boxes after them."""
        zoom = torch.eye(3, dtype=torch.float64).repeat(len(u), 1, 1)
        chosen = (u[:, U_CROP] < self.cfg.crop_view) & (boxes[:, 2:] > 0).all(1)
        if not chosen.any():
            return zoom, boxes
        grow = 1 + 2 * self.crop_padding
        half = (boxes[chosen, 2:] * grow).clamp(max=1.0)  # the padded box's half extent in [-1, 1] units
        centre = 2 * boxes[chosen, :2] - 1
        zoom[chosen, 0, 0], zoom[chosen, 1, 1] = 1 / half[:, 0], 1 / half[:, 1]
        zoom[chosen, :2, 2] = -centre / half
        boxes = boxes.clone()
        boxes[chosen] = torch.cat([torch.full_like(half, 0.5), boxes[chosen, 2:] / half], 1)
        return zoom, boxes

    def _geometry(self, u: torch.Tensor, boxes: torch.Tensor, ops, bins, signs) -> torch.Tensor:
        """(N, 3, 3) forward affines in grid_sample's [-1, 1] coordinates (align_corners=False)."""
        c = self.cfg
        n = len(u)
        zoom, boxes = self._crop_views(u, boxes)
        lossless = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        if c.hflip:
            lossless[:, 0, 0] = torch.where(u[:, U_HFLIP] < 0.5, -1.0, 1.0)
        if c.vflip:
            lossless[:, 1, 1] = torch.where(u[:, U_VFLIP] < 0.5, -1.0, 1.0)
        if c.rot90:
            lossless = _rotation(torch.floor(u[:, U_ROT90] * 4) * 90.0) @ lossless
        angle = (2 * u[:, U_ANGLE] - 1) * c.rotate_degrees
        scale = c.scale[0] + u[:, U_SCALE] * (c.scale[1] - c.scale[0])
        shift = (2 * u[:, U_TX:U_TY + 1] - 1) * c.translate * 2  # [-1, 1] coordinates span 2
        shear = torch.zeros(n, 2, dtype=torch.float64)
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
        corners = torch.stack([half * torch.tensor(s, dtype=torch.float64)
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
        return _translate(centre + shift) @ linear @ _translate(-centre) @ lossless @ zoom

    # ------------------------------------------------------------------ colour
    def _colour(self, u: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(N, 3, 4): brightness, contrast, saturation, hue and channel gain as ONE affine on RGB in [0, 1], and
        with contrast, the (N, 3) gain of each photo's mean grey in its offset (None without contrast).

        Composed without clamping between the steps (the executors clamp once, at the end); contrast blends
        towards the photo's mean grey (`mean_grey`), which the steps after it carry linearly: the executor adds
        gain x mean where the pixels are, so the matrices never wait for them.
        """
        c, n = self.cfg, len(u)
        jitter = lambda i, span: 1 + (2 * u[:, i] - 1) * span  # noqa: E731
        eye = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        grey_row = torch.tensor(GREY, dtype=torch.float64)
        b = jitter(U_BRIGHT, c.brightness)
        matrix, offset = eye * b.view(-1, 1, 1), torch.zeros(n, 3, dtype=torch.float64)
        mean_gain = None
        if c.contrast:
            k = jitter(U_CONTRAST, c.contrast)
            matrix = matrix * k.view(-1, 1, 1)
            mean_gain = ((1 - k) * b).view(-1, 1).expand(n, 3)  # towards the mean grey after brightness
        steps = []
        if c.saturation:
            sat = jitter(U_SAT, c.saturation).view(-1, 1, 1)
            steps.append(sat * eye + (1 - sat) * grey_row.view(1, 1, 3).expand(n, 3, 3))
        if c.hue:
            steps.append(_hue_matrix((2 * u[:, U_HUE] - 1) * c.hue * 2 * math.pi))
        if c.channel_gain:
            steps.append(torch.diag_embed(1 + (2 * u[:, U_GAIN_R:U_GAIN_B + 1] - 1) * c.channel_gain))
        for step in steps:
            matrix, offset = step @ matrix, (step @ offset.unsqueeze(-1)).squeeze(-1)
            if mean_gain is not None:
                mean_gain = (step @ mean_gain.unsqueeze(-1)).squeeze(-1)
        return torch.cat([matrix, offset.unsqueeze(-1)], 2), mean_gain

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
        """The policy's colour ops on the batch's device; the choices (host tensors) are read on the host, and
        what enters the batch's arithmetic goes to its device first (CUDA refuses a mix)."""
        for slot in range(len(ops)):
            for k, op in enumerate(POLICY_OPS):
                chosen = ops[slot] == k
                if op not in COLOUR or not chosen.any():
                    continue
                mag = to_device(_policy_magnitude(op, bins[slot], self.wide, self.size)[chosen].to(x.dtype), x.device)
                sign = to_device(signs[slot][chosen].to(x.dtype), x.device)
                # host indices: a boolean mask on the device would make it count the chosen ones (a sync)
                index = to_device(chosen.nonzero().squeeze(1), x.device)
                x.index_copy_(0, index, _COLOUR_OPS[op](x.index_select(0, index).clamp(0, 1), mag, sign))
        return x

    # ------------------------------------------------------------------ erasing and mixing
    def _erase(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Random erasing; its rectangles drawn on the host (`u`), the mask made where the pixels are."""
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
        spans = to_device(torch.stack([top, top + h, left, left + w], 1), x.device)
        top, bottom, left, right = spans.unbind(1)
        grid = (torch.arange(self.size, device=x.device, dtype=torch.float64) + 0.5) / self.size
        rows = (grid[None] >= top[:, None]) & (grid[None] < bottom[:, None])
        cols = (grid[None] >= left[:, None]) & (grid[None] < right[:, None])
        mask = (rows[:, :, None] & cols[:, None, :]) & to_device(erase, x.device)[:, None, None]
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to the pixels' device without waiting for the device's queue (a blocking copy synchronises
    the stream; a pageable source is staged at once, so the host may reuse it right after)."""
    return t.to(device, non_blocking=True)


def mean_grey(images: torch.Tensor) -> torch.Tensor:
    """(N,) each uint8 photo's mean grey in [0, 1], on a strided subsample, on the photos' own device."""
    return _grey(images[:, :, ::8, ::8].double() / 255.0).mean((1, 2, 3))


def _grey(x: torch.Tensor) -> torch.Tensor:
    return GREY[0] * x[:, 0:1] + GREY[1] * x[:, 1:2] + GREY[2] * x[:, 2:3]


def _hue_matrix(radians: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) hue turns: a rotation of the chroma plane in YIQ (linear, so it composes with the rest)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=torch.float64)
    rot = torch.zeros(len(radians), 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(radians), -torch.sin(radians)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(radians), torch.cos(radians)
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


# ---------------------------------------------------------------------- executors
def _moved(forward: torch.Tensor) -> torch.Tensor:
    return (forward - torch.eye(3, dtype=forward.dtype)).abs().amax((1, 2)) > 1e-9


def _warp_torch(images: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW on any device -> float [0, 1], every moved sample resampled by one batched grid_sample."""
    x = images.float().div_(255.0)
    moved = _moved(forward)
    if moved.any():
        theta = to_device(torch.linalg.inv(forward[moved])[:, :2].to(x.dtype), x.device)
        index = to_device(moved.nonzero().squeeze(1), x.device)
        part = x.index_select(0, index)
        grid = F.affine_grid(theta, list(part.shape), align_corners=False)
        x.index_copy_(0, index, F.grid_sample(part, grid, mode="bilinear", padding_mode="reflection",
                                              align_corners=False))
    return x


def _apply_colour_torch(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    out = torch.baddbmm(colour[:, :, 3:].to(x.dtype), colour[:, :, :3].to(x.dtype), x.reshape(n, 3, h * w))
    return out.view(n, 3, h, w).clamp_(0.0, 1.0)


def _pixel_affine(forward: torch.Tensor, size: int) -> np.ndarray:
    """Forward affines from [-1, 1] grid coordinates (align_corners=False) to OpenCV's pixel coordinates."""
    to_pixels = torch.tensor([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]],
                             dtype=torch.float64)
    return (to_pixels @ forward @ torch.linalg.inv(to_pixels))[:, :2].numpy().astype(np.float32)


_NORMALISE_255 = np.concatenate([np.diag([1 / (255.0 * s) for s in STD]), [[-m / s] for m, s in zip(MEAN, STD)]],
                                1).astype(np.float32)


def _warp_and_colour_cv2(images: torch.Tensor, forward: torch.Tensor, colour: torch.Tensor,
                         normalised: bool) -> torch.Tensor:
    """CPU: per image, warpAffine and the colour matrix on uint8 (saturating: the clamp), then either the
    normalisation as a float transform (-> normalised NCHW float) or a plain conversion (-> [0, 1] NCHW float)."""
    import cv2

    n, _, h, w = images.shape
    pixels = images.permute(0, 2, 3, 1).numpy()  # NHWC: a view of a channels-last batch, a copy otherwise
    affines, moved = _pixel_affine(forward, h), _moved(forward).tolist()
    colour_255 = colour.clone()
    colour_255[:, :, 3] *= 255.0
    colour_255 = colour_255.numpy().astype(np.float32)
    out = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        image = np.ascontiguousarray(pixels[i])
        if moved[i]:
            image = cv2.warpAffine(image, affines[i], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        image = cv2.transform(image, colour_255[i])
        if normalised:
            cv2.transform(image.astype(np.float32), _NORMALISE_255, dst=out[i])
        else:
            out[i] = image.astype(np.float32) / 255.0
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # channels-last memory, NCHW shape


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
    values = (x * 255).round().long().clamp(0, 255).reshape(n * ch, h * w)
    hist = torch.zeros(n * ch, 256, device=x.device, dtype=x.dtype).scatter_add_(
        1, values, torch.ones(n * ch, h * w, device=x.device, dtype=x.dtype))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1) * 255).clamp(0, 255)
    return (lut.gather(1, values) / 255).reshape(n, ch, h, w)


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
