"""An uploaded photo: decoded in full, or refused with a 4xx status and the reason (never a 500).

  empty body                        422  "empty file"
  not an image (any decoder fails)  415  "not an image …" with the decoder's own reason
  more pixels than allowed          422  "… pixels is more than serve.max_image_pixels=…"
  a side shorter than allowed       422  "… shorter side … below serve.min_image_side=…"
  truncated / corrupt data          422  "truncated or corrupt image …"
PNG, JPEG, WebP, BMP, TIFF and HEIC/HEIF (phone photos, via pi-heif) are read.
(A body larger than serve.max_request_mb never reaches this: the app refuses it with 413.)
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from pillsnap.infer.preprocess import register_image_formats

register_image_formats()


class UploadRejected(ValueError):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_upload(data: bytes, max_pixels: int, min_side: int = 1) -> Image.Image:
    if not data:
        raise UploadRejected(422, "empty file: no image data")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # our own limit decides, not a warning
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UploadRejected(422, f"photo too large: {e}") from None
        except UnidentifiedImageError:
            raise UploadRejected(415, "not an image: no decoder recognises the data (PNG, JPEG, HEIC/HEIF, WebP, "
                                      "BMP, TIFF are read)") from None
        except Exception as e:  # noqa: BLE001 - PIL (and plugins hooked into it) fail in many ways
            raise UploadRejected(415, f"not an image: {type(e).__name__}: {str(e)[:200]}") from None
    if image.width * image.height > max_pixels:
        raise UploadRejected(422, f"photo of {image.width}x{image.height} = {image.width * image.height} pixels is "
                                  f"more than serve.max_image_pixels={max_pixels}")
    if min(image.width, image.height) < min_side:
        raise UploadRejected(422, f"photo of {image.width}x{image.height}: its shorter side is below "
                                  f"serve.min_image_side={min_side} px; no pill can be identified in it")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise UploadRejected(422, f"truncated or corrupt image: {type(e).__name__}: {e}") from None
