"""Our ResNet-18 against the seed's table and torchvision's resnet18."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import save_untrained_model
from torch import nn

from pipeline.errors import PipelineError
from pipeline.files import save_torch
from pipeline.model import load_model, normalise, predict_logits, resnet18


def test_parameter_count_at_width_64() -> None:
    assert sum(p.numel() for p in resnet18().parameters()) == 11_172_810


def test_output_shape_of_every_layer() -> None:
    net = resnet18(width=64).eval()
    shapes = {}
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        getattr(net, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
    with torch.no_grad():
        net(torch.zeros(2, 1, 32, 32))
    assert shapes == {
        "conv1": (64, 32, 32),
        "layer1": (64, 32, 32),
        "layer2": (128, 16, 16),
        "layer3": (256, 8, 8),
        "layer4": (512, 4, 4),
        "avgpool": (512, 1, 1),
        "fc": (10,),
    }


def test_same_parameter_names_and_shapes_as_torchvision_with_the_stem_change() -> None:
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    ours = {k: tuple(v.shape) for k, v in resnet18().state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    # and so the reference's weights load into ours and compute the same function
    net = resnet18().eval()
    net.load_state_dict(reference.state_dict())
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference.eval()(x))


def test_blocks_and_strides() -> None:
    net = resnet18()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    for name, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2), ("layer4", 2)):
        layer = getattr(net, name)
        assert len(layer) == 2
        assert layer[0].conv1.stride == (stride, stride) and layer[1].conv1.stride == (1, 1)
        assert (layer[0].downsample is not None) == (stride != 1)


def test_width_scales_every_layer() -> None:
    net = resnet18(width=8)
    assert [
        net.layer1[0].conv1.out_channels,
        net.layer2[0].conv1.out_channels,
        net.layer3[0].conv1.out_channels,
        net.layer4[0].conv1.out_channels,
    ] == [8, 16, 32, 64]
    assert net.fc.in_features == 64
    with pytest.raises(ValueError, match="width"):
        resnet18(width=0)


def test_torchvision_initialisation() -> None:
    torch.manual_seed(0)
    net = resnet18()
    bn = net.layer3[1].bn2
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    conv = net.layer4[0].conv1  # kaiming normal, fan_out: std = sqrt(2 / (out * 3 * 3))
    expected = (2 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)


def test_predict_logits_batches_agree_with_one_pass() -> None:
    torch.manual_seed(0)
    net = resnet18(width=4).eval()
    images = torch.randint(0, 256, (37, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        whole = net(normalise(images, 0.13, 0.3))
    torch.testing.assert_close(predict_logits(net, images, 0.13, 0.3, batch_size=8), whole)


def test_normalise_scales_to_unit_range_then_standardises() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(3, 1, 1, 1)
    out = normalise(images, 0.2, 0.4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([-0.5, 0.0, 2.0]))
    assert images.flatten().tolist() == [0, 51, 255]  # the input is not touched


def test_predict_logits_uses_running_statistics_and_leaves_them() -> None:
    """Validation during training calls it on a network in training mode: it must use
    (and not update) BatchNorm's running statistics, like the evaluate stage."""
    torch.manual_seed(0)
    net = resnet18(width=4)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    logits = predict_logits(net.train(), images, 0.13, 0.3, batch_size=4)
    with torch.no_grad():
        expected = net.eval()(normalise(images, 0.13, 0.3))
    torch.testing.assert_close(logits, expected)
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_the_saved_model_loads_as_it_was_saved(tmp_path: Path) -> None:
    """save_model writes the weights with the params that made them and the stats its
    inputs need; load_model gives back the same network, in eval mode, on the device."""
    net = save_untrained_model(tmp_path / "model.pt", width=4, seed=3)
    loaded, saved = load_model(tmp_path / "model.pt", torch.device("cpu"))
    assert not loaded.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert saved["params"]["model"] == {"width": 4}
    assert saved["params"]["train"]["epochs"] == 3 and saved["stats"] == {"mean": 0.13, "std": 0.31}
    assert set(saved) == {"state_dict", "params", "stats"}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "an empty file"),
        (b"train:\n  lr: 0.1\n", "not a file that torch.save writes"),  # params.yaml
        (b"PK\x03\x04 cut short", "not a file that torch.save writes"),
    ],
)
def test_a_file_that_is_not_a_model_is_named_in_one_line(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as error:
        load_model(path, torch.device("cpu"))
    assert str(error.value) == f"{path} is not a model that src/train.py wrote ({reason})"


def test_a_tensor_file_that_is_not_a_model_says_what_it_lacks(tmp_path: Path) -> None:
    save_torch({"images": torch.zeros(2)}, tmp_path / "test.pt")
    with pytest.raises(PipelineError, match=r"test.pt is not a model .*\(no 'params' in it\)"):
        load_model(tmp_path / "test.pt", torch.device("cpu"))
    with pytest.raises(PipelineError, match="missing.pt not found"):
        load_model(tmp_path / "missing.pt", torch.device("cpu"))
