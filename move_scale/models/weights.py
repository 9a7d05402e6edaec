"""Named pretrained weights: resolve a file (explicit path → cache → download), read it, load strictly.

The networks start from public checkpoints, from their own download pages (the
facebookresearch/dino README's table; the "visualize" checkpoints of facebookresearch/mae
`demo/mae_visualize.ipynb`, which the authors' move-seg `segmenter.py MAE_MODELS` names; timm's
`tf_efficientnet_lite0.in1k` on the Hugging Face hub):

    dino_vits8          DINO ViT-S/8, plain state dict in timm `vit_small_patch8_224` names
    dino_vits8_300ep    DINO ViT-S/8 after 300 epochs, the same layout (SelfMask's backbone)
    dino_resnet50       DINO ResNet-50, torchvision `resnet50` names without `fc` (the detector's)
    mae_vitl16_gan      MAE ViT-L/16 trained with a GAN loss ({"model": sd}), used by MOVE
    mae_vitl16_mse      MAE ViT-L/16 trained with MSE ({"model": sd}), Table 5 ablation
    efficientnet_lite0  timm `tf_efficientnet_lite0.in1k` (safetensors), the projected D's backbone

Every load is strict: a checkpoint with missing, unexpected or mis-shaped keys raises a
`WeightsError` that lists them. "random" means no load at all, announced by a WARNING log line.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import types
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from move_scale.config.rules import listing, nearest
from move_scale.core.errors import UserError

log = logging.getLogger(__name__)

RANDOM = "random"
_MAX_LISTED = 10


class WeightsError(UserError, RuntimeError):
    """A weight file that cannot be found, read or loaded; the message says what to do."""


@dataclass(frozen=True)
class WeightSpec:
    name: str
    url: str
    filename: str  # the file's name in the cache directory
    sha256: str | None = None  # checked after download when known


REGISTRY: Mapping[str, WeightSpec] = types.MappingProxyType({
    spec.name: spec
    for spec in (
        WeightSpec(
            "dino_vits8",
            "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
            "dino_deitsmall8_pretrain.pth",
        ),
        WeightSpec(
            "mae_vitl16_gan",
            "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large_ganloss.pth",
            "mae_visualize_vit_large_ganloss.pth",
        ),
        WeightSpec(
            "mae_vitl16_mse",
            "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large.pth",
            "mae_visualize_vit_large.pth",
        ),
        WeightSpec(  # SelfMask's backbone (NoelShin/selfmask); DINO's own "model used for visualizations"
            "dino_vits8_300ep",
            "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
            "dino_deitsmall8_300ep_pretrain.pth",
        ),
        WeightSpec(  # the class-agnostic detector's backbone (valeoai/LOST CAD configs)
            "dino_resnet50",
            "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
            "dino_resnet50_pretrain.pth",
        ),
        WeightSpec(
            "efficientnet_lite0",
            "https://huggingface.co/timm/tf_efficientnet_lite0.in1k/resolve/main/model.safetensors",
            "tf_efficientnet_lite0.in1k.safetensors",
        ),
    )
})


def resolve_weights(name_or_path: str, cache_dir: str | os.PathLike, *, download: bool = True) -> Path:
    """Return the local file for a weight name or path.

    Order: an existing file path; then `cache_dir/<filename>` for a registered name; then a
    download into the cache (checksum verified when known). Offline or `download=False` with no
    file → WeightsError naming the weight, the path to put the file at, and the URL.
    """
    path = Path(name_or_path).expanduser()
    if name_or_path not in REGISTRY:
        if path.is_file():
            return path
        raise WeightsError(
            f"weights {name_or_path!r}: no such file, and not a known weight name "
            f"(known: {', '.join(REGISTRY)}; or {RANDOM!r} for untrained weights)"
        )
    spec = REGISTRY[name_or_path]
    cached = Path(cache_dir).expanduser() / spec.filename
    if cached.is_file():
        return cached
    if not download:
        raise WeightsError(
            f"weights {spec.name!r} not found at {cached}; download {spec.url} and put it there "
            f"(or pass a file path instead of the name)"
        )
    log.info("downloading %s from %s to %s", spec.name, spec.url, cached)
    try:
        download_file(spec.url, cached, spec.sha256)
    except WeightsError as err:
        raise WeightsError(
            f"weights {spec.name!r} not found at {cached} and the download failed: {err}. "
            f"Download {spec.url} by hand and put it at {cached}"
        ) from err
    return cached


def download_file(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> None:
    """Download `url` to `dest` atomically (temp file + rename); verify `sha256` when given."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    except OSError as err:
        raise WeightsError(f"cannot write into the weights cache {dest.parent} ({err})") from err
    digest = hashlib.sha256()
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise WeightsError(f"checksum mismatch for {url}: got sha256 {digest.hexdigest()}, expected {sha256}")
        tmp.replace(dest)
    except (urllib.error.URLError, OSError) as err:
        raise WeightsError(f"cannot download {url} ({err})") from err
    finally:
        tmp.unlink(missing_ok=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict on the CPU.

    Accepts `.safetensors` files and torch files holding a plain state dict, `{"model": sd}`
    (official MAE) or `{"state_dict": sd}`. Anything else → WeightsError (never a pickle traceback).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure means the file is not a usable checkpoint
        raise WeightsError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:200]}); "
            f"expected a .pth/.pt torch state dict or a .safetensors file"
        ) from err
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        found = sorted(map(str, obj))[:_MAX_LISTED] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(
            f"{path} holds no state dict (found {found}); expected name → tensor, "
            f"possibly inside a 'model' or 'state_dict' entry"
        )
    return obj


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {label}: {shown}{more}"


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load `state_dict` into `module` with every key and shape matching, else WeightsError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        _listing(label, items)
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped))
        if items
    ]
    if problems:
        raise WeightsError(f"weights for {what} do not fit the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def load_weights(module: nn.Module, weights: str, cache_dir: str | os.PathLike, what: str) -> bool:
    """Resolve, read and strictly load `weights` into `module`; False (and a WARNING) for "random"."""
    if weights == RANDOM:
        log.warning("using RANDOM weights for %s", what)
        return False
    path = resolve_weights(weights, cache_dir)
    load_strict(module, read_state_dict(path), what)
    log.info("loaded %s weights from %s", what, path)
    return True


def check_weight_file(key: str, weights: str, give: str = "") -> None:
    """Before any work: `weights` (the setting `key`) given as a path must name a file; 'random'
    and registered names pass (they are found or downloaded when the network is built). `give`
    replaces the default advice on what to give instead."""
    if weights != RANDOM and weights not in REGISTRY and not Path(weights).expanduser().is_file():
        give = give or f"the path of a weight file, a weight name ({', '.join(REGISTRY)}) or {RANDOM!r}"
        raise WeightsError(f"{key} = {weights!r}: no such file; give {give}")


@dataclass(frozen=True)
class WeightsRef:
    """'random', a registered weight name, or a file path (a path is checked when it is loaded:
    the file may be written later, e.g. by pretrain_mae)."""

    def __call__(self, value: str) -> str | None:
        names = (RANDOM, *REGISTRY)
        if value in names or "/" in value or "." in value:
            return None
        if Path(value).expanduser().is_file():
            return None
        return (f"not a file path and not a weight name; use one of {listing(names)} or the path "
                f"of a weight file{nearest(value, names)}")
