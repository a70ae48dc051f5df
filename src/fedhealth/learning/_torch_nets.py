"""The architectures of the ``torch`` recipe, written with ``torch.nn`` only (no torchvision).

This module imports torch at its top: only :mod:`fedhealth.learning._torch_recipe` imports it, and only
inside the functions that need a network, so that importing fedhealth.learning stays light.

- ``cnn``: two 3x3 convolution blocks (conv, norm, ReLU, 2x2 max-pool) of 16 and 32 channels, then a hidden
  layer of 64 units and the classifier; about 0.1 M parameters at 28x28.
- ``cnn_wide``: three blocks of two 3x3 convolutions each (conv, norm, ReLU, twice, then a 2x2 max-pool)
  of 32, 64 and 128 channels, global average pooling and the classifier; about 0.29 M parameters and
  about 30 M multiply-adds per 28x28 image (the small CNN: about 1 M; ResNet-18: about 560 M).
- ``resnet18``: ResNet-18 (He et al. 2016, four stages of two basic blocks, 64-512 channels) adapted to
  small inputs as MedMNIST does for 28x28: a 3x3 stride-1 stem and no max-pool; about 11 M parameters.

- ``monai-densenet``: MONAI's ``DenseNet`` (Huang et al. 2017) with two dense blocks of 6 and 12 layers
  (32 initial features, growth rate 16; 0.33 M values at 2 classes): DenseNet-121's 4x stem and three
  transitions leave 28x28 images 1x1 or nothing, where BatchNorm cannot train on a batch of one image (a
  site's last minibatch can be one); one transition leaves 16x16 images 2x2 and 28x28 ones 3x3.
- ``monai-densenet121``: MONAI's ``DenseNet121`` as published (about 7 M values), for inputs of 64x64 and
  more (2x2 after its last block).

MONAI is imported only when one of its networks is built (the ``imaging`` extra pins it); its import takes
seconds, since ``import monai`` loads the whole toolkit.

``norm`` is ``batch`` (BatchNorm) or ``group``: BatchNorm mixes the records of a batch, which per-example
gradients (DP-SGD) cannot have, so ``group`` lets Opacus' :class:`ModuleValidator` replace every BatchNorm
with a GroupNorm (its own choice of groups), exactly as it does for any model handed to DP-SGD.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


class SmallCnn(nn.Module):
    def __init__(self, channels: int, input_size: int, n_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            _norm(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            _norm(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        _norm(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        _norm(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


class WideCnn(nn.Module):
    WIDTHS = (32, 64, 128)

    def __init__(self, channels: int, input_size: int, n_classes: int) -> None:
        super().__init__()
        del input_size  # global average pooling: any input size of at least 8 works
        layers: list[nn.Module] = []
        cin = channels
        for cout in self.WIDTHS:
            layers += _conv_block(cin, cout)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), _norm(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, channels: int, input_size: int, n_classes: int) -> None:
        super().__init__()
        del input_size  # global average pooling: any input size of at least 8 works
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(64)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        inplanes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def monai_densenet(channels: int, input_size: int, n_classes: int) -> nn.Module:
    from monai.networks.nets.densenet import DenseNet

    del input_size  # global average pooling after two blocks: 16x16 and up
    return DenseNet(
        spatial_dims=2,
        in_channels=channels,
        out_channels=n_classes,
        init_features=32,
        growth_rate=16,
        block_config=(6, 12),
    )


def monai_densenet121(channels: int, input_size: int, n_classes: int) -> nn.Module:
    from monai.networks.nets.densenet import DenseNet121

    del input_size  # 64x64 and up
    return DenseNet121(spatial_dims=2, in_channels=channels, out_channels=n_classes)


ARCHITECTURES: dict[str, Callable[[int, int, int], nn.Module]] = {
    "cnn": SmallCnn,
    "cnn_wide": WideCnn,
    "resnet18": ResNet18,
    "monai-densenet": monai_densenet,
    "monai-densenet121": monai_densenet121,
}


def build_network(architecture: str, channels: int, input_size: int, n_classes: int, norm: str) -> nn.Module:
    """A fresh network (its initial weights drawn from torch's global generator: seed it first)."""
    net = ARCHITECTURES[architecture](channels, input_size, n_classes)
    if norm == "group":
        from opacus.validators import ModuleValidator

        net = ModuleValidator.fix(net)
    return net
