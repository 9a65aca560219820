"""Image-level defect classifiers with a fixed four-stage shape that the CAM methods rely on.

`DefectClassifier` = stem -> stages[0..3] -> head. Stage l's output is the activation A^l of the
method (strides 4, 8, 16, 32, or 4, 8, 16, 16 / 4, 8, 8, 8 with dilated last stages). The head is a
1×1 convolution giving a defect logit per stage-4 location, pooled to one logit per image (average,
max, top-k mean or log-sum-exp); with average pooling this equals the usual GAP + linear layer.
Every non-linearity is an `nn.ReLU` module (never `F.relu`), so guided backpropagation can swap them.

Backbones: `efficientnet-lite0` (ImageNet weights from a package, the default; ReLU6, which guided
backpropagation swaps too), `compact` (our own ResNet-style net: configurable width and depth, BN + ReLU)
and `resnet18` / `resnet34` (torchvision, optionally with local ImageNet weights).

A classifier may keep its stem and first `frozen_stages` stages frozen (ImageNet features): they run in
eval mode with no gradient for the weights, so their output for an image never changes and training
computes it once (`frozen_features`, then `forward_from_frozen`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from defect_studio.errors import ModelError
from defect_studio.ml.backbones import EfficientNetLite0, adapt_input_channels, efficientnet_stages, load_imagenet_weights
from defect_studio.ml.classifier_options import ClassifierConfig  # re-exported: the config lives without torch


class BasicBlock(nn.Module):
    """ResNet basic block; separate ReLU modules so each can be swapped on its own."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class PooledHead(nn.Module):
    """1×1 convolution to a logit per location, then pooled to one logit per image."""

    def __init__(self, in_channels: int, pooling: str, topk_fraction: float, lse_r: float) -> None:
        super().__init__()
        self.pooling = pooling
        self.topk_fraction = topk_fraction
        self.lse_r = lse_r
        self.classifier = nn.Conv2d(in_channels, 1, 1)

    def logit_map(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)[:, 0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = self.logit_map(features).flatten(1)  # B × (H·W)
        if self.pooling == "avg":
            return scores.mean(dim=1)
        if self.pooling == "max":
            return scores.amax(dim=1)
        if self.pooling == "topk":
            k = max(1, int(math.ceil(self.topk_fraction * scores.shape[1])))
            return scores.topk(k, dim=1).values.mean(dim=1)
        # log-sum-exp, shifted so that a constant map pools to that constant
        r = self.lse_r
        return (torch.logsumexp(r * scores, dim=1) - math.log(scores.shape[1])) / r


class DefectClassifier(nn.Module):
    """stem -> 4 stages -> pooled head; forward gives one defect logit per image."""

    def __init__(
        self, stem: nn.Module, stages: list[nn.Module], head: PooledHead, stage_channels: list[int], frozen_stages: int = 0
    ) -> None:
        super().__init__()
        if len(stages) != 4:
            raise ValueError("a DefectClassifier has exactly 4 stages")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.stage_channels = list(stage_channels)
        self.frozen_stages = frozen_stages
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train()  # a new module trains, but its frozen part never does (BatchNorm statistics included)

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.stem, *self.stages[: self.frozen_stages]] if self.frozen_stages else []

    def train(self, mode: bool = True) -> "DefectClassifier":
        super().train(mode)
        for module in self._frozen_modules():  # frozen BatchNorm statistics stay the ImageNet ones
            module.eval()
        return self

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the frozen stem and stages (the input itself when nothing is frozen)."""
        for module in self._frozen_modules():
            x = module(x)
        return x

    def stage_from_frozen(self, features: torch.Tensor, stage: int = 4) -> torch.Tensor:
        """The activation of `stage` (1-based, after the frozen ones) from `frozen_features`' output."""
        if not self.frozen_stages:
            features = self.stem(features)
        for module in self.stages[self.frozen_stages : stage]:
            features = module(features)
        return features

    def forward_from_frozen(self, features: torch.Tensor) -> torch.Tensor:
        """The defect logit from `frozen_features`' output."""
        return self.head(self.stage_from_frozen(features))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations A^1..A^4 of the stages."""
        outputs = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """B×h×w defect logits at stage-4 resolution (a class activation map for free)."""
        return self.head.logit_map(self.features(x)[-1])


def _stage_strides(output_stride: int) -> tuple[list[int], list[int]]:
    """Strides and dilations of stages 1..4 (stage 1 follows a stride-4 stem)."""
    if output_stride == 32:
        return [1, 2, 2, 2], [1, 1, 1, 1]
    if output_stride == 16:
        return [1, 2, 2, 1], [1, 1, 1, 2]
    return [1, 2, 1, 1], [1, 1, 2, 4]


def _build_compact(config: ClassifierConfig) -> DefectClassifier:
    width = config.width
    stem = nn.Sequential(
        nn.Conv2d(config.channels, width // 2, 3, 2, 1, bias=False),
        nn.BatchNorm2d(width // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(width // 2, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    strides, dilations = _stage_strides(config.output_stride)
    channels = [width, width * 2, width * 4, width * 8]
    stages: list[nn.Module] = []
    in_channels = width
    for index in range(4):
        blocks: list[nn.Module] = []
        for block in range(config.blocks[index]):
            blocks.append(
                BasicBlock(
                    in_channels,
                    channels[index],
                    stride=strides[index] if block == 0 else 1,
                    dilation=dilations[index],
                )
            )
            in_channels = channels[index]
        stages.append(nn.Sequential(*blocks))
    head = PooledHead(channels[3], config.pooling, config.topk_fraction, config.lse_r)
    model = DefectClassifier(stem, stages, head, channels, frozen_stages=config.frozen_stages)
    _initialise(model)
    return model


def _initialise(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    # The logit head starts near zero: Kaiming fan_out of a 1-output convolution would give logits of ±20.
    for module in model.modules():
        if isinstance(module, PooledHead):
            nn.init.normal_(module.classifier.weight, std=0.01)
            nn.init.zeros_(module.classifier.bias)
    # Zero the last BN of each residual branch: every block starts as the identity (trains faster).
    for module in model.modules():
        if isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


def _build_torchvision(config: ClassifierConfig) -> DefectClassifier:
    import torchvision

    constructor = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34}[config.arch]
    net = constructor(weights=None)
    # torchvision's BasicBlock refuses replace_stride_with_dilation; do the same surgery by hand:
    # the dilated stages keep stride 1 and widen their 3×3 convolutions instead.
    _, dilations = _stage_strides(config.output_stride)
    for layer, dilation in zip([net.layer2, net.layer3, net.layer4], dilations[1:]):
        if dilation == 1:
            continue
        for block in layer:
            for conv in (block.conv1, block.conv2):
                conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
    if config.pretrained:
        load_pretrained_backbone(net, Path(config.pretrained))
    if config.channels != 3:
        # Gray input: one filter per output, the sum of the RGB filters (pretrained or not).
        old = net.conv1
        conv = nn.Conv2d(config.channels, old.out_channels, 7, 2, 3, bias=False)
        with torch.no_grad():
            conv.weight.copy_(old.weight.sum(dim=1, keepdim=True).repeat(1, config.channels, 1, 1) / config.channels)
        net.conv1 = conv
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    channels = [64, 128, 256, 512]
    head = PooledHead(channels[3], config.pooling, config.topk_fraction, config.lse_r)
    nn.init.normal_(head.classifier.weight, std=0.01)
    nn.init.zeros_(head.classifier.bias)
    return DefectClassifier(stem, stages, head, channels, frozen_stages=config.frozen_stages)


def load_pretrained_backbone(net: nn.Module, path: Path) -> None:
    """Load a local torchvision ImageNet checkpoint into a torchvision ResNet (fc layer ignored)."""
    if not path.is_file():
        raise ModelError(f"pretrained weights {path}: no such file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ModelError(f"pretrained weights {path.name}: not a readable PyTorch state_dict ({error}).") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"pretrained weights {path.name}: expected a state_dict, found {type(state).__name__}.")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} keys of the wrong shape (e.g. {wrong_shape[0]})")
        raise ModelError(
            f"pretrained weights {path.name} do not match a torchvision {type(net).__name__} backbone: "
            + "; ".join(details) + ". Use the ImageNet checkpoint of the same architecture."
        )
    net.load_state_dict(state, strict=False)


def _build_efficientnet(config: ClassifierConfig, imagenet_weights: bool) -> DefectClassifier:
    network = EfficientNetLite0()
    if imagenet_weights:
        load_imagenet_weights(network)
    network._conv_stem = adapt_input_channels(network._conv_stem, config.channels)
    stem, stages, channels = efficientnet_stages(network, config.output_stride)
    head = PooledHead(channels[3], config.pooling, config.topk_fraction, config.lse_r)
    nn.init.normal_(head.classifier.weight, std=0.01)
    nn.init.zeros_(head.classifier.bias)
    return DefectClassifier(stem, stages, head, channels, frozen_stages=config.frozen_stages)


def build_classifier(config: ClassifierConfig, imagenet_weights: bool = True) -> DefectClassifier:
    """The network of `config`; `imagenet_weights=False` skips reading the packaged weights (when a
    checkpoint's own weights are loaded over them right after)."""
    if config.arch == "efficientnet-lite0":
        return _build_efficientnet(config, imagenet_weights)
    if config.arch == "compact":
        return _build_compact(config)
    return _build_torchvision(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
