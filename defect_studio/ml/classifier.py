"""Training, saving and loading the image-level defect classifier.

`train_classifier_job` is the one training loop (the CLI, the GUI and the benchmark all use it):
images are decoded and prepared once and cached in memory, the network trains with a class-balanced
sampler, surface augmentation, AdamW and a warm-up + cosine schedule fitted to the time budget (re-planned
after each epoch), and is evaluated on a fixed validation split after every epoch. The best epoch (by validation AUROC, then loss) is kept in memory and written
atomically at the end, so a cancelled run leaves any previous checkpoint untouched.
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
from typing import Any, Generator, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from defect_studio.atomic import atomic_write_bytes
from defect_studio.dataset_layout import LABELS, check_two_classes
from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import read_image
from defect_studio.jobs import CancelToken, EtaClock, Progress, ProgressKind
from defect_studio.ml.augment import augment_batch, surface_augmentation
from defect_studio.ml.good_prior import GoodImagePrior, build_good_prior
from defect_studio.ml.device import describe_device, peak_memory_mb, select_device, torch_threads
from defect_studio.ml.metrics import auroc, binary_scores
from defect_studio.ml.models import ClassifierConfig, DefectClassifier, build_classifier
from defect_studio.ml.preprocess import Geometry, Preprocessing

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

    def prepare(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[Geometry]]:
        """Network inputs on the model's device (with the model's memory format) and their geometries."""
        batch, geometries = self.preprocessing.prepare_batch(images)
        return _to_device(batch, self.device, self.config.channels_last), geometries

    @torch.no_grad()
    def predict_scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Defect probabilities, one per float [0, 1] H×W×C image."""
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
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        device=torch_device,
        decision_threshold=float(payload.get("decision_threshold", 0.5)),
        metrics=dict(payload.get("metrics") or {}),
        image_hashes=list(payload.get("image_hashes") or []),
        good_prior=_load_prior(payload.get("good_prior"), torch_device, path),
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
) -> Generator[Progress, None, TrainResult]:
    """Train on `samples` [(image path, good|defect, sha256)]; write the best epoch to checkpoint_path.

    The validation images are `validation_keys` (hashes) when given, else a seeded stratified split
    (`validation_split`). `evaluation` samples (a benchmark's test split) are only scored at the end,
    into the result's metrics as test_*; they never influence training or model choice.
    """
    checkpoint_path = Path(checkpoint_path)
    check_two_classes([label for _, label, _ in samples])
    torch_device = select_device(device)
    with torch_threads(config.threads):
        result = yield from _train(samples, config, checkpoint_path, cancel, torch_device, validation_keys, evaluation)
    return result


def _train(
    samples: Sequence[Sample],
    config: ClassifierConfig,
    checkpoint_path: Path,
    cancel: CancelToken,
    device: torch.device,
    validation_keys: Iterable[str] | None,
    evaluation: Sequence[Sample],
) -> Generator[Progress, None, TrainResult]:
    started = time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    preprocessing = Preprocessing(config.input_size, config.channels, config.normalisation)
    keys_and_labels = [(sha, label) for _, label, sha in samples]
    held_out = set(validation_keys) if validation_keys is not None else validation_split(keys_and_labels, config.val_fraction, config.seed)
    train_samples = [s for s in samples if s[2] not in held_out]
    val_samples = [s for s in samples if s[2] in held_out]
    check_two_classes([label for _, label, _ in train_samples], what="training (after holding out the validation images)")
    if not val_samples:
        raise DataError("too few tagged images to hold out a validation set; tag at least two images of each class.")

    all_paths = [s[0] for s in (*train_samples, *val_samples, *evaluation)]
    loading = EtaClock(len(all_paths))
    yield Progress("load", 0, len(all_paths), f"device: {describe_device(device)}; preparing {len(all_paths)} images")
    size = preprocessing.input_size
    cache = torch.empty((len(all_paths), preprocessing.channels, size, size), dtype=torch.float16)
    for index, path in enumerate(all_paths):
        cancel.raise_if_cancelled()
        cache[index] = torch.from_numpy(preprocessing.prepare_array(read_image(path))[0])
        if (index + 1) % 25 == 0 or index + 1 == len(all_paths):
            yield loading.progress("load", index + 1, f"device: {describe_device(device)}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_classifier(config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Frozen stages give the same output every epoch: compute it once and train the rest on it.
    from_frozen = model.frozen_stages > 0
    if from_frozen:
        cache = yield from frozen_features_cached(model, cache, device, config, cancel)
    n_train, n_val = len(train_samples), len(val_samples)
    train_x, val_x, eval_x = cache[:n_train], cache[n_train : n_train + n_val], cache[n_train + n_val :]
    train_y = np.array([s[1] == "defect" for s in train_samples], dtype=np.int64)
    val_y = np.array([s[1] == "defect" for s in val_samples], dtype=np.int64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil((2 * max(train_y.sum(), len(train_y) - train_y.sum()) if config.balanced_sampling else len(train_y)) / config.batch_size))
    # Warm-up then cosine decay over the planned epochs; a time budget may shorten the plan after
    # each epoch, and the decay follows the new plan so the last epoch still ends at a low rate.
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
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=positive_weight)
    transform = surface_augmentation(config.augment_strength, config.rotate90)

    clock = EtaClock(config.epochs)
    best_state: dict[str, torch.Tensor] | None = None
    best_key = (-math.inf, -math.inf)
    best_epoch, best_metrics, best_threshold = 0, {}, 0.5
    history: list[dict[str, float]] = []
    epochs_since_best = 0
    epoch_times: list[float] = []
    epochs_run = 0
    planned_epochs = config.epochs
    for epoch in range(1, config.epochs + 1):
        if epoch > planned_epochs:
            break
        cancel.raise_if_cancelled()
        epoch_start = time.monotonic()
        model.train()
        low_resolution = 0 < config.low_res_scale < 1 and epoch <= int(config.low_res_fraction * planned_epochs) and not from_frozen
        order = _balanced_order(train_y, generator) if config.balanced_sampling else torch.randperm(len(train_y), generator=generator).numpy()
        order = order[: steps_per_epoch * config.batch_size]
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            cancel.raise_if_cancelled()
            index = order[start : start + config.batch_size]
            if len(index) < 2:  # BatchNorm needs two images
                continue
            batch = train_x[torch.from_numpy(index)].float()
            if low_resolution:
                batch = nn.functional.interpolate(batch, scale_factor=config.low_res_scale, mode="area")
            if config.augment:
                batch = flip_features(batch, generator, config.rotate90) if from_frozen else augment_batch(batch, transform)
            batch = _to_device(batch, device, config.channels_last)
            target = torch.from_numpy(train_y[index]).float().to(device)
            with _autocast(device, config):
                logits = model.forward_from_frozen(batch) if from_frozen else model(batch)
            loss = loss_fn(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(index)
            seen += len(index)
        cancel.raise_if_cancelled()
        # Low-resolution epochs are validated at their own scale (shown, never kept as the best: the
        # saved model must be the one that works at the full input size).
        val_p = predict_cached(model, val_x, device, config, scale=config.low_res_scale if low_resolution else 1.0,
                               from_frozen=from_frozen)
        val_auroc = auroc(val_y, val_p)
        val_loss = float(nn.functional.binary_cross_entropy(torch.from_numpy(val_p).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(val_y).double()))
        threshold = choose_threshold(val_y, val_p)
        val_f1 = binary_scores(val_y, val_p > threshold).f1
        epoch_times.append(time.monotonic() - epoch_start)
        epochs_run = epoch
        metrics = {"loss": total_loss / max(1, seen), "val_loss": val_loss, "val_auroc": val_auroc, "val_f1": val_f1,
                   "lr": float(scheduler.get_last_lr()[0])}
        history.append({"epoch": epoch, **metrics})
        key = (val_auroc if not math.isnan(val_auroc) else -1.0, -val_loss)
        improved = key > best_key and not low_resolution
        if improved:
            best_key, best_epoch, best_metrics, best_threshold = key, epoch, dict(metrics), threshold
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            epochs_since_best = 0
        elif not low_resolution:
            epochs_since_best += 1
        elapsed = time.monotonic() - started
        message = f"epoch {epoch}/{planned_epochs}" + (" at low resolution" if low_resolution else "") + (" (best)" if improved else "")
        yield clock.progress("train", epoch, message, metrics, kind=ProgressKind.EPOCH)
        if epoch >= config.min_epochs and epochs_since_best >= config.patience:
            break
        if config.max_train_seconds is not None:
            if elapsed > config.max_train_seconds:
                break
            # Re-plan how many epochs fit in the remaining budget, at the mean epoch time so far.
            fit = epoch + int((config.max_train_seconds - elapsed) / (np.mean(epoch_times) + 1e-9))
            planned_epochs = max(epoch + 1, min(config.epochs, fit))
            plan["total_steps"] = planned_epochs * steps_per_epoch
            plan["warmup"] = max(1, int(0.1 * plan["total_steps"]))
            clock.total = planned_epochs
            if fit <= epoch:
                break

    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # every epoch ran at low resolution (a tiny budget): keep the last state
        best_epoch, best_metrics, best_threshold = epochs_run, dict(history[-1]), 0.5
        best_metrics.pop("epoch", None)
    train_p = predict_cached(model, train_x, device, config, from_frozen=from_frozen)
    final_metrics = {**best_metrics, "train_auroc": auroc(train_y, train_p), "best_epoch": float(best_epoch),
                     "val_threshold": best_threshold, "train_images": float(n_train), "val_images": float(n_val)}
    test_probabilities: list[float] | None = None
    if len(evaluation):
        eval_y = np.array([s[1] == "defect" for s in evaluation], dtype=np.int64)
        eval_p = predict_cached(model, eval_x, device, config, from_frozen=from_frozen)
        scores = binary_scores(eval_y, eval_p > best_threshold)
        final_metrics.update({"test_auroc": auroc(eval_y, eval_p), "test_f1": scores.f1, "test_accuracy": scores.accuracy,
                              "test_precision": scores.precision, "test_recall": scores.recall})
        test_probabilities = eval_p.tolist()
    cancel.raise_if_cancelled()
    yield Progress("prior", 0, 1, "memory bank of the good images' features")
    good = torch.from_numpy(np.concatenate([train_y, val_y]) == 0)
    good_prior = build_prior_from_features(model, torch.cat([train_x, val_x])[good], device, config)
    cancel.raise_if_cancelled()
    seen_hashes = sorted({s[2] for s in train_samples} | {s[2] for s in val_samples})
    atomic_write_bytes(
        checkpoint_path,
        checkpoint_bytes(model, config, preprocessing, best_threshold, final_metrics, seen_hashes, best_epoch, good_prior),
    )
    seconds = time.monotonic() - started
    result = TrainResult(
        checkpoint_path=checkpoint_path,
        metrics=final_metrics,
        best_epoch=best_epoch,
        epochs_run=epochs_run,
        seconds=seconds,
        seconds_per_epoch=float(np.mean(epoch_times)) if epoch_times else 0.0,
        peak_memory_mb=peak_memory_mb(device),
        device=describe_device(device),
        decision_threshold=best_threshold,
        history=history,
        train_hashes=[s[2] for s in train_samples],
        validation_hashes=[s[2] for s in val_samples],
        test_probabilities=test_probabilities,
    )
    yield Progress("done", epochs_run, config.epochs, f"saved {checkpoint_path.name}", final_metrics,
                   kind=ProgressKind.RESULT)
    return result


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


def project_validation_seed(project: Any, default: int) -> int:
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


def train_project_classifier_job(
    project: Any, config: ClassifierConfig, cancel: CancelToken, device: str = "auto"
) -> Generator[Progress, None, TrainResult]:
    """Train on the project's tagged images; record the run; a cancelled run leaves the project as it was."""
    records = [r for r in project.images() if r.tag in LABELS]
    check_two_classes([r.tag for r in records])
    config = fit_input_size(config, max(max(r.height, r.width) for r in records))
    samples = [(Path(r.path), r.tag, r.sha256) for r in records]
    seed = project_validation_seed(project, config.seed)
    held_out = validation_split([(r.sha256, r.tag) for r in records], config.val_fraction, seed)
    checkpoint_path = _next_checkpoint_path(Path(project.models_dir))
    result = yield from train_classifier_job(samples, config, checkpoint_path, cancel, device, validation_keys=held_out)
    project.record_training_run(
        kind="classifier",
        config={**config.to_dict(), "validation_seed": seed},
        seed=config.seed,
        metrics={**result.metrics, "seconds": result.seconds, "seconds_per_epoch": result.seconds_per_epoch,
                 "epochs_run": result.epochs_run, "history": result.history},
        checkpoint_path=checkpoint_path,
        dataset_hashes=sorted(result.train_hashes + result.validation_hashes),
    )
    return result
