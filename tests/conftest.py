"""Shared fixtures: real image folders made on the fly, and a real S3-compatible server.

Image fixtures (all files are real JPEG/PNG/WebP bytes written by Pillow/OpenCV, tiny):

- ``make_images(n=8, size=(48, 40), formats=("jpg", "png"), masks=False, seed=0, name="images")``
  (factory) -> :class:`ImageSet`: ``root`` (folder of images, some in a sub-folder), ``paths``
  {stem: Path}, ``sizes`` {stem: (W, H)}, ``colors`` {stem: (r, g, b) of the object rectangle},
  ``mask_root`` / ``masks`` {stem: Path} (8-bit L PNG, 255 on the object) when ``masks=True``,
  ``boxes`` {stem: [x0, y0, x1, y1]} (the object rectangle). Images are smooth (compress small,
  survive JPEG) with one flat rectangle of a known colour.
- ``tricky_images`` -> :class:`TrickySet`: a folder with one file per hard case. ``good``
  {stem: (W, H) as displayed}: rgb_jpg, rgb_png, rgb_webp, gray_jpg, rgba_png (left half fully
  transparent black -> must come out white), palette_png, palette_alpha_png, cmyk_jpg (pure red),
  exif_rot_jpg (stored 60x40 with orientation 6: displayed 40x60, stored-left red half on top),
  gray16_png (16-bit ramp, value 65535 in the last column), rgb16_png (16-bit RGB via OpenCV).
  ``bad`` {stem: reason}: truncated_jpg (truncated), text_jpg (not_an_image), empty_png
  (empty_file).

Device:

- ``--device`` (pytest option, default ``cpu``): the torch device of the tests that take the
  ``device`` fixture (kernel parity, the bf16 step, the objective), e.g. ``pytest --device cuda
  tests/test_kernels.py``. Other tests run on the CPU either way.
- ``device`` (session) -> ``torch.device``; skips the test when ``--device cuda`` is asked and CUDA
  is absent. On CUDA it turns TF32 off, so that fp32 parity means fp32 on both paths.

S3 fixtures:

- ``moto_endpoint`` (session): starts ``moto_server`` on 127.0.0.1 on a free port, yields its URL,
  stops it at the end.
- ``s3_endpoint``: the endpoint URL with fake credentials and region set in the environment for the
  test (so subprocesses that inherit ``os.environ`` see them too), proxies disabled for 127.0.0.1.
- ``s3_bucket``: a fresh empty bucket on that server; yields ``"s3://<name>"``.
  Storage options for fsspec/s3fs: ``{"client_kwargs": {"endpoint_url": s3_endpoint}}``.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from motoproc import free_port
from PIL import Image


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for the device-aware tests (kernels, precision, objective): "
                          "cpu (default), cuda or cuda:N; benchmarks/gpu_check.py passes cuda")


@pytest.fixture(scope="session")
def device(request):
    import torch

    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
        # cuDNN convolutions default to TF32 (10-bit mantissa): parity at fp32 would then compare
        # two roundings of TF32, not the kernels. The benchmarks keep PyTorch's defaults.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


@dataclass
class ImageSet:
    root: Path
    paths: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    colors: dict = field(default_factory=dict)
    boxes: dict = field(default_factory=dict)
    mask_root: Path | None = None
    masks: dict = field(default_factory=dict)


def smooth_image(width: int, height: int, rng: np.random.Generator, box, color) -> np.ndarray:
    """(H, W, 3) uint8: a gradient background with one flat rectangle ``box`` of ``color``."""
    ys, xs = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 120, size=3)
    image = np.stack([base[0] + xs * 60 // max(width, 1), base[1] + ys * 60 // max(height, 1),
                      np.full_like(xs, base[2])], axis=-1).astype(np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = color
    return image


def _save(array: np.ndarray, path: Path, fmt: str) -> None:
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    options = {"quality": 95} if fmt in ("jpg", "webp") else {}
    Image.fromarray(array).save(path, pil_format, **options)


@pytest.fixture
def make_images(tmp_path):
    def make(n: int = 8, size=(48, 40), formats=("jpg", "png"), masks: bool = False, seed: int = 0,
             name: str = "images") -> ImageSet:
        rng = np.random.default_rng(seed)
        images = ImageSet(root=tmp_path / name)
        if masks:
            images.mask_root = tmp_path / f"{name}_masks"
            images.mask_root.mkdir(parents=True)
        for index in range(n):
            width, height = size[0] + index, size[1] + (index % 3)
            box = (width // 4, height // 4, width // 4 + width // 2, height // 4 + height // 2)
            color = tuple(int(c) for c in rng.integers(130, 256, size=3))
            fmt = formats[index % len(formats)]
            stem = f"img{index:03d}"
            folder = images.root / ("sub" if index % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stem}.{fmt}"
            _save(smooth_image(width, height, rng, box, color), path, fmt)
            images.paths[stem], images.sizes[stem] = path, (width, height)
            images.colors[stem], images.boxes[stem] = color, list(box)
            if masks:
                mask = np.zeros((height, width), np.uint8)
                mask[box[1]:box[3], box[0]:box[2]] = 255
                images.masks[stem] = images.mask_root / f"{stem}.png"
                Image.fromarray(mask, "L").save(images.masks[stem])
        return images

    return make


@dataclass
class TrickySet:
    root: Path
    good: dict  # stem -> (W, H) as displayed
    bad: dict  # stem -> expected skip reason


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


@pytest.fixture
def tricky_images(tmp_path) -> TrickySet:
    root = tmp_path / "tricky"
    root.mkdir()
    rng = np.random.default_rng(1)
    rgb = smooth_image(48, 40, rng, (10, 10, 30, 30), (250, 200, 40))
    Image.fromarray(rgb).save(root / "rgb_jpg.jpg", quality=95)
    Image.fromarray(rgb).save(root / "rgb_png.png")
    Image.fromarray(rgb).save(root / "rgb_webp.webp", quality=95)
    Image.fromarray(rgb).convert("L").save(root / "gray_jpg.jpg", quality=95)
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[:, 24:] = (20, 120, 220, 255)  # left half: transparent black
    Image.fromarray(rgba, "RGBA").save(root / "rgba_png.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(root / "palette_png.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "palette_alpha_png.png", transparency=0)
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(root / "cmyk_jpg.jpg", quality=95)
    raw = np.zeros((40, 60, 3), np.uint8)
    raw[:, :30] = (255, 0, 0)
    raw[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate the stored pixels 90 degrees clockwise
    (root / "exif_rot_jpg.jpg").write_bytes(_jpeg_bytes(Image.fromarray(raw), exif=exif.tobytes()))
    ramp = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (40, 1))
    cv2.imwrite(str(root / "gray16_png.png"), ramp)
    cv2.imwrite(str(root / "rgb16_png.png"), np.stack([ramp, ramp // 2, 65535 - ramp], axis=-1))
    whole = _jpeg_bytes(Image.fromarray(rgb))
    (root / "truncated_jpg.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "text_jpg.jpg").write_text("this is not an image\n")
    (root / "empty_png.png").write_bytes(b"")
    good = {"rgb_jpg": (48, 40), "rgb_png": (48, 40), "rgb_webp": (48, 40), "gray_jpg": (48, 40),
            "rgba_png": (48, 40), "palette_png": (48, 40), "palette_alpha_png": (48, 40),
            "cmyk_jpg": (48, 40), "exif_rot_jpg": (40, 60), "gray16_png": (48, 40),
            "rgb16_png": (48, 40)}
    bad = {"truncated_jpg": "truncated", "text_jpg": "not_an_image", "empty_png": "empty_file"}
    return TrickySet(root, good, bad)


@pytest.fixture(scope="session")
def moto_endpoint():
    binary = Path(sys.executable).with_name("moto_server")
    binary = str(binary) if binary.exists() else shutil.which("moto_server")
    if binary is None:
        pytest.fail("moto_server not found; install moto[server]")
    port = free_port()
    process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while True:
        try:
            opener.open(endpoint, timeout=1).close()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.1)
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3_endpoint(moto_endpoint, monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("NO_PROXY", "127.0.0.1,localhost"),
                        ("no_proxy", "127.0.0.1,localhost")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                 "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield moto_endpoint


@pytest.fixture
def s3_bucket(s3_endpoint):
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"
