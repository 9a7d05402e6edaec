"""Image facts and image I/O: the ImageNet normalisation, which files are images, and decoding any
image file to 8-bit RGB, resized and encoded for a shard.

Rules (the shard contract says every stored image decodes to 8-bit RGB):

- EXIF orientation is applied (the pixels are turned; the tag is not kept), unless ``exif=False``:
  then the pixels stay as stored in the file, as the benchmarks' reference loaders read them
  (PIL ``Image.open(...).convert("RGB")`` in the authors' infer.py and in LOST).
- Grayscale, palette, CMYK and YCbCr images are converted to RGB. 16-bit grayscale is scaled
  (65535 -> 255), not clipped. Images with alpha (RGBA, LA, palette with transparency) are
  composited on WHITE: dropping alpha exposes whatever colour hides under transparent pixels
  (often black or noise), white is what a viewer shows. Multi-frame files keep frame 0.
  No colour management: ICC profiles are neither applied nor copied.
- ``resize`` (shorter side, pixels) only shrinks, bicubic; 0 keeps the size.
- ``image_format="keep"`` stores the original bytes untouched when they already decode to 8-bit RGB
  in the right orientation at the target size (an RGB JPEG, an 8-bit RGB PNG, an RGB WebP, none of
  them EXIF-rotated or resized). Otherwise the pixels are re-encoded: lossy sources (JPEG, lossy
  WebP) as JPEG at ``quality``, everything else as PNG (lossless).
- Masks become 8-bit L PNG ("P" keeps its palette indices as grey values; 16-bit is scaled) and get
  the same EXIF turn and (nearest-neighbour) resize as their image.
"""
from __future__ import annotations

import io
import os
import posixpath
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# The normalisation of every network here (ImageNet statistics), as DINO, MAE and LOST apply it:
# `Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))` (valeoai/LOST `datasets.py`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Files taken as images by move-shard, evaluate and predict (case-insensitive); what a shard member
# holding a sample's image may be called is `tario.IMAGE_EXTS`.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
IMAGE_FORMATS = ("keep", "jpg", "png", "webp")
_LOSSY_SOURCES = ("JPEG", "MPO")
_EXT_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}



def is_image_name(path: str | os.PathLike) -> bool:
    """Whether a file name (a path or URL) has an image suffix."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under `folder` (by suffix, case-insensitive), sorted."""
    folder = Path(folder)
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.is_file() and is_image_name(p))

class BadImage(Exception):
    """A file that cannot become a sample; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    """An 8-bit RGB image plus what was done to reach it."""

    image: Image.Image  # mode "RGB"
    source_format: str  # Pillow's name: "JPEG", "PNG", ...
    raw_size: tuple[int, int]  # (W, H) as stored in the file, before the EXIF turn
    transpose: int | None  # the Image.Transpose applied for EXIF orientation, or None
    converted: bool  # mode or bit depth changed
    lossy_source: bool


@dataclass(frozen=True)
class EncodedImage:
    ext: str  # "jpg" | "png" | "webp": the shard key
    data: bytes
    size: tuple[int, int]  # (W, H) of the stored pixels
    scale: tuple[float, float]  # stored size / oriented source size, per axis


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully; raise BadImage naming why it cannot be used."""
    if not data:
        raise BadImage("empty_file", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as err:
            raise BadImage("not_an_image", "not a format Pillow can read") from err
        except Image.DecompressionBombError as err:
            raise BadImage("too_many_pixels", str(err)) from err
        except Exception as err:  # noqa: BLE001 - any parser failure is a bad file, counted
            raise _decode_failure(err) from err
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage("too_many_pixels", f"{width}x{height} > --max-pixels {max_pixels}")
        if width == 0 or height == 0:
            raise BadImage("decode_error", f"empty size {width}x{height}")
        try:
            img.load()
        except Exception as err:  # noqa: BLE001
            raise _decode_failure(err) from err
    return img


def _decode_failure(err: Exception) -> BadImage:
    message = f"{type(err).__name__}: {err}"
    truncated = "truncat" in message.lower() or isinstance(err, EOFError)
    return BadImage("truncated" if truncated else "decode_error", message)


def _to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """8-bit RGB from any mode; returns (image, converted)."""
    mode = img.mode
    if mode == "RGB":
        return img, False
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB"), True
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), True
    try:
        return img.convert("RGB"), True
    except (ValueError, OSError) as err:
        raise BadImage("unsupported_mode", f"cannot convert mode {mode} to RGB: {err}") from err


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit int holding 16-bit) values to 0..255, scaled and rounded."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def exif_transpose_of(img: Image.Image) -> int | None:
    """The Image.Transpose that EXIF orientation asks for, or None."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means "no orientation"
        return None
    return _ORIENTATION_TRANSPOSE.get(orientation)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, exif: bool = True) -> DecodedImage:
    """Bytes of any image file -> 8-bit RGB in display orientation, or as stored with
    ``exif=False`` (see module rules)."""
    img = open_image(data, max_pixels)
    source_format = img.format or "UNKNOWN"
    raw_size = img.size
    transpose = exif_transpose_of(img) if exif else None
    rgb, converted = _to_rgb(img)
    if source_format == "PNG" and not converted and not _is_8bit_rgb_png(data):
        converted = True  # 16-bit RGB PNG: Pillow hands us 8 bits, the file holds 16
    if transpose is not None:
        rgb = rgb.transpose(transpose)
    lossy = source_format in _LOSSY_SOURCES or (source_format == "WEBP" and not _is_lossless_webp(data))
    return DecodedImage(rgb, source_format, raw_size, transpose, converted, lossy)


def _is_lossless_webp(data: bytes) -> bool:
    """Walk the RIFF chunks: a VP8L bitstream is lossless, VP8 is lossy."""
    offset = 12
    while offset + 8 <= len(data):
        fourcc, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        offset += 8 + size + (size & 1)
    return False


def _is_8bit_rgb_png(data: bytes) -> bool:
    # IHDR: 8-byte signature, 4 length, 4 type, 4 width, 4 height, then bit depth, colour type.
    return len(data) > 25 and data[24] == 8 and data[25] == 2


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(W, H) after shrinking the shorter side to ``shorter`` (never enlarges; 0 keeps)."""
    width, height = size
    if shorter <= 0 or min(width, height) <= shorter:
        return size
    if width <= height:
        return shorter, max(1, round(height * shorter / width))
    return max(1, round(width * shorter / height)), shorter


def encode_pixels(img: Image.Image, ext: str, quality: int) -> bytes:
    """Encode a PIL image deterministically (no metadata)."""
    buffer = io.BytesIO()
    if ext == "jpg":
        img.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False)
    elif ext == "webp":
        img.save(buffer, "WEBP", quality=quality, method=4)
    elif ext == "png":
        img.save(buffer, "PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image format {ext!r}; use one of {', '.join(_PIL_FORMAT)}")
    return buffer.getvalue()


def prepare_image(data: bytes, *, resize: int = 0, image_format: str = "keep", quality: int = 95,
                  max_pixels: int = DEFAULT_MAX_PIXELS, exif: bool = True) -> tuple[EncodedImage, DecodedImage]:
    """Source file bytes -> the bytes to store (see the module docstring for the rules)."""
    decoded = decode_rgb(data, max_pixels, exif)
    oriented = decoded.image
    size = resized_size(oriented.size, resize)
    scale = (size[0] / oriented.size[0], size[1] / oriented.size[1])
    changed = decoded.converted or decoded.transpose is not None or size != oriented.size
    if image_format == "keep":
        source_ext = _EXT_BY_FORMAT.get(decoded.source_format)
        if not changed and source_ext is not None:
            return EncodedImage(source_ext, data, size, scale), decoded
        ext = "jpg" if decoded.lossy_source else "png"
    else:
        ext = image_format
    pixels = oriented if size == oriented.size else oriented.resize(size, Image.Resampling.BICUBIC)
    return EncodedImage(ext, encode_pixels(pixels, ext, quality), size, scale), decoded


def prepare_mask(data: bytes, decoded: DecodedImage, size: tuple[int, int],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Mask file bytes -> 8-bit L PNG aligned with the stored image of ``size``."""
    try:
        mask = open_image(data, max_pixels)
    except BadImage as err:
        raise BadImage("bad_mask", err.detail) from err
    if mask.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        mask = Image.fromarray(_to_uint8(np.asarray(mask)), "L")
    elif mask.mode == "P":
        mask = Image.fromarray(np.asarray(mask).astype(np.uint8), "L")
    elif mask.mode != "L":
        mask = mask.convert("L")
    oriented_size = decoded.image.size
    if mask.size == decoded.raw_size and decoded.transpose is not None:
        mask = mask.transpose(decoded.transpose)  # drawn on the stored pixels: turn with the image
    elif mask.size != oriented_size:
        raise BadImage("mask_size_mismatch",
                       f"mask {mask.size[0]}x{mask.size[1]} vs image {oriented_size[0]}x{oriented_size[1]}")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return encode_pixels(mask, "png", 95)


def array_to_image(array: np.ndarray, what: str) -> Image.Image:
    """(H, W, 3) uint8 -> RGB, (H, W) uint8/bool -> L; anything else is a ValueError naming ``what``."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (or bool for masks), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(array, "RGB")
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    raise ValueError(f"{what} must be (H, W, 3) or (H, W), got shape {array.shape}")


def stem_of(path: str) -> str:
    """The file name of a path or URL without its folder and last suffix: the sample's stem."""
    return os.path.splitext(posixpath.basename(path.rstrip("/")))[0]
