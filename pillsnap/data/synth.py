"""Synthetic pill photos written in the AIHub "경구약제 이미지 데이터" layout, so one importer serves both.

train/images/single/TS_<g>_single/<K>/<K>_<tokens>.png      train/labels/single/TL_<g>_single/<K>_json/<stem>.json
train/images/combination/TS_1_combo/<K-a-b>/<stem>.png      train/labels/combination/TL_1_combo/<K-a-b>_json/<K>/<stem>.json
val/ the same with VS_/VL_ prefixes: the AIHub Validation split, which this project uses as its sealed test set.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFilter

from pillsnap.config import SynthConfig
from pillsnap.data.pill_look import SHAPES, SHAPES_EN, PillLook, draw_pill, kcode_for, pill_look
from pillsnap.progress import progress

log = logging.getLogger(__name__)

BACKGROUNDS = ((205, 205, 200), (52, 54, 58), (120, 150, 190))  # back_color 0, 1, 2
LIGHT_TINTS = ((1.0, 1.0, 1.0), (1.06, 1.0, 0.92), (0.93, 0.98, 1.07))  # light_color 0, 1, 2
CAMERA_LA = (60, 70, 75, 90)
CAMERA_LO = tuple(range(0, 360, 20))
CLASSES_PER_FOLDER = 25
# Every (back_color, drug_dir, light_color, camera_la, camera_lo) combination: one file name each.
_GRID = [(b, d, li, la, lo) for b in range(3) for d in range(2) for li in range(3) for la in CAMERA_LA
         for lo in CAMERA_LO]


@dataclass(frozen=True)
class Shot:
    """The nuisance factors of one photo; they also form the AIHub file-name tokens."""
    back_color: int
    drug_dir: int
    light_color: int
    camera_la: int
    camera_lo: int

    @property
    def tokens(self) -> str:
        return f"0_{self.back_color}_{self.drug_dir}_{self.light_color}_{self.camera_la}_{self.camera_lo:03d}_200"


def _shots(seed: int, key: int, count: int, offset: int = 0) -> List[Shot]:
    if offset + count > len(_GRID):
        raise ValueError(f"at most {len(_GRID)} images per class or combination (asked {offset + count})")
    order = np.random.default_rng([seed, key]).permutation(len(_GRID))[offset:offset + count]
    return [Shot(*_GRID[i]) for i in order]


def _background(rng: np.random.Generator, shot: Shot, width: int, height: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[shot.back_color], np.float32) + rng.normal(0, 8, 3)
    ramp = np.linspace(-12, 12, height, dtype=np.float32)[:, None, None] * rng.uniform(-1, 1)
    return np.clip(np.broadcast_to(base, (height, width, 3)) + ramp, 0, 255).astype(np.float32)


def _place_pill(canvas: np.ndarray, pill: Image.Image, x: int, y: int) -> None:
    rgba = np.asarray(pill, np.float32)
    h, w = rgba.shape[:2]
    alpha = rgba[..., 3:4] / 255.0
    region = canvas[y:y + h, x:x + w]
    shadow = np.clip(alpha * 0.35, 0, 1)  # a soft contact shadow under the pill, offset down-right
    sy, sx = min(3, canvas.shape[0] - y - h), min(3, canvas.shape[1] - x - w)
    if sy > 0 and sx > 0:
        canvas[y + sy:y + h + sy, x + sx:x + w + sx] *= 1 - shadow
    region[:] = region * (1 - alpha) + rgba[..., :3] * alpha


def _transformed_pill(rng: np.random.Generator, look: PillLook, shot: Shot, width_px: float) -> Image.Image:
    pill = draw_pill(look, width_px * rng.uniform(0.92, 1.08), back_side=shot.drug_dir == 1)
    pill = pill.rotate(float(shot.camera_lo) + rng.uniform(-10, 10), resample=Image.BILINEAR, expand=True)
    squash = np.sin(np.deg2rad(shot.camera_la))  # a lower camera latitude foreshortens the pill
    return pill.resize((pill.width, max(4, int(pill.height * squash))), Image.BILINEAR)


def _finish(rng: np.random.Generator, canvas: np.ndarray, shot: Shot) -> Image.Image:
    canvas *= np.array(LIGHT_TINTS[shot.light_color], np.float32) * rng.uniform(0.9, 1.1)
    canvas += rng.normal(0, rng.uniform(1, 5), canvas.shape).astype(np.float32)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    radius = rng.uniform(0, 1.2) * max(canvas.shape[:2]) / 400
    return img.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.3 else img


def render_single(look: PillLook, shot: Shot, width: int, height: int, seed: Sequence[int],
                  pill_scale: float = 0.34) -> Tuple[Image.Image, List[int]]:
    rng = np.random.default_rng(seed)
    canvas = _background(rng, shot, width, height)
    pill = _transformed_pill(rng, look, shot, width * pill_scale * look.size)
    pill = pill.crop(pill.getbbox())
    x = int(rng.uniform(0.1, 0.9) * (width - pill.width))
    y = int(rng.uniform(0.1, 0.9) * (height - pill.height))
    _place_pill(canvas, pill, x, y)
    return _finish(rng, canvas, shot), [x, y, pill.width, pill.height]


def _overlaps(box: List[int], boxes: Sequence[List[int]], gap: int) -> bool:
    x, y, w, h = box
    return any(x < bx + bw + gap and bx < x + w + gap and y < by + bh + gap and by < y + h + gap
               for bx, by, bw, bh in boxes)


def render_combination(looks: Sequence[PillLook], shot: Shot, width: int, height: int,
                       seed: Sequence[int], pill_scale: float = 0.34) -> Tuple[Image.Image, List[List[int]]]:
    rng = np.random.default_rng(seed)
    canvas = _background(rng, shot, width, height)
    boxes: List[List[int]] = []
    scale = pill_scale * 0.76  # several pills share the frame
    for look in looks:
        for attempt in range(300):  # a crowded frame shrinks the pill every 20 tries
            if attempt % 20 == 0:
                pill = _transformed_pill(rng, look, shot, width * scale * look.size * (0.93 ** (attempt // 20)))
                pill = pill.crop(pill.getbbox())
            box = [int(rng.uniform(0.02, 0.98) * (width - pill.width)),
                   int(rng.uniform(0.02, 0.98) * (height - pill.height)), pill.width, pill.height]
            if not _overlaps(box, boxes, gap=max(2, width // 100)):
                break
        else:
            raise RuntimeError(f"could not place {len(looks)} pills without overlap in {width}x{height}")
        _place_pill(canvas, pill, box[0], box[1])
        boxes.append(box)
    return _finish(rng, canvas, shot), boxes


def pill_json(look: PillLook, shot: Shot, file_name: str, width: int, height: int, box: List[int],
              drug_n: str, dl_idx: int) -> Dict:
    """One label file with the real AIHub field names (COCO-style images/annotations/categories)."""
    k_code = kcode_for(look.index)
    number = int(k_code[2:])
    image = {
        "file_name": file_name, "width": width, "height": height, "imgfile": file_name,
        "drug_N": drug_n, "drug_S": "정상", "back_color": ["연회색 배경", "검은색 배경", "파란색 배경"][shot.back_color],
        "drug_dir": ["앞면", "뒷면"][shot.drug_dir], "light_color": ["주광색", "백색", "전구색"][shot.light_color],
        "camera_la": shot.camera_la, "camera_lo": shot.camera_lo, "size": 200, "dl_idx": str(dl_idx),
        "dl_mapping_code": k_code, "dl_name": f"합성약{look.index:04d}정 {10 * (1 + look.index % 50)}mg/PTP",
        "dl_name_en": f"Synthpill {look.index:04d} Tab. {10 * (1 + look.index % 50)}mg",
        "dl_material": "합성성분", "dl_material_en": "synthetic", "dl_custom_shape": "정제",
        "dl_company": "필스냅제약(주)", "dl_company_en": "PillSnap Pharm", "di_company_mf": "",
        "di_company_mf_en": "", "item_seq": 200000000 + number, "di_item_permit_date": "20200101",
        "di_class_no": "[01140]해열.진통.소염제", "di_etc_otc_code": "전문의약품",
        "di_edi_code": f"{640000000 + number}" + (f",A0{5000000 + number}" if look.index % 7 == 0 else ""),
        "chart": f"{look.colour1} {look.shape} 정제", "drug_shape": look.shape,
        "thick": round(3.0 + look.size, 2), "leng_long": round(8.0 * look.size, 2),
        "leng_short": round(8.0 * look.size * look.aspect, 2), "print_front": look.print_front,
        "print_back": look.print_back, "color_class1": look.colour1,
        "color_class2": look.colour2 if look.colour2 != look.colour1 else "",
        "line_front": look.score, "line_back": "", "img_regist_ts": "20210101",
        "form_code_name": "필름코팅정", "mark_code_front_anal": "", "mark_code_back_anal": "",
        "mark_code_front_img": "", "mark_code_back_img": "", "mark_code_front": "", "mark_code_back": "",
        "change_date": "20210101", "id": 1, "shape_en": SHAPES_EN[SHAPES.index(look.shape)],
    }
    x, y, w, h = box
    return {
        "images": [image],
        "type": "instance",
        "annotations": [{"area": w * h, "iscrowd": 0, "bbox": [x, y, w, h], "category_id": 1, "ignore": 0,
                         "segmentation": [], "id": 1, "image_id": 1}],
        "categories": [{"supercategory": "pill", "id": 1, "name": image["dl_name"]}],
    }


def _write_json(path: Path, obj: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))


def _prefixes(split: str) -> Tuple[str, str]:
    return ("TS", "TL") if split == "train" else ("VS", "VL")


def _write_single_class(args) -> int:
    root, split, index, count, offset, width, height, seed, pill_scale = args
    look, k_code = pill_look(index), kcode_for(index)
    img_prefix, lbl_prefix = _prefixes(split)
    group = index // CLASSES_PER_FOLDER + 1
    img_dir = root / split / "images" / "single" / f"{img_prefix}_{group}_single" / k_code
    lbl_dir = root / split / "labels" / "single" / f"{lbl_prefix}_{group}_single" / f"{k_code}_json"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, shot in enumerate(_shots(seed, index, count, offset)):
        stem = f"{k_code}_{shot.tokens}"
        img, box = render_single(look, shot, width, height, [seed, index, offset + i], pill_scale)
        img.save(img_dir / f"{stem}.png", compress_level=1)
        _write_json(lbl_dir / f"{stem}.json",
                    pill_json(look, shot, f"{stem}.png", width, height, box, k_code, index))
    return count


def _write_combination(args) -> int:
    root, split, combo_id, indices, count, width, height, seed, pill_scale = args
    looks = [pill_look(i) for i in indices]
    codes = [kcode_for(i) for i in indices]
    folder = "K-" + "-".join(c[2:] for c in codes)
    img_prefix, lbl_prefix = _prefixes(split)
    img_dir = root / split / "images" / "combination" / f"{img_prefix}_1_combo" / folder
    lbl_dir = root / split / "labels" / "combination" / f"{lbl_prefix}_1_combo" / f"{folder}_json"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, shot in enumerate(_shots(seed, 1_000_000 + combo_id, count)):
        stem = f"{folder}_{shot.tokens}"
        img, boxes = render_combination(looks, shot, width, height, [seed, 1_000_000 + combo_id, i], pill_scale)
        img.save(img_dir / f"{stem}.png", compress_level=1)
        for look, code, box in zip(looks, codes, boxes):
            _write_json(lbl_dir / code / f"{stem}.json",
                        pill_json(look, shot, f"{stem}.png", width, height, box, folder, look.index))
    return count


def _combination_jobs(root: Path, split: str, cfg: SynthConfig, n_combos: int, id_offset: int) -> Iterator:
    rng = np.random.default_rng([cfg.seed, 77, id_offset])
    for c in range(n_combos):
        n_pills = int(rng.integers(2, 6))
        indices = sorted(rng.choice(cfg.num_classes, size=min(n_pills, cfg.num_classes), replace=False).tolist())
        yield (root, split, id_offset + c, indices, cfg.images_per_combination, cfg.width, cfg.height, cfg.seed,
               cfg.pill_scale)


def class_sizes(cfg: SynthConfig) -> List[int]:
    """Training photos per class: all equal, or seeded counts between images_per_class_min and images_per_class."""
    if not cfg.images_per_class_min:
        return [cfg.images_per_class] * cfg.num_classes
    if not 0 < cfg.images_per_class_min <= cfg.images_per_class:
        raise ValueError(f"synth.images_per_class_min={cfg.images_per_class_min} must be in "
                         f"[1, images_per_class={cfg.images_per_class}]")
    rng = np.random.default_rng([cfg.seed, 91])
    return rng.integers(cfg.images_per_class_min, cfg.images_per_class + 1, cfg.num_classes).tolist()


def synthesize(cfg: SynthConfig, out_dir: Path | None = None, show_progress: bool = True) -> Dict[str, int]:
    """Write the whole synthetic dataset; deterministic for `cfg.seed`. Returns image counts."""
    root = Path(out_dir or cfg.out_dir)
    n_test = cfg.test_images_per_class
    jobs_single = [(root, "train", k, n, 0, cfg.width, cfg.height, cfg.seed, cfg.pill_scale)
                   for k, n in enumerate(class_sizes(cfg))]
    if n_test:
        jobs_single += [(root, "val", k, n_test, cfg.images_per_class, cfg.width, cfg.height, cfg.seed,
                         cfg.pill_scale) for k in range(cfg.num_classes)]
    jobs_combo = list(_combination_jobs(root, "train", cfg, cfg.combinations, 0))
    jobs_combo += list(_combination_jobs(root, "val", cfg, cfg.test_combinations, cfg.combinations))
    total = sum(j[3] for j in jobs_single) + sum(j[4] for j in jobs_combo)
    workers = cfg.workers or os.cpu_count() or 1
    counts = {"single": 0, "combination": 0}
    with progress(total=total, desc="synthesize", unit="img", enabled=show_progress) as bar:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for kind, fn, jobs in (("single", _write_single_class, jobs_single),
                                   ("combination", _write_combination, jobs_combo)):
                for n in pool.map(fn, jobs, chunksize=1):
                    counts[kind] += n
                    bar.update(n)
    log.info("synthesized %d single and %d combination images under %s", counts["single"],
             counts["combination"], root)
    return counts
