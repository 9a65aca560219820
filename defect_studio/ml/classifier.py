"""Training, saving and loading the image-level defect classifier.

`train_classifier_job` is the one training loop (the CLI, the GUI and the benchmark all use it):
images are decoded and prepared once and cached in memory, the network trains with a class-balanced
sampler, surface augmentation, AdamW and a warm-up + cosine schedule fitted to the time budget (re-planned
after each epoch), and is evaluated on a fixed validation split after every epoch. The best epoch (by validation AUROC, then loss) is kept in memory and written
atomically at the end, so a cancelled run leaves any previous checkpoint untouched.

A config whose tiling cuts images (`ClassifierConfig.tiling`) trains by tiles instead
(`ml/tile_training.py`: multiple-instance learning, with the same epochs, budget and checkpoint), and
`LoadedClassifier.predict_scores` then scores a large image by its most defect-like tile.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from defect_studio.atomic import atomic_write_bytes
from defect_studio.dataset_layout import LABELS, check_two_classes
from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import read_image
from defect_studio.jobs import CancelToken, EtaClock, Progress, ProgressKind
from defect_studio.ml.affinity import AffinityModel, AffinitySettings, train_affinity
from defect_studio.ml.augment import augment_batch, surface_augmentation
from defect_studio.ml.classifier_options import choose_classifier_tiling, classifier_tile_grid
from defect_studio.ml.good_prior import GoodImagePrior, build_good_prior
from defect_studio.ml.device import describe_device, peak_memory_mb, select_device, torch_threads
from defect_studio.ml.distributed import Ranks, data_parallel
from defect_studio.ml.metrics import auroc, binary_scores
from defect_studio.ml.models import ClassifierConfig, DefectClassifier, build_classifier
from defect_studio.ml.preprocess import Geometry, Preprocessing
from defect_studio.ml.tiling import Tiling

if TYPE_CHECKING:
    from defect_studio.project.store import Project

CHECKPOINT_FORMAT = "defect-studio-classifier"
CHECKPOINT_VERSION = 1
VALIDATION_SEED_SETTING = "classifier_validation_seed"
INFERENCE_BATCH = 16

Sample = tuple[Path, str, str]  # (image path, 'good' | 'defect', sha256)


@dataclass
class TrainResult:
    checkpoint_path: Path
    metrics: dict[str, float]  # of the best epoch: val_auroc, val_f1, train_auroc, ...
    best_epoch: int
    epochs_run: int
    seconds: float
    seconds_per_epoch: float
    peak_memory_mb: float
    device: str
    decision_threshold: float
    history: list[dict[str, float]] = field(default_factory=list)
    train_hashes: list[str] = field(default_factory=list)
    validation_hashes: list[str] = field(default_factory=list)
    test_probabilities: list[float] | None = None  # of the `evaluation` samples, in their order


# ----------------------------------------------------------------------------------------------
# validation split


def _hash_fraction(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validation_split(keys_and_labels: Sequence[tuple[str, str]], fraction: float, seed: int) -> set[str]:
    """Keys (image hashes) held out for validation, stratified by label.

    Each image's place depends only on (seed, its hash), so tagging more images never moves the
    ones already placed; each class keeps at least one image on each side when it has two.
    """
    held_out: set[str] = set()
    for label in LABELS:
        keys = sorted({k for k, l in keys_and_labels if l == label}, key=lambda k: _hash_fraction(seed, k))
        chosen = [k for k in keys if _hash_fraction(seed, k) < fraction]
        if len(keys) >= 2:
            if not chosen:
                chosen = keys[:1]
            elif len(chosen) == len(keys):
                chosen = keys[:-1]
        else:
            chosen = []
        held_out.update(chosen)
    return held_out


# ----------------------------------------------------------------------------------------------
# data


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The probability threshold with the best defect F1 (midpoint between neighbouring scores)."""
    labels = np.asarray(labels).astype(bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.all() or not labels.any():
        return 0.5
    values = np.unique(probabilities)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2.0]) if len(values) > 1 else values
    best_f1, best_threshold = -1.0, 0.5
    for threshold in candidates:
        f1 = binary_scores(labels, probabilities > threshold).f1
        if f1 > best_f1 + 1e-12:
            best_f1, best_threshold = f1, float(threshold)
    return best_threshold


def _autocast(device: torch.device, config: ClassifierConfig):  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)


def _to_device(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    batch = batch.to(device=device, dtype=torch.float32, non_blocking=True)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


@torch.no_grad()
def predict_cached(
    model: DefectClassifier, cache: torch.Tensor, device: torch.device, config: ClassifierConfig, batch_size: int = 64,
    scale: float = 1.0, from_frozen: bool = False,
) -> np.ndarray:
    """Defect probabilities of prepared images (optionally resized by `scale` first), or of their
    frozen-stage features (`from_frozen`)."""
    model.eval()
    out = []
    for start in range(0, len(cache), batch_size):
        batch = cache[start : start + batch_size].float()
        if scale != 1.0:
            batch = nn.functional.interpolate(batch, scale_factor=scale, mode="area")
        batch = _to_device(batch, device, config.channels_last)
        with _autocast(device, config):
            logits = model.forward_from_frozen(batch) if from_frozen else model(batch)
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def frozen_features_cached(
    model: DefectClassifier, cache: torch.Tensor, device: torch.device, config: ClassifierConfig, cancel: CancelToken,
    batch_size: int = 32,
) -> Generator[Progress, None, torch.Tensor]:
    """The frozen stages' output for every prepared image, computed once (float16, on the CPU)."""
    model.eval()
    clock = EtaClock(len(cache))
    out = []
    for start in range(0, len(cache), batch_size):
        cancel.raise_if_cancelled()
        batch = _to_device(cache[start : start + batch_size].float(), device, config.channels_last)
        with torch.no_grad():
            out.append(model.frozen_features(batch).to("cpu", torch.float16))
        yield clock.progress("features", min(len(cache), start + batch_size), "ImageNet features of the frozen stages")
    return torch.cat(out).contiguous() if out else cache


def flip_features(batch: torch.Tensor, generator: torch.Generator, rotate90: bool) -> torch.Tensor:
    """Random horizontal / vertical flips (and 90° turns) of each feature map: the augmentation that
    commutes with frozen convolutional stages (up to their padding)."""
    out = batch.clone()
    for index in range(len(out)):
        flips = torch.rand(3, generator=generator)
        if flips[0] < 0.5:
            out[index] = out[index].flip(-1)
        if flips[1] < 0.5:
            out[index] = out[index].flip(-2)
        if rotate90 and flips[2] < 0.5 and out.shape[-1] == out.shape[-2]:
            out[index] = out[index].transpose(-1, -2)
    return out


@torch.no_grad()
def build_prior_from_features(
    model: DefectClassifier, features: torch.Tensor, device: torch.device, config: ClassifierConfig, batch_size: int = 32,
) -> GoodImagePrior:
    """The good-image prior from the good images' frozen features, at the configured stage."""
    model.eval()
    if config.prior_stage < model.frozen_stages:
        raise ModelError(f"the good-image prior's stage {config.prior_stage} lies before the cached features "
                         f"(stage {model.frozen_stages}); choose a later prior stage.")

    def activations() -> Iterator[torch.Tensor]:
        for start in range(0, len(features), batch_size):
            x = _to_device(features[start : start + batch_size].float(), device, config.channels_last)
            yield model.stage_from_frozen(x, config.prior_stage).float().cpu()

    return build_good_prior(activations(), config.prior_stage, config.prior_bank_size, seed=config.seed)


# ----------------------------------------------------------------------------------------------
# checkpoints


def _versions() -> dict[str, str]:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def checkpoint_bytes(
    model: nn.Module, config: ClassifierConfig, preprocessing: Preprocessing, decision_threshold: float,
    metrics: dict[str, float], image_hashes: list[str], epoch: int, good_prior: GoodImagePrior | None = None,
    affinity: AffinityModel | None = None,
) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "state_dict": state,
        "config": config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "seed": int(config.seed),
        "decision_threshold": float(decision_threshold),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "image_hashes": list(image_hashes),
        "epoch": int(epoch),
        "versions": _versions(),
    }
    if good_prior is not None:
        payload["good_prior"] = good_prior.to_payload()
    if affinity is not None:
        payload["affinity"] = affinity.to_payload()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@dataclass
class LoadedClassifier:
    model: DefectClassifier  # eval mode, on `device`
    preprocessing: Preprocessing
    config: ClassifierConfig
    checkpoint_path: Path
    checkpoint_sha256: str
    device: torch.device
    decision_threshold: float = 0.5
    metrics: dict[str, float] = field(default_factory=dict)
    image_hashes: list[str] = field(default_factory=list)
    good_prior: GoodImagePrior | None = None  # the good images' memory bank (checkpoints since the prior exists)
    affinity: AffinityModel | None = None  # the affinity walk's head (whole-image checkpoints since it exists)

    def prepare(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[Geometry]]:
        """Network inputs on the model's device (with the model's memory format) and their geometries."""
        batch, geometries = self.preprocessing.prepare_batch(images)
        return _to_device(batch, self.device, self.config.channels_last), geometries

    @property
    def tiling(self) -> Tiling | None:
        """How this classifier cuts an image (recorded in its checkpoint; None: whole, as before tiles)."""
        return self.config.image_tiling()

    def predict_scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Defect probabilities, one per float [0, 1] H×W×C image: of the image letterboxed whole, or,
        where the classifier's tiling cuts it, of its most defect-like tile (`bag_probability`)."""
        grids = [classifier_tile_grid(self.tiling, image.shape[0], image.shape[1]) for image in images]
        if all(grid is None for grid in grids):
            return self._whole_scores(images)
        from defect_studio.ml.tile_training import bag_probability

        scores = np.zeros(len(images), dtype=np.float32)
        whole = [index for index, grid in enumerate(grids) if grid is None]
        scores[whole] = self._whole_scores([images[index] for index in whole])
        for index, grid in enumerate(grids):
            if grid is not None:
                tiles = [images[index][box.slices] for box in grid.boxes()]  # views: no pixels copied
                scores[index] = bag_probability(self._whole_scores(tiles))
        return scores

    @torch.no_grad()
    def _whole_scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Defect probabilities of images letterboxed whole (as every image was before tiles)."""
        scores = []
        for start in range(0, len(images), INFERENCE_BATCH):
            batch, _ = self.prepare(images[start : start + INFERENCE_BATCH])
            with _autocast(self.device, self.config):
                logits = self.model(batch)
            scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def predict_labels(self, images: list[np.ndarray]) -> list[str]:
        return ["defect" if s > self.decision_threshold else "good" for s in self.predict_scores(images)]


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> LoadedClassifier:
    """Load a checkpoint written by the training job (weights_only: no code is ever unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"classifier checkpoint {path}: no such file.")
    data = path.read_bytes()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt, truncated or foreign: one message for the user
        raise ModelError(f"{path.name}: not a readable classifier checkpoint ({type(error).__name__}: {error}).") from error
    return classifier_from_payload(payload, path, hashlib.sha256(data).hexdigest(), device)


def classifier_from_payload(payload: Any, path: Path, sha256: str, device: str | torch.device = "cpu") -> LoadedClassifier:
    """A classifier from a checkpoint's loaded payload (a file's, or one kept inside a segmenter's checkpoint)."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path.name}: not a defect-studio classifier checkpoint.")
    if int(payload.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise ModelError(f"{path.name}: written by a newer defect-studio (format {payload['format_version']}).")
    config = ClassifierConfig.from_dict(dict(payload.get("config") or {}))
    config.pretrained = None  # the weights are in the checkpoint; the original file need not exist
    preprocessing = Preprocessing.from_dict(dict(payload.get("preprocessing") or {}))
    model = build_classifier(config, imagenet_weights=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, RuntimeError) as error:
        raise ModelError(f"{path.name}: the weights do not match the recorded {config.arch} architecture ({error}).") from error
    torch_device = select_device(device) if isinstance(device, str) else device
    model = model.to(torch_device).eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedClassifier(
        model=model,
        preprocessing=preprocessing,
        config=config,
        checkpoint_path=path,
        checkpoint_sha256=sha256,
        device=torch_device,
        decision_threshold=float(payload.get("decision_threshold", 0.5)),
        metrics=dict(payload.get("metrics") or {}),
        image_hashes=list(payload.get("image_hashes") or []),
        good_prior=_load_prior(payload.get("good_prior"), torch_device, path),
        affinity=_load_affinity(payload.get("affinity"), torch_device, path),
    )


def _load_prior(payload: Any, device: torch.device, path: Path) -> GoodImagePrior | None:
    if payload is None:
        return None
    try:
        prior = GoodImagePrior.from_payload(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelError(f"{path.name}: the good-image prior in the checkpoint is damaged ({error}).") from error
    prior.bank = prior.bank.to(device)
    return prior


def _load_affinity(payload: Any, device: torch.device, path: Path) -> AffinityModel | None:
    if payload is None:
        return None
    try:
        return AffinityModel.from_payload(payload, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ModelError(f"{path.name}: the affinity head in the checkpoint is damaged ({error}).") from error


# ----------------------------------------------------------------------------------------------
# training


def _balanced_order(labels: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """One epoch of indices with both classes equally frequent (the minority is resampled)."""
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    per_class = max(len(positives), len(negatives))
    picks = []
    for members in (positives, negatives):
        repeats = [members[torch.randperm(len(members), generator=generator).numpy()] for _ in range(math.ceil(per_class / len(members)))]
        picks.append(np.concatenate(repeats)[:per_class])
    order = np.concatenate(picks)
    return order[torch.randperm(len(order), generator=generator).numpy()]


def train_classifier_job(
    samples: Sequence[Sample],
    config: ClassifierConfig,
    checkpoint_path: str | Path,
    cancel: CancelToken,
    device: str = "auto",
    validation_keys: Iterable[str] | None = None,
    evaluation: Sequence[Sample] = (),
    ranks: Ranks | None = None,
) -> Generator[Progress, None, TrainResult]:
    """Train on `samples` [(image path, good|defect, sha256)]; write the best epoch to checkpoint_path.

    The validation images are `validation_keys` (hashes) when given, else a seeded stratified split
    (`validation_split`). `evaluation` samples (a benchmark's test split) are only scored at the end,
    into the result's metrics as test_*; they never influence training or model choice.

    `ranks` (a torchrun process group, see `distributed.py`): every rank runs this job with the same
    arguments; each prepares its shard of the images, the trainable part trains under
    DistributedDataParallel on its share of each global batch of `config.batch_size`, and rank 0 alone
    builds the good-image prior and writes the checkpoint. `device` may then name the rank's GPU ('cuda:1').
    """
    ranks = ranks or Ranks.single()
    checkpoint_path = Path(checkpoint_path)
    check_two_classes([label for _, label, _ in samples])
    if config.batch_size % ranks.world_size:
        raise DataError(f"the batch of {config.batch_size} images does not split evenly over {ranks.world_size} "
                        f"processes; choose a batch size that is a multiple of {ranks.world_size}.")
    torch_device = torch.device(device) if device.startswith("cuda:") else select_device(device)
    with torch_threads(config.threads):
        result = yield from _train(samples, config, checkpoint_path, cancel, torch_device, validation_keys, evaluation, ranks)
    return result


@dataclass
class _TrainingData:
    """The prepared images (or their frozen-stage features) of every split, in memory on every rank."""

    train_samples: list[Sample]
    val_samples: list[Sample]
    train_x: torch.Tensor
    val_x: torch.Tensor
    eval_x: torch.Tensor
    train_y: np.ndarray
    val_y: np.ndarray
    from_frozen: bool


@dataclass
class _Optimisation:
    """AdamW with warm-up + cosine decay over the planned epochs; a time budget may shorten the plan
    after each epoch, and the decay follows the new plan so the last epoch still ends at a low rate."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: dict[str, int]
    steps_per_epoch: int
    loss_fn: nn.Module

    def replan(self, planned_epochs: int) -> None:
        self.plan["total_steps"] = planned_epochs * self.steps_per_epoch
        self.plan["warmup"] = max(1, int(0.1 * self.plan["total_steps"]))


@dataclass
class _Best:
    """The best epoch so far (by validation AUROC, then loss) and the early-stopping count."""

    key: tuple[float, float] = (-math.inf, -math.inf)
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.5
    state: dict[str, torch.Tensor] | None = None
    epochs_since: int = 0

    def consider(self, epoch: int, metrics: dict[str, float], threshold: float, model: nn.Module, low_resolution: bool) -> bool:
        """Keep `epoch` when it beats the best so far (a low-resolution epoch never counts); True if kept."""
        key = (metrics["val_auroc"] if not math.isnan(metrics["val_auroc"]) else -1.0, -metrics["val_loss"])
        if low_resolution:
            return False
        if key <= self.key:
            self.epochs_since += 1
            return False
        self.key, self.epoch, self.metrics, self.threshold, self.epochs_since = key, epoch, dict(metrics), threshold, 0
        self.state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return True


class _EpochLoop:
    """The epochs of one classifier training (whole images or tiles): their history, the best epoch, early
    stopping and the time budget, which rank 0's clock decides so every rank stops after the same epoch."""

    def __init__(self, config: ClassifierConfig, optimisation: _Optimisation, ranks: Ranks, started: float) -> None:
        self.config, self.optimisation, self.ranks, self.started = config, optimisation, ranks, started
        self.clock = EtaClock(config.epochs)
        self.best = _Best()
        self.history: list[dict[str, float]] = []
        self.epoch_times: list[float] = []
        self.epochs_run = 0
        self.planned_epochs = config.epochs
        self._stopped = False

    def epochs(self) -> Iterator[int]:
        """1, 2, ... until the plan (shrunk by the budget) is done or training stopped early."""
        for epoch in range(1, self.config.epochs + 1):
            if self._stopped or epoch > self.planned_epochs:
                return
            yield epoch

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean(self.epoch_times)) if self.epoch_times else 0.0

    def end_epoch(self, epoch: int, epoch_start: float, train_loss: float, val_metrics: dict[str, float],
                  threshold: float, model: DefectClassifier, low_resolution: bool, detail: str = "") -> Progress:
        """Record a finished epoch, keep it if it is the best, and plan what follows (early stop, budget); the
        epoch's progress event, `detail` said after "epoch k/n"."""
        config = self.config
        self.epoch_times.append(time.monotonic() - epoch_start)
        self.epochs_run = epoch
        metrics = {"loss": train_loss, **val_metrics, "lr": float(self.optimisation.scheduler.get_last_lr()[0])}
        self.history.append({"epoch": epoch, **metrics})
        improved = self.best.consider(epoch, metrics, threshold, model, low_resolution)
        elapsed, mean_epoch = self.ranks.from_rank0((time.monotonic() - self.started, self.seconds_per_epoch))
        message = f"epoch {epoch}/{self.planned_epochs}{detail}" + (" (best)" if improved else "")
        progress = self.clock.progress("train", epoch, message, metrics, kind=ProgressKind.EPOCH)
        if epoch >= config.min_epochs and self.best.epochs_since >= config.patience:
            self._stopped = True
        elif config.max_train_seconds is not None:
            planned = _epochs_within_budget(config, epoch, elapsed, mean_epoch)
            if planned is None:
                self._stopped = True
            else:
                self.planned_epochs = planned
                self.optimisation.replan(planned)
                self.clock.total = planned
        return progress


class _TrainingForward(nn.Module):
    """The classifier's training forward pass (from cached frozen features or from images) as a module's
    `forward`, so DistributedDataParallel can wrap it; it holds the classifier, it copies nothing."""

    def __init__(self, model: DefectClassifier, from_frozen: bool) -> None:
        super().__init__()
        self.model = model
        self.from_frozen = from_frozen

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_frozen(batch) if self.from_frozen else self.model(batch)


def _split_samples(
    samples: Sequence[Sample], config: ClassifierConfig, validation_keys: Iterable[str] | None
) -> tuple[list[Sample], list[Sample]]:
    keys_and_labels = [(sha, label) for _, label, sha in samples]
    held_out = set(validation_keys) if validation_keys is not None else validation_split(keys_and_labels, config.val_fraction, config.seed)
    train_samples = [s for s in samples if s[2] not in held_out]
    val_samples = [s for s in samples if s[2] in held_out]
    check_two_classes([label for _, label, _ in train_samples], what="training (after holding out the validation images)")
    if not val_samples:
        raise DataError("too few tagged images to hold out a validation set; tag at least two images of each class.")
    return train_samples, val_samples


def _load_images(
    paths: Sequence[Path], preprocessing: Preprocessing, cancel: CancelToken, device: torch.device
) -> Generator[Progress, None, torch.Tensor]:
    """The prepared network inputs of `paths` (float16, on the CPU)."""
    loading = EtaClock(len(paths))
    size = preprocessing.input_size
    cache = torch.empty((len(paths), preprocessing.channels, size, size), dtype=torch.float16)
    for index, path in enumerate(paths):
        cancel.raise_if_cancelled()
        cache[index] = torch.from_numpy(preprocessing.prepare_array(read_image(path))[0])
        if (index + 1) % 25 == 0 or index + 1 == len(paths):
            yield loading.progress("load", index + 1, f"device: {describe_device(device)}")
    return cache


def _prepare_data(
    samples: Sequence[Sample], config: ClassifierConfig, preprocessing: Preprocessing, cancel: CancelToken,
    device: torch.device, validation_keys: Iterable[str] | None, evaluation: Sequence[Sample], ranks: Ranks,
) -> Generator[Progress, None, tuple[_TrainingData, DefectClassifier]]:
    """Split, load and prepare every image once (each rank its shard, then shared), build the network
    and, when its first stages are frozen, replace the images by their features (computed once)."""
    train_samples, val_samples = _split_samples(samples, config, validation_keys)
    all_paths = [s[0] for s in (*train_samples, *val_samples, *evaluation)]
    shard = ranks.shard(len(all_paths))
    share = f" (this process: {len(shard)} of them)" if ranks.distributed else ""
    yield Progress("load", 0, len(shard), f"device: {describe_device(device)}; preparing {len(all_paths)} images{share}")
    cache = yield from _load_images([all_paths[i] for i in shard], preprocessing, cancel, device)
    torch.manual_seed(config.seed)
    model = build_classifier(config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Frozen stages give the same output every epoch: compute it once and train the rest on it.
    from_frozen = model.frozen_stages > 0
    if from_frozen:
        cache = yield from frozen_features_cached(model, cache, device, config, cancel)
    ranks.raise_if_cancelled(cancel)
    cache = ranks.gather_rows(cache, len(all_paths))
    n_train, n_val = len(train_samples), len(val_samples)
    data = _TrainingData(
        train_samples=train_samples, val_samples=val_samples,
        train_x=cache[:n_train], val_x=cache[n_train : n_train + n_val], eval_x=cache[n_train + n_val :],
        train_y=np.array([s[1] == "defect" for s in train_samples], dtype=np.int64),
        val_y=np.array([s[1] == "defect" for s in val_samples], dtype=np.int64),
        from_frozen=from_frozen,
    )
    return data, model


def _make_optimisation(model: DefectClassifier, config: ClassifierConfig, train_y: np.ndarray, device: torch.device) -> _Optimisation:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil((2 * max(train_y.sum(), len(train_y) - train_y.sum()) if config.balanced_sampling else len(train_y)) / config.batch_size))
    plan = {"total_steps": config.epochs * steps_per_epoch, "warmup": max(1, int(0.1 * config.epochs * steps_per_epoch))}

    def learning_rate_factor(step: int) -> float:
        if step < plan["warmup"]:
            return 0.04 + 0.96 * step / plan["warmup"]
        progress = min(1.0, (step - plan["warmup"]) / max(1, plan["total_steps"] - plan["warmup"]))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    positive_weight = None
    if not config.balanced_sampling:
        positive_weight = torch.tensor([(len(train_y) - train_y.sum()) / max(1, train_y.sum())], device=device)
    return _Optimisation(optimizer, scheduler, plan, steps_per_epoch, nn.BCEWithLogitsLoss(pos_weight=positive_weight))


def _global_batches(order: np.ndarray, batch_size: int, ranks: Ranks) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(global batch, this rank's part of it, how many distinct images the global batch holds) for each
    step of an epoch in `order`.

    The ranks split the epoch with a DistributedSampler (rank r takes every world_size-th position, the
    tail padded from the start so that every rank holds as many), so each global batch of `batch_size`
    is exactly the batch a single process takes at that step (plus at most world_size - 1 repeated
    images in the epoch's last batch) and each rank holds batch_size / world_size of it."""
    if not ranks.distributed:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield index, index, len(index)
        return
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(order)), num_replicas=ranks.world_size, rank=ranks.rank, shuffle=False, drop_last=False)
    positions = np.fromiter(iter(sampler), dtype=np.int64)
    padded = np.concatenate([order, order[: len(positions) * ranks.world_size - len(order)]])
    local_batch = batch_size // ranks.world_size
    for step, start in enumerate(range(0, len(padded), batch_size)):
        part = order[positions[step * local_batch : (step + 1) * local_batch]]
        yield padded[start : start + batch_size], part, max(0, min(batch_size, len(order) - start))


def _epoch_order(train_y: np.ndarray, config: ClassifierConfig, steps_per_epoch: int, generator: torch.Generator) -> np.ndarray:
    """The training images' indices of one epoch (class-balanced unless configured otherwise)."""
    order = _balanced_order(train_y, generator) if config.balanced_sampling else torch.randperm(len(train_y), generator=generator).numpy()
    return order[: steps_per_epoch * config.batch_size]


def _epochs_within_budget(config: ClassifierConfig, epoch: int, elapsed: float, mean_epoch: float) -> int | None:
    """How many epochs the time budget allows in all, at the mean epoch time so far (None: stop now)."""
    assert config.max_train_seconds is not None
    if elapsed > config.max_train_seconds:
        return None
    fit = epoch + int((config.max_train_seconds - elapsed) / (mean_epoch + 1e-9))
    return max(epoch + 1, min(config.epochs, fit)) if fit > epoch else None


def _run_epoch(
    step_model: nn.Module, data: _TrainingData, config: ClassifierConfig, optimisation: _Optimisation, order: np.ndarray,
    generator: torch.Generator, low_resolution: bool, cancel: CancelToken, device: torch.device, ranks: Ranks,
) -> float:
    """One pass over `order` (indices of the training images); returns the mean training loss (of all ranks)."""
    transform = surface_augmentation(config.augment_strength, config.rotate90)
    total_loss, seen = 0.0, 0
    for global_index, index, distinct in _global_batches(order, config.batch_size, ranks):
        ranks.raise_if_cancelled(cancel)
        if distinct < 2:  # BatchNorm needs two images (in the global batch: its statistics are global)
            continue
        if config.augment and data.from_frozen:
            # The flips are drawn for the whole global batch from the generator all ranks share, so the
            # ranks stay in step and together see what a single process would.
            # Only the distinct images draw (a padded repeat would shift the generator for the next epoch).
            batch = data.train_x[torch.from_numpy(global_index)].float()
            batch[:distinct] = flip_features(batch[:distinct], generator, config.rotate90)
            batch = batch[ranks.rank :: ranks.world_size] if ranks.distributed else batch
        else:
            batch = data.train_x[torch.from_numpy(index)].float()
            if low_resolution:
                batch = nn.functional.interpolate(batch, scale_factor=config.low_res_scale, mode="area")
            if config.augment:
                batch = augment_batch(batch, transform)
        batch = _to_device(batch, device, config.channels_last)
        target = torch.from_numpy(data.train_y[index]).float().to(device)
        with _autocast(device, config):
            logits = step_model(batch)
        loss = optimisation.loss_fn(logits.float(), target)
        optimisation.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: the gradients are averaged over the ranks' equal parts here
        optimisation.optimizer.step()
        optimisation.scheduler.step()
        total_loss += float(loss.detach()) * len(index)
        seen += len(index)
    total_loss, seen = ranks.sum([total_loss, seen])
    return total_loss / max(1, seen)


def _predict_all(
    model: DefectClassifier, x: torch.Tensor, device: torch.device, config: ClassifierConfig, ranks: Ranks,
    scale: float = 1.0, from_frozen: bool = False,
) -> np.ndarray:
    """Defect probabilities of every row of `x`: each rank scores its shard, every rank gets them all."""
    shard = ranks.shard(len(x))
    local = predict_cached(model, x[shard] if ranks.distributed else x, device, config, scale=scale, from_frozen=from_frozen)
    return ranks.gather_rows(torch.from_numpy(local), len(x)).numpy()


def _validate(
    model: DefectClassifier, data: _TrainingData, config: ClassifierConfig, device: torch.device, ranks: Ranks, scale: float,
) -> tuple[dict[str, float], float]:
    """Validation loss, AUROC and F1 (at the best threshold) over the whole validation set, and that threshold."""
    val_p = _predict_all(model, data.val_x, device, config, ranks, scale=scale, from_frozen=data.from_frozen)
    val_y = data.val_y
    val_loss = float(nn.functional.binary_cross_entropy(torch.from_numpy(val_p).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(val_y).double()))
    threshold = choose_threshold(val_y, val_p)
    metrics = {"val_loss": val_loss, "val_auroc": auroc(val_y, val_p), "val_f1": binary_scores(val_y, val_p > threshold).f1}
    return metrics, threshold


def _step_model(model: DefectClassifier, from_frozen: bool, device: torch.device, ranks: Ranks) -> nn.Module:
    """What the training steps call: the classifier itself, or its DistributedDataParallel wrapper."""
    return data_parallel(_TrainingForward(model, from_frozen), device, ranks)


def _train(
    samples: Sequence[Sample],
    config: ClassifierConfig,
    checkpoint_path: Path,
    cancel: CancelToken,
    device: torch.device,
    validation_keys: Iterable[str] | None,
    evaluation: Sequence[Sample],
    ranks: Ranks,
) -> Generator[Progress, None, TrainResult]:
    if config.image_tiling() is not None:
        from defect_studio.ml.tile_training import train_by_tiles

        return (yield from train_by_tiles(samples, config, checkpoint_path, cancel, device, validation_keys, evaluation, ranks))
    started = time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    preprocessing = Preprocessing(config.input_size, config.channels, config.normalisation)
    data, model = yield from _prepare_data(samples, config, preprocessing, cancel, device, validation_keys, evaluation, ranks)
    generator = torch.Generator().manual_seed(config.seed)  # the epochs' order: the same on every rank
    if ranks.distributed:
        torch.manual_seed(config.seed + ranks.rank)  # image augmentation: each rank draws for its own part
    optimisation = _make_optimisation(model, config, data.train_y, device)
    step_model = _step_model(model, data.from_frozen, device, ranks)

    loop = _EpochLoop(config, optimisation, ranks, started)
    for epoch in loop.epochs():
        ranks.raise_if_cancelled(cancel)
        epoch_start = time.monotonic()
        step_model.train()
        low_resolution = (0 < config.low_res_scale < 1 and epoch <= int(config.low_res_fraction * loop.planned_epochs)
                          and not data.from_frozen)
        order = _epoch_order(data.train_y, config, optimisation.steps_per_epoch, generator)
        train_loss = _run_epoch(step_model, data, config, optimisation, order, generator, low_resolution, cancel, device, ranks)
        ranks.raise_if_cancelled(cancel)
        ranks.share_buffers_of_rank0(model)
        # Low-resolution epochs are validated at their own scale (shown, never kept as the best: the
        # saved model must be the one that works at the full input size).
        val_metrics, threshold = _validate(model, data, config, device, ranks, config.low_res_scale if low_resolution else 1.0)
        yield loop.end_epoch(epoch, epoch_start, train_loss, val_metrics, threshold, model, low_resolution,
                             " at low resolution" if low_resolution else "")

    best, epochs_run = loop.best, loop.epochs_run
    if best.state is not None:
        model.load_state_dict(best.state)
    else:  # every epoch ran at low resolution (a tiny budget): keep the last state
        best = _Best(epoch=epochs_run, metrics={k: v for k, v in loop.history[-1].items() if k != "epoch"}, threshold=0.5)
    final_metrics, test_probabilities = _final_metrics(model, data, evaluation, config, device, ranks, best)
    ranks.raise_if_cancelled(cancel)
    if ranks.is_writer:
        yield from _write_checkpoint(model, data, config, preprocessing, best, final_metrics, checkpoint_path, cancel, device)
    seconds = time.monotonic() - started
    result = TrainResult(
        checkpoint_path=checkpoint_path,
        metrics=final_metrics,
        best_epoch=best.epoch,
        epochs_run=epochs_run,
        seconds=seconds,
        seconds_per_epoch=loop.seconds_per_epoch,
        peak_memory_mb=peak_memory_mb(device),
        device=describe_device(device) + (f", {ranks.world_size} processes" if ranks.distributed else ""),
        decision_threshold=best.threshold,
        history=loop.history,
        train_hashes=[s[2] for s in data.train_samples],
        validation_hashes=[s[2] for s in data.val_samples],
        test_probabilities=test_probabilities,
    )
    done = f"saved {checkpoint_path.name}" if ranks.is_writer else f"rank {ranks.rank} done (rank 0 saves {checkpoint_path.name})"
    yield Progress("done", epochs_run, config.epochs, done, final_metrics, kind=ProgressKind.RESULT)
    return result


def _final_metrics(
    model: DefectClassifier, data: _TrainingData, evaluation: Sequence[Sample], config: ClassifierConfig,
    device: torch.device, ranks: Ranks, best: _Best,
) -> tuple[dict[str, float], list[float] | None]:
    """The best epoch's metrics with the training AUROC and, for `evaluation` samples, the test scores."""
    train_p = _predict_all(model, data.train_x, device, config, ranks, from_frozen=data.from_frozen)
    final_metrics = {**best.metrics, "train_auroc": auroc(data.train_y, train_p), "best_epoch": float(best.epoch),
                     "val_threshold": best.threshold, "train_images": float(len(data.train_samples)),
                     "val_images": float(len(data.val_samples))}
    if not len(evaluation):
        return final_metrics, None
    eval_y = np.array([s[1] == "defect" for s in evaluation], dtype=np.int64)
    eval_p = _predict_all(model, data.eval_x, device, config, ranks, from_frozen=data.from_frozen)
    scores = binary_scores(eval_y, eval_p > best.threshold)
    final_metrics.update({"test_auroc": auroc(eval_y, eval_p), "test_f1": scores.f1, "test_accuracy": scores.accuracy,
                          "test_precision": scores.precision, "test_recall": scores.recall})
    return final_metrics, eval_p.tolist()


def _write_checkpoint(
    model: DefectClassifier, data: _TrainingData, config: ClassifierConfig, preprocessing: Preprocessing, best: _Best,
    final_metrics: dict[str, float], checkpoint_path: Path, cancel: CancelToken, device: torch.device,
) -> Generator[Progress, None, None]:
    """The good-image prior from the good images' features, the affinity head from the trained classifier's
    CAMs, then the checkpoint, written atomically."""
    yield Progress("prior", 0, 1, "memory bank of the good images' features")
    good = torch.from_numpy(np.concatenate([data.train_y, data.val_y]) == 0)
    good_prior = build_prior_from_features(model, torch.cat([data.train_x, data.val_x])[good], device, config)
    cancel.raise_if_cancelled()
    tagged = [*data.train_samples, *data.val_samples]
    trained = LoadedClassifier(model, preprocessing, config, checkpoint_path, "", device, good_prior=good_prior)
    affinity = yield from train_affinity(
        trained, [s[0] for s in tagged if s[1] == "defect"], [s[0] for s in tagged if s[1] == "good"], cancel,
        AffinitySettings(epochs=config.affinity_epochs, seed=config.seed))
    seen_hashes = sorted({s[2] for s in tagged})
    atomic_write_bytes(
        checkpoint_path,
        checkpoint_bytes(model, config, preprocessing, best.threshold, final_metrics, seen_hashes, best.epoch, good_prior,
                         affinity),
    )


# ----------------------------------------------------------------------------------------------
# projects


def _next_checkpoint_path(models_dir: Path) -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    numbers = []
    for existing in models_dir.glob("classifier-*.pt"):
        suffix = existing.stem.removeprefix("classifier-")
        if suffix.isdigit():
            numbers.append(int(suffix))
    return models_dir / f"classifier-{max(numbers, default=0) + 1}.pt"


def project_validation_seed(project: Project, default: int) -> int:
    """The project's validation seed, fixed at its first training and stored in its settings."""
    seed = project.get_setting(VALIDATION_SEED_SETTING, None)
    if seed is None:
        seed = int(default)
        project.set_setting(VALIDATION_SEED_SETTING, seed)
    return int(seed)


def fit_input_size(config: ClassifierConfig, largest_side: int) -> ClassifierConfig:
    """The config with an input no larger than the project's largest image needs (rounded up to 32 px):
    enlarging every image adds no detail, only cost (the demo's 128-px images train 4x faster at 128 than
    at the EfficientNet default of 256)."""
    fitting = max(64, 32 * math.ceil(largest_side / 32))
    return dataclasses.replace(config, input_size=fitting) if fitting < config.input_size else config


@dataclass
class ProjectTrainingPlan:
    """What a project's training needs, read from the project without changing it (rank 0 reads it
    and sends it to the other ranks of a distributed run, which never open the project)."""

    project_dir: Path
    samples: list[Sample]
    config: ClassifierConfig
    validation_seed: int
    held_out: set[str]


def plan_project_training(project: Project, config: ClassifierConfig) -> ProjectTrainingPlan:
    """The tagged images, the fitted config and the validation split of a project (nothing written)."""
    records = [r for r in project.images() if r.tag in LABELS]
    check_two_classes([r.tag for r in records])
    config = fit_input_size(config, max(max(r.height, r.width) for r in records))
    config = choose_classifier_tiling(config, [(r.height, r.width) for r in records])
    seed = project.get_setting(VALIDATION_SEED_SETTING, None)
    seed = int(config.seed if seed is None else seed)
    return ProjectTrainingPlan(
        project_dir=Path(project.path),
        samples=[(Path(r.path), r.tag, r.sha256) for r in records],
        config=config,
        validation_seed=seed,
        held_out=validation_split([(r.sha256, r.tag) for r in records], config.val_fraction, seed),
    )


def begin_project_training(project: Project, plan: ProjectTrainingPlan) -> Path:
    """Fix the project's validation seed (at its first training) and choose the new checkpoint's path."""
    project_validation_seed(project, plan.validation_seed)
    return _next_checkpoint_path(Path(project.models_dir))


def record_project_training(project: Project, plan: ProjectTrainingPlan, checkpoint_path: Path, result: TrainResult) -> None:
    project.record_training_run(
        kind="classifier",
        config={**plan.config.to_dict(), "validation_seed": plan.validation_seed},
        seed=plan.config.seed,
        metrics={**result.metrics, "seconds": result.seconds, "seconds_per_epoch": result.seconds_per_epoch,
                 "epochs_run": result.epochs_run, "history": result.history},
        checkpoint_path=checkpoint_path,
        dataset_hashes=sorted(result.train_hashes + result.validation_hashes),
    )


def train_project_classifier_job(
    project: Project, config: ClassifierConfig, cancel: CancelToken, device: str = "auto"
) -> Generator[Progress, None, TrainResult]:
    """Train on the project's tagged images; record the run; a cancelled run leaves the project as it was."""
    plan = plan_project_training(project, config)
    checkpoint_path = begin_project_training(project, plan)
    result = yield from train_classifier_job(plan.samples, plan.config, checkpoint_path, cancel, device,
                                             validation_keys=plan.held_out)
    record_project_training(project, plan, checkpoint_path, result)
    return result
