"""weights.py: resolving names and paths, reading checkpoint files, strict loading, clear errors."""
import hashlib
import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from move_scale.models import weights
from move_scale.models.weights import WeightsError


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_registry_holds_the_four_named_weights_with_their_urls():
    assert set(weights.REGISTRY) == {"dino_vits8", "mae_vitl16_gan", "mae_vitl16_mse", "efficientnet_lite0",
                                     "dino_vits8_300ep", "dino_resnet50"}
    assert weights.REGISTRY["dino_vits8_300ep"].url.endswith("/dino_deitsmall8_300ep_pretrain.pth")
    assert weights.REGISTRY["dino_resnet50"].url.endswith("/dino_resnet50_pretrain.pth")
    assert weights.REGISTRY["mae_vitl16_gan"].url.endswith("/mae_visualize_vit_large_ganloss.pth")
    assert weights.REGISTRY["dino_vits8"].url.endswith("/dino_deitsmall8_pretrain.pth")
    assert "tf_efficientnet_lite0.in1k" in weights.REGISTRY["efficientnet_lite0"].url


def test_explicit_path_is_used_as_is(tmp_path):
    path = tmp_path / "mine.pth"
    torch.save(small_net().state_dict(), path)
    assert weights.resolve_weights(str(path), tmp_path / "cache") == path


def test_named_weight_found_in_the_cache_without_download(tmp_path):
    cached = tmp_path / weights.REGISTRY["dino_vits8"].filename
    cached.write_bytes(b"anything")
    assert weights.resolve_weights("dino_vits8", tmp_path, download=False) == cached


def test_missing_named_weight_says_where_to_put_it_and_the_url(tmp_path):
    spec = weights.REGISTRY["mae_vitl16_gan"]
    with pytest.raises(WeightsError) as err:
        weights.resolve_weights("mae_vitl16_gan", tmp_path / "cache", download=False)
    message = str(err.value)
    assert "mae_vitl16_gan" in message and spec.url in message
    assert str(tmp_path / "cache" / spec.filename) in message


def test_unknown_name_or_missing_file_lists_the_known_names(tmp_path):
    with pytest.raises(WeightsError, match="dino_vits8.*random"):
        weights.resolve_weights(str(tmp_path / "nope.pth"), tmp_path)


def test_download_of_a_file_url_with_checksum(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "w.bin"
    weights.download_file(source.as_uri(), dest, digest)
    assert dest.read_bytes() == source.read_bytes()


def test_download_with_a_wrong_checksum_leaves_no_file(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights")
    dest = tmp_path / "cache" / "w.bin"
    with pytest.raises(WeightsError, match="checksum"):
        weights.download_file(source.as_uri(), dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_unreachable_url_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="cannot download"):
        weights.download_file("http://127.0.0.1:9/none.pth", tmp_path / "w.pth", timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_written_is_a_weights_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(WeightsError, match="cannot write into the weights cache"):
        weights.download_file((tmp_path / "cache").as_uri(), blocker / "w.pth")


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_read_state_dict_unwraps_the_usual_layouts(tmp_path, wrapper):
    state = small_net().state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)
    read = weights.read_state_dict(path)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)


def test_read_state_dict_from_safetensors(tmp_path):
    state = {k: v.contiguous() for k, v in small_net().state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    read = weights.read_state_dict(path)
    assert all(torch.equal(read[k], state[k]) for k in state)


class NotAllowed:
    pass


@pytest.mark.parametrize("name,content", [
    ("random.pth", bytes(range(256)) * 40),
    ("notes.pt", "this is a text file, not weights\n".encode()),
    ("bad.safetensors", b"\x00\x01garbage"),
    ("object.pth", pickle.dumps(NotAllowed(), protocol=2)),
], ids=["random-bytes", "text", "bad-safetensors", "pickled-object"])
def test_a_file_that_is_not_a_checkpoint_is_a_weights_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        weights.read_state_dict(path)


def test_a_checkpoint_without_tensors_is_a_weights_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save({"epoch": 3, "args": [1, 2]}, path)
    with pytest.raises(WeightsError, match="no state dict.*epoch"):
        weights.read_state_dict(path)


def test_load_strict_lists_missing_unexpected_and_misshaped_keys():
    net = small_net()
    state = dict(net.state_dict())
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(5, 5)
    with pytest.raises(WeightsError) as err:
        weights.load_strict(net, state, "the test net")
    message = str(err.value)
    assert "the test net" in message
    assert "1 missing keys: 0.bias" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "2.weight (file (5, 5), model (2, 4))" in message


def test_load_strict_caps_long_lists_and_counts_them():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])  # 24 keys
    with pytest.raises(WeightsError, match=r"24 missing keys: .*\(14 more\)"):
        weights.load_strict(net, {}, "deep net")


def test_load_strict_loads_matching_weights():
    source, target = small_net(), small_net()
    weights.load_strict(target, source.state_dict(), "net")
    x = torch.randn(5, 3)
    assert torch.equal(source(x), target(x))


def test_random_weights_load_nothing_and_say_so(tmp_path, caplog):
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="move_scale.models.weights"):
        assert weights.load_weights(net, "random", tmp_path, "my net") is False
    assert "using RANDOM weights for my net" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_load_weights_from_a_path(tmp_path):
    source, target = small_net(), small_net()
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    assert weights.load_weights(target, str(path), tmp_path, "net") is True
    x = torch.randn(2, 3)
    assert torch.equal(source(x), target(x))
