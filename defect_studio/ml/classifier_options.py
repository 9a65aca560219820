"""The classifier's settings, importable without torch: the CLI parser and the window's forms need
them before (or without) the training engine loading."""

from __future__ import annotations

from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from defect_studio.errors import ConfigError, DataError, ModelError
from defect_studio.ml.tiling import MIN_TILE_SIZE, TILING_MODES, WHOLE_IMAGE_MAX_PIXELS, TileGrid, Tiling, check_tile_settings

ARCHITECTURES = ("efficientnet-lite0", "compact", "resnet18", "resnet34")
PRETRAINED_ARCHITECTURES = ("efficientnet-lite0",)  # ImageNet weights ship with the package

# What an unset (None) setting becomes, per backbone: a pretrained network wants the input scale and size
# it was trained at and a gentler learning rate; the compact network learns everything from the tags.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # ImageNet features need few epochs: on MT the best validation epoch was the 4th-6th of 8, on the demo
    # the 7th-11th of 23 (docs/benchmarks/cams-mt.md); a short plan keeps the demo's first training short.
    "efficientnet-lite0": {"input_size": 256, "normalisation": "symmetric", "learning_rate": 1e-3, "frozen_stages": 2,
                           "output_stride": 32, "epochs": 12, "patience": 4, "min_epochs": 4},
    "compact": {"input_size": 128, "normalisation": "per-image-robust", "learning_rate": 3e-3, "frozen_stages": 0,
                "output_stride": 16, "epochs": 60, "patience": 12, "min_epochs": 8},
    "resnet18": {"input_size": 128, "normalisation": "per-image-robust", "learning_rate": 3e-3, "frozen_stages": 0,
                 "output_stride": 16, "epochs": 60, "patience": 12, "min_epochs": 8},
    "resnet34": {"input_size": 128, "normalisation": "per-image-robust", "learning_rate": 3e-3, "frozen_stages": 0,
                 "output_stride": 16, "epochs": 60, "patience": 12, "min_epochs": 8},
}
POOLINGS = ("avg", "max", "topk", "lse")
OLD_LEARNING_RATE = "lr"  # the name of `learning_rate` before it matched the segmenter's
TILING_SETTINGS = ("tiling", "tile_size", "tile_overlap", "mil_top_k")


@dataclass
class ClassifierConfig:
    """Architecture, input and training recipe of a classifier; stored in every checkpoint."""

    # EfficientNet-Lite0 with ImageNet weights: its CAMs localise MT's defects 2-3x better than any network
    # trained from scratch on the tags (docs/benchmarks/cams-mt.md).
    arch: str = "efficientnet-lite0"
    width: int = 16  # channels of stage 1 (compact); stages double it: w, 2w, 4w, 8w
    blocks: tuple[int, int, int, int] = (1, 1, 1, 1)  # residual blocks per stage (compact)
    output_stride: int | None = None  # 32, 16 or 8: the last stages trade stride for dilation (None: ARCH_DEFAULTS)
    # The stem and this many stages keep their ImageNet weights: their features are computed once per image
    # and reused by every epoch (and by the good-image prior), which is what makes fine-tuning fit a CPU.
    frozen_stages: int | None = None
    pooling: str = "avg"  # measured on MT (docs/benchmarks/classifier-mt.md): avg beat LSE within the budget
    topk_fraction: float = 0.05  # of the stage-4 cells, for pooling = topk
    lse_r: float = 5.0  # sharpness of log-sum-exp pooling (large -> max, small -> mean)
    input_size: int | None = None
    channels: int = 1
    normalisation: str | None = None
    epochs: int | None = None  # a cap: the time budget may plan fewer (None: ARCH_DEFAULTS)
    learning_rate: float | None = None  # peak (one-cycle), as the segmenter's is named
    weight_decay: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    patience: int | None = None  # epochs without a better validation AUROC before stopping
    min_epochs: int | None = None
    val_fraction: float = 0.15
    augment: bool = True
    augment_strength: float = 0.5  # 0: flips only; 1: plus affine jitter, contrast, noise
    rotate90: bool = False  # 90° turns: off by default, since many surfaces have a grain direction (MT's streaks)
    balanced_sampling: bool = True
    # Progressive resizing: the first `low_res_fraction` of the planned epochs train on inputs scaled by
    # `low_res_scale` (a quarter of the compute at 0.5); the network is fully convolutional, so the last
    # epochs at full size adapt it. 0 disables.
    low_res_fraction: float = 0.0  # measured on MT: 0.7 lost to plain training at the same cost
    low_res_scale: float = 0.5
    # A wall-clock budget (the whole job): after each epoch the plan shrinks to the epochs that fit, and the
    # learning-rate schedule follows the plan. None: no limit.
    max_train_seconds: float | None = 600.0
    channels_last: bool = True
    bf16: bool = False  # bf16 autocast on the CPU (CUDA always uses autocast)
    threads: int | None = None  # torch threads for training; None leaves the default
    pretrained: str | None = None  # local torchvision ImageNet state_dict for resnet18/34; never downloaded
    # The good-image prior: a memory bank of the good images' stage features, kept in the checkpoint.
    prior_stage: int = 3  # stride 16: measured best for EfficientNet-Lite0 on MT
    prior_bank_size: int = 8192  # coreset size: bounded memory and a fixed cost per query
    # The affinity head (ml/affinity.py) trains this many epochs after the classifier, from its CAMs, and is
    # kept in the checkpoint for the "affinity-walk" CAM method. 0: no head. Whole-image training only.
    affinity_epochs: int = 8
    # Tiles (issue 15): "tiles" makes every image larger than a tile a bag of tiles at native resolution
    # (multiple-instance learning, ml/tile_training.py); "auto" only the images above one segmenter tile
    # of pixels (1024 x 1024); "whole" letterboxes every image, as before tiles. None: chosen from the
    # project's image sizes when it trains (`choose_classifier_tiling`); a checkpoint without it is whole.
    tiling: str | None = None
    tile_size: int | None = None  # px; None: the input size (the network sees each tile unshrunk)
    tile_overlap: int | None = None  # px; None: a quarter of the tile, as the tiled CAMs always cut
    mil_top_k: int = 2  # tiles of each defect image trained as defect each epoch (its highest scoring)
    extra: dict[str, Any] = field(default_factory=dict)
    # `learning_rate` by its earlier name: checkpoints, stored settings and callers from before it matched
    # the segmenter's. Read only; a config always stores `learning_rate`.
    lr: InitVar[float | None] = None

    def __post_init__(self, lr: float | None) -> None:
        if lr is not None and self.learning_rate is None:
            self.learning_rate = lr
        self.blocks = tuple(int(b) for b in self.blocks)  # type: ignore[assignment]
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        for name, value in ARCH_DEFAULTS[self.arch].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not 0 <= self.frozen_stages <= 3:
            raise ValueError(f"frozen_stages must be within 0..3 (stage 4 always trains), got {self.frozen_stages}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        if len(self.blocks) != 4:
            raise ValueError(f"blocks must give 4 stages, got {self.blocks}")
        if self.tiling is not None and self.tiling not in TILING_MODES:
            raise ValueError(f"unknown tiling {self.tiling!r}; choose one of {', '.join(TILING_MODES)}")
        if self.tile_size is not None and (int(self.tile_size) != self.tile_size or self.tile_size < MIN_TILE_SIZE):
            raise ValueError(f"the tile size {self.tile_size!r} px is smaller than the network's minimum of "
                             f"{MIN_TILE_SIZE} px (a tile must span at least one cell of its last stage)")
        try:
            check_tile_settings(self.tile_pixels, self.overlap_pixels)
        except DataError as error:
            raise ValueError(str(error)) from error
        if int(self.mil_top_k) != self.mil_top_k or self.mil_top_k < 1:
            raise ValueError(f"mil_top_k must be a whole number of tiles, at least 1, got {self.mil_top_k!r}")

    @property
    def tile_pixels(self) -> int:
        return int(self.tile_size if self.tile_size is not None else max(MIN_TILE_SIZE, self.input_size))

    @property
    def overlap_pixels(self) -> int:
        return int(self.tile_overlap if self.tile_overlap is not None else self.tile_pixels // 4)

    def image_tiling(self) -> Tiling | None:
        """How this classifier cuts images (None: every image whole, as before tiles)."""
        if self.tiling in (None, "whole"):
            return None
        return Tiling(self.tiling, self.tile_pixels, self.overlap_pixels, WHOLE_IMAGE_MAX_PIXELS)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocks"] = list(self.blocks)
        return data

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> "ClassifierConfig":
        """The config of settings a user gave (options, forms, the project's workflow settings): an unknown
        setting or a bad value is a ConfigError that says which."""
        settings = dict(settings or {})
        unknown = sorted(set(settings) - {f.name for f in fields(cls)} - {OLD_LEARNING_RATE})
        if unknown:
            raise ConfigError(f"unknown classifier settings: {', '.join(unknown)}")
        try:
            return cls(**settings)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"classifier settings: {error}") from error

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierConfig":
        """The config a checkpoint stores (settings a later version dropped are ignored)."""
        known = {f.name for f in fields(cls)} | {OLD_LEARNING_RATE}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as error:
            raise ModelError(f"the checkpoint's classifier config is invalid ({error}).") from error


def classifier_tile_grid(tiling: Tiling | None, height: int, width: int) -> TileGrid | None:
    """The one rule for where a classifier cuts an image (training, scores and tiled CAMs all use it):
    None, computed whole, for no tiling or "whole", for "auto" up to its whole-image limit, and for an
    image no larger than one tile (it is already at least at native resolution); else the tile grid."""
    if tiling is None or tiling.mode == "whole":
        return None
    if height <= tiling.tile_size and width <= tiling.tile_size:
        return None
    return tiling.grid_for(height, width)


def choose_classifier_tiling(config: ClassifierConfig, image_sizes: list[tuple[int, int]]) -> ClassifierConfig:
    """The config with its tiling settled for images of these (height, width)s.

    Unset (None), the tiling is chosen from the sizes as the segmenter's is (`choose_tiling`): "whole" when
    every image has at most one segmenter tile of pixels (1024 x 1024: as before tiles), else "auto": the
    larger images become bags of tiles of the input size, the others stay whole. "auto" that would cut no
    image is "whole". The tile size and overlap are written out, so the run's record says what it used. A
    tile larger than every image in "tiles" mode is refused: nothing would be tiled."""
    import dataclasses

    from defect_studio.ml.tiling import choose_tiling

    mode = config.tiling or choose_tiling(image_sizes, config.tile_pixels, config.overlap_pixels).mode
    auto = Tiling("auto", config.tile_pixels, config.overlap_pixels, WHOLE_IMAGE_MAX_PIXELS)
    if mode == "auto" and not any(classifier_tile_grid(auto, h, w) is not None for h, w in image_sizes):
        mode = "whole"  # auto cuts none of these images: they train whole, as before tiles, and say so
    if mode == "tiles" and image_sizes and all(max(h, w) <= config.tile_pixels for h, w in image_sizes):
        largest = max(max(h, w) for h, w in image_sizes)
        raise ConfigError(f"the tile size ({config.tile_pixels} px) is not smaller than any image (the largest side is "
                          f"{largest} px), so no image would be cut into tiles: choose tiles under {largest} px or "
                          "tiling 'whole'.")
    return dataclasses.replace(config, tiling=mode, tile_size=config.tile_pixels, tile_overlap=config.overlap_pixels)


# Read access by the earlier name (the InitVar above takes it on construction).
ClassifierConfig.lr = property(lambda self: self.learning_rate, doc="learning_rate, by its earlier name")  # type: ignore[assignment]
