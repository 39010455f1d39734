"""Rendered images and thumbnails (PS3.18 8.3.5, 9.x rendered resources).

A frame is decoded (pydicom with pylibjpeg / pyjpegls / openjpeg / RLE / GDCM plug-ins),
turned into display values — Modality LUT (rescale), then the VOI window from the
``window`` parameter, the image's own Window Center/Width, or its value range
(PS3.3 C.11.2.1.2, linear function), inverted for MONOCHROME1 — scaled to the
``viewport`` and encoded as JPEG or PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import pixel_array

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}
MAX_VIEWPORT = 4096


class RenderError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: tuple[float, float] | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


def options(
    params: dict[str, str], accept: str, *, default_viewport: tuple[int, int] | None = None
) -> RenderOptions:
    """Parse ``window``, ``viewport`` and ``quality`` (PS3.18 8.3.5.1) and the Accept header."""
    media = _media_type(accept)
    window = None
    if "window" in params:
        parts = params["window"].split(",")
        try:
            center, width = float(parts[0]), float(parts[1])
        except (ValueError, IndexError) as exc:
            raise RenderError(400, "window must be center,width[,linear]") from exc
        if len(parts) > 2 and parts[2].strip().lower() not in ("linear", ""):
            raise RenderError(400, "only the linear VOI LUT function is supported")
        if width < 1:
            raise RenderError(400, "window width must be at least 1")
        window = (center, width)
    viewport = default_viewport
    if "viewport" in params:
        try:
            vw, vh = (int(v) for v in params["viewport"].split(",")[:2])
        except ValueError as exc:
            raise RenderError(400, "viewport must be width,height in pixels") from exc
        if not (0 < vw <= MAX_VIEWPORT and 0 < vh <= MAX_VIEWPORT):
            raise RenderError(400, f"viewport must be between 1 and {MAX_VIEWPORT} pixels")
        viewport = (vw, vh)
    quality = 90
    if "quality" in params:
        if not params["quality"].isdigit() or not 1 <= int(params["quality"]) <= 100:
            raise RenderError(400, "quality must be 1 to 100")
        quality = int(params["quality"])
    return RenderOptions(media, window, viewport, quality)


def _media_type(accept: str) -> str:
    for item in (accept or "image/jpeg").split(","):
        media = item.split(";")[0].strip().lower()
        if media in MEDIA_TYPES:
            return media
        if media in ("*/*", "image/*", ""):
            return "image/jpeg"
    raise RenderError(406, "rendered images come as image/jpeg or image/png")


def render(blob: bytes, frame: int, opts: RenderOptions) -> bytes:
    """Frame ``frame`` (1-based) of the stored object ``blob`` as a display image."""
    ds = dcmread(io.BytesIO(blob), stop_before_pixels=False)
    if "PixelData" not in ds:
        raise RenderError(404, "this instance has no pixel data to render")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= count:
        raise RenderError(404, f"frame {frame} does not exist: the instance has {count}")
    try:
        pixels = pixel_array(io.BytesIO(blob), index=frame - 1 if count > 1 else None)
    except Exception as exc:  # noqa: BLE001 - any decoder failure: the data is damaged
        raise RenderError(422, f"the pixel data cannot be decoded: {exc}") from exc
    image = _to_image(ds, pixels, opts.window)
    if opts.viewport:
        image.thumbnail(opts.viewport, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    fmt = MEDIA_TYPES[opts.media_type]
    if fmt == "JPEG":
        image.save(out, fmt, quality=opts.quality)
    else:
        image.save(out, fmt)
    return out.getvalue()


def _to_image(
    ds: Dataset, pixels: NDArray[np.generic], window: tuple[float, float] | None
) -> Image.Image:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour, already RGB
        return Image.fromarray(_to_uint8(pixels), "RGB")
    if photometric == "PALETTE COLOR":
        return Image.fromarray(_to_uint8(apply_color_lut(pixels, ds)), "RGB")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    center, width = window or _header_window(ds) or _range_window(values)
    # PS3.3 C.11.2.1.2.1, linear: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * (ymax - ymin) + ymin
    scaled = ((values - (center - 0.5)) / max(width - 1, 1) + 0.5) * 255.0
    display = np.clip(scaled, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        display = 255 - display
    return Image.fromarray(display, "L")


def _header_window(ds: Dataset) -> tuple[float, float] | None:
    """The first Window Center/Width pair of the image, if it has a usable one."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w >= 1 else None


def _range_window(values: NDArray[np.float64]) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    return (low + high) / 2, max(high - low, 1.0)


def _to_uint8(pixels: NDArray[np.generic]) -> NDArray[np.uint8]:
    if pixels.dtype == np.uint8:
        return pixels.astype(np.uint8)
    high = float(pixels.max()) or 1.0
    return (pixels.astype(np.float64) * (255.0 / high)).astype(np.uint8)
