"""ResNet-18 for MNIST, written like torchvision's `models/resnet.py`.

Same names, structure and initialisation as torchvision's `resnet18`, so its
state dict keys and parameter shapes match; the one difference is the stem
(see `ResNet.__init__`). At width 64 it has 11,172,810 parameters.

    layer     channels   blocks  stride  output (for a 32x32 input)
    stem      w          conv3x3 1       w x 32 x 32
    layer1    w          2       1       w x 32 x 32
    layer2    2w         2       2       2w x 16 x 16
    layer3    4w         2       2       4w x 8 x 8
    layer4    8w         2       2       8w x 4 x 4
    avgpool, fc(8w -> 10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.files import load_torch, save_torch
from pipeline.mnist import NUM_CLASSES


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        layers: list[int],
        width: int = 64,
        num_classes: int = NUM_CLASSES,
        in_channels: int = 1,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if width < 1 or num_classes < 1:
            raise ValueError(f"width and num_classes must be >= 1, got {width}, {num_classes}")
        self.inplanes = width
        # The one difference from torchvision: ImageNet's 7x7 stride-2 stem and
        # max-pool would shrink a 32x32 digit to 8x8 before layer1, so, as in the
        # CIFAR ResNets (He et al. 2016, sec. 4.2), the stem is a 3x3 stride-1
        # conv over 1 grey channel and there is no max-pool.
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Each block's last BatchNorm scale at 0, so that every block starts as the
        # identity (Goyal et al. 2017, sec. 5.1; torchvision's zero_init_residual).
        # Constants only: the random draws are the same either way.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(
    width: int = 64, num_classes: int = NUM_CLASSES, zero_init_residual: bool = False
) -> ResNet:
    """ResNet-18 (two BasicBlocks per layer) for 1x32x32 inputs."""
    return ResNet([2, 2, 2, 2], width, num_classes, zero_init_residual=zero_init_residual)


# --------------------------------------------------------------------------- inference
# Shared by training (validation each epoch), the evaluate stage and predict.


def normalise(images: Tensor, mean: float, std: float) -> Tensor:
    """uint8 images (N,1,H,W) -> float32, scaled to [0,1], then standardised."""
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    mean: float,
    std: float,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """Float32 logits for uint8 `images` already on the model's device, in batches."""
    model.eval()
    device = images.device
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start : start + batch_size], mean, std)
        x = x.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            chunks.append(model(x).float())
    return torch.cat(chunks) if chunks else torch.empty(0, NUM_CLASSES, device=device)


# --------------------------------------------------------------------------- the model file
# `paths.model`: {"state_dict", "params": {"model", "train"}, "stats": {"mean", "std"}}.


def save_model(
    path: str | Path, net: nn.Module, params: dict[str, Any], stats: dict[str, float]
) -> None:
    """Write the trained weights with the params (dataclasses, by section) that made
    them and the normalisation stats their inputs need, atomically."""
    sections = {name: dataclasses.asdict(section) for name, section in params.items()}
    save_torch({"state_dict": net.state_dict(), "params": sections, "stats": stats}, path)


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The whole file save_model wrote, checked for what every reader of it needs,
    without building the network. Read with weights_only=True: nothing in it is
    unpickled as code."""
    with _named_if_not_a_model(path):
        saved = load_torch(path)
        int(saved["params"]["model"]["width"])
        saved["state_dict"].items()
        float(saved["stats"]["mean"]), float(saved["stats"]["std"])
    return saved


def load_model(path: str | Path, device: torch.device) -> tuple[ResNet, dict[str, Any]]:
    """The network save_model wrote (eval mode, on `device`) and the whole saved file."""
    saved = read_model_file(path)
    with _named_if_not_a_model(path):
        net = resnet18(width=saved["params"]["model"]["width"])
        net.load_state_dict(saved["state_dict"])
    return net.to(device).eval(), saved


@contextlib.contextmanager
def _named_if_not_a_model(path: str | Path) -> Iterator[None]:
    """Any failure to read `path` as a model, as one error naming the file and what it
    is (torch's own reasons are long); a missing file keeps its own error."""
    try:
        yield
    except PipelineError:  # not found
        raise
    except Exception as error:
        reason = _why(path, error)
        raise PipelineError(f"{path} is not a model that src/train.py wrote ({reason})") from None


def _why(path: str | Path, error: Exception) -> str:
    if Path(path).is_dir():
        return "a folder"
    if Path(path).stat().st_size == 0:
        return "an empty file"
    if not zipfile.is_zipfile(path):
        return "not a file that torch.save writes"
    if isinstance(error, KeyError | TypeError):
        return f"no {error} in it" if isinstance(error, KeyError) else "not a model's contents"
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
