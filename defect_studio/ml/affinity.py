"""The affinity walk: a CAM spread over what the classifier's own features say belongs together.

AffinityNet (Ahn & Kwak, CVPR 2018), adapted: a small head over the classifier's stride 4, 8 and 16
features learns an embedding from pairs of locations within `radius` cells of each other on the
stride-8 grid, labelled by the CAM where it is confident (at least `high`: defect; at most `low`:
background; every location of a good image: background). Pairs of one label are pulled together,
pairs of two labels pushed apart. At inference the CAM, on that grid, takes `steps` steps of a random
walk whose transition probabilities are the affinities exp(-mean |e_p - e_q|) to the power `beta`:
defect evidence spreads over the surface that looks like it and stops where the surface changes.

The head trains at the end of the classifier's training, from that classifier's CAMs (FGBP by
default), and is stored in its checkpoint; the "affinity-walk" CAM method needs it. Measured on MT
(docs/method-notes.md section 13): round-0 proposals 0.254 -> 0.277 (seed 0) with the round's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Sequence

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from defect_studio.errors import ModelError
from defect_studio.jobs import CancelToken, EtaClock, Progress
from defect_studio.ml.cams.compute import (
    CamComputation,
    _no_stage_map,
    capture_stage_outputs,
    compute_cams,
    eval_mode,
    minmax,
)
from defect_studio.ml.cams.registry import CamSpec
from defect_studio.ml.cams.settings import CamSettingsError

AFFINITY_STAGES = (1, 2, 3)  # 1-based stages the head reads: stride 4, 8 and 16
GRID_STAGE = 2  # the walk runs on this stage's grid (stride 8)
UNKNOWN = 255  # a grid cell whose CAM is neither confidently defect nor background: in no training pair
MIN_GOOD_IMAGES = 64
BASE_METHOD = "fgbp"  # the CAM the head learns from and the walk spreads (the method `bench full` picks on MT)


@dataclass(frozen=True)
class AffinitySettings:
    """How the head trains (measured on MT with bench-results' probe: section 13 of the method notes)."""

    high: float = 0.45  # CAM at least this on the grid: a defect cell
    low: float = 0.1  # CAM at most this: a background cell
    radius: int = 5  # cells: the pairs trained and the walk's neighbourhood
    epochs: int = 8
    width: int = 64  # channels of each stage's branch
    embedding: int = 128
    learning_rate: float = 2e-3
    batch_size: int = 16
    max_images: int = 400  # of each tag, evenly spaced: bounds the time and memory of large projects
    seed: int = 0
    base: dict[str, Any] = field(default_factory=lambda: CamSpec.resolve(BASE_METHOD).to_record())


class AffinityHead(nn.Module):
    """1×1 branches per stage (conv, GroupNorm, ReLU), upsampled to the grid stage and mixed into one embedding."""

    def __init__(self, channels: Sequence[int], width: int, embedding: int, grid_index: int) -> None:
        super().__init__()
        self.grid_index = grid_index
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.GroupNorm(4, width), nn.ReLU()) for c in channels)
        self.mix = nn.Conv2d(width * len(channels), embedding, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[self.grid_index].shape[-2:]
        parts = []
        for branch, stage_features in zip(self.branches, features):
            part = branch(stage_features.float())
            if part.shape[-2:] != size:
                part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
            parts.append(part)
        return self.mix(torch.cat(parts, 1))


@dataclass
class AffinityModel:
    """A trained head with what it was trained on (kept in the classifier's checkpoint)."""

    head: AffinityHead
    channels: list[int]
    settings: AffinitySettings

    @property
    def base(self) -> CamSpec:
        spec = CamSpec.from_record(self.settings.base)
        assert spec is not None
        return spec

    def to_payload(self) -> dict[str, Any]:
        settings = {name: getattr(self.settings, name) for name in AffinitySettings.__dataclass_fields__}
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.head.state_dict().items()}
        return {"state_dict": state, "channels": list(self.channels), "settings": settings}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], device: torch.device | str = "cpu") -> "AffinityModel":
        settings = AffinitySettings(**dict(payload["settings"]))
        channels = [int(c) for c in payload["channels"]]
        head = AffinityHead(channels, settings.width, settings.embedding, AFFINITY_STAGES.index(GRID_STAGE))
        head.load_state_dict(payload["state_dict"], strict=True)
        return cls(head.to(device).eval(), channels, settings)


# ---------------------------------------------------------------------------------------------
# Maps on the walk's grid


def grid_shape(features: Sequence[torch.Tensor]) -> tuple[int, int]:
    shape = features[AFFINITY_STAGES.index(GRID_STAGE)].shape[-2:]
    return int(shape[0]), int(shape[1])


def valid_on_grid(geometry: Any, shape: tuple[int, int]) -> np.ndarray:
    """The grid cells that lie wholly on the image (not on the letterbox's padding)."""
    content = np.zeros(geometry.input_size, np.float32)
    content[geometry.content_slice()] = 1.0
    return cv2.resize(content, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) > 0.99


def map_on_grid(values: np.ndarray, geometry: Any, shape: tuple[int, int]) -> np.ndarray:
    """An original-frame map averaged onto the grid cells (0 on the padding)."""
    at_input = geometry.to_input(values, pad_value=0.0)
    return cv2.resize(at_input, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def grid_labels(cam: np.ndarray, geometry: Any, shape: tuple[int, int], high: float, low: float) -> np.ndarray:
    """uint8 grid: 1 where the CAM is confidently defect, 0 confidently background, UNKNOWN elsewhere."""
    grid = map_on_grid(cam, geometry, shape)
    valid = valid_on_grid(geometry, shape)
    labels = np.full(shape, UNKNOWN, np.uint8)
    labels[(grid <= low) & valid] = 0
    labels[(grid >= high) & valid] = 1
    return labels


def background_labels(geometry: Any, shape: tuple[int, int]) -> np.ndarray:
    """A good image: every cell on the image is background."""
    return np.where(valid_on_grid(geometry, shape), 0, UNKNOWN).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Pairs and the walk


def neighbour_offsets(radius: int, half: bool) -> list[tuple[int, int]]:
    """(dy, dx) within `radius`: one of each symmetric pair without (0, 0) when `half` (training), else all."""
    offsets = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            if half and not (dy > 0 or (dy == 0 and dx > 0)):
                continue
            offsets.append((dy, dx))
    return offsets


def _shifted(values: torch.Tensor, offsets: Sequence[tuple[int, int]], radius: int, fill: float) -> torch.Tensor:
    """(..., h, w) -> (..., P, h, w): the value at p + offset for each offset (`fill` beyond the border)."""
    height, width = values.shape[-2:]
    padded = F.pad(values, (radius, radius, radius, radius), value=fill)
    return torch.stack([padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]
                        for dy, dx in offsets], dim=-3)


def pair_affinities(embedding: torch.Tensor, offsets: Sequence[tuple[int, int]], radius: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, P, h, w): exp(-mean_c |e_p - e_(p+o)|) (0 where p + o is off the grid)."""
    height, width = embedding.shape[-2:]
    padded = F.pad(embedding, (radius, radius, radius, radius))
    # one offset at a time: 3x faster than stacking every partner into one (B, C, P, h, w) tensor
    affinity = torch.stack([
        torch.exp(-(embedding - padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width])
                  .abs().mean(dim=1))
        for dy, dx in offsets], dim=1)
    inside = _shifted(torch.ones_like(embedding[:, :1]), offsets, radius, 0.0)[:, 0]
    return affinity * inside


def affinity_loss(embedding: torch.Tensor, labels: torch.Tensor, radius: int) -> torch.Tensor:
    """AffinityNet's loss over every labelled pair within `radius`: same-label pairs (defect-defect and
    background-background, a quarter each) towards affinity 1, cross pairs (half) towards 0."""
    offsets = neighbour_offsets(radius, half=True)
    affinity = pair_affinities(embedding, offsets, radius)
    centre = labels.unsqueeze(1).expand(-1, len(offsets), -1, -1)
    partner = _shifted(labels.float(), offsets, radius, float(UNKNOWN)).long()
    known = (centre != UNKNOWN) & (partner != UNKNOWN)
    terms = (
        (known & (centre == 1) & (partner == 1), -torch.log(affinity + 1e-5), 0.25),
        (known & (centre == 0) & (partner == 0), -torch.log(affinity + 1e-5), 0.25),
        (known & (centre != partner), -torch.log(1 + 1e-5 - affinity), 0.5),
    )
    loss = embedding.new_zeros(())
    for chosen, term, weight in terms:
        if chosen.any():
            loss = loss + weight * term[chosen].mean()
    return loss


def random_walk(embedding: torch.Tensor, start: torch.Tensor, valid: torch.Tensor, radius: int, beta: float,
                steps: int) -> torch.Tensor:
    """`start` (h, w) after `steps` steps of the walk over (C, h, w) `embedding`'s affinities within `radius`.

    The transition from p to q is affinity(p, q)^beta normalised over p's neighbours on the image (p itself
    included, at affinity 1); a cell off the image (`valid` False) neither gives nor takes and keeps its value."""
    offsets = neighbour_offsets(radius, half=False)
    weights = pair_affinities(embedding[None], offsets, radius)[0].pow(beta)  # (P, h, w)
    weights = weights * _shifted(valid.float(), offsets, radius, 0.0) * valid.float()
    weights[offsets.index((0, 0))] = torch.where(valid, weights[offsets.index((0, 0))], torch.ones_like(start))
    transition = weights / weights.sum(dim=0, keepdim=True).clamp_min(1e-12)
    values = start
    for _ in range(steps):
        values = (transition * _shifted(values, offsets, radius, 0.0)).sum(dim=0)
    return values


# ---------------------------------------------------------------------------------------------
# Features, training, and the CAM method


def stage_features(classifier: Any, images: Sequence[np.ndarray]) -> tuple[list[list[torch.Tensor]], list[Any]]:
    """Each image's AFFINITY_STAGES features (float16, CPU) and its geometry: one forward pass without gradients."""
    model = classifier.model
    if hasattr(classifier, "prepare"):  # a LoadedClassifier: on its device, in its memory format
        batch, geometries = classifier.prepare(list(images))
    else:
        batch, geometries = classifier.preprocessing.prepare_batch(list(images))
        batch = batch.to(getattr(classifier, "device", "cpu"))
    with eval_mode(model), torch.no_grad(), capture_stage_outputs(model, [s - 1 for s in AFFINITY_STAGES]) as captured:
        model(batch)
        per_stage = [captured[s - 1].to("cpu", torch.float16) for s in AFFINITY_STAGES]
    return [[stage[index].clone() for stage in per_stage] for index in range(len(images))], geometries


def _evenly(paths: Sequence[Path], limit: int) -> list[Path]:
    if len(paths) <= limit:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]


def collect_examples(
    classifier: Any, defect_paths: Sequence[Path], good_paths: Sequence[Path], settings: AffinitySettings,
    cancel: CancelToken, batch_size: int = 8,
) -> Generator[Progress, None, tuple[list[list[torch.Tensor]], list[np.ndarray]]]:
    """(features, grid labels) of the defect images (labelled by the base CAM) and the good images (background)."""
    from defect_studio.imageio import read_image

    base = CamSpec.from_record(settings.base)
    defects = _evenly(defect_paths, settings.max_images)
    # about as many good images as defect ones (the probe's balance), but enough to show the surface's variety
    goods = _evenly(good_paths, min(settings.max_images, max(len(defects), MIN_GOOD_IMAGES)))
    chosen = [(path, True) for path in defects] + [(path, False) for path in goods]
    features: list[list[torch.Tensor]] = []
    labels: list[np.ndarray] = []
    clock = EtaClock(len(chosen))
    for start in range(0, len(chosen), batch_size):
        cancel.raise_if_cancelled()
        part = chosen[start : start + batch_size]
        images = [read_image(path) for path, _ in part]
        feats, geometries = stage_features(classifier, images)
        defects = [index for index, (_, is_defect) in enumerate(part) if is_defect]
        cams = dict(zip(defects, compute_cams(classifier, [images[i] for i in defects], base))) if defects else {}
        for index, geometry in enumerate(geometries):
            shape = grid_shape(feats[index])
            labels.append(grid_labels(cams[index], geometry, shape, settings.high, settings.low) if index in cams
                          else background_labels(geometry, shape))
        features += feats
        yield clock.progress("affinity", min(len(chosen), start + batch_size),
                             "affinity head: the classifier's CAMs and features")
    return features, labels


def train_head(
    features: Sequence[Sequence[torch.Tensor]], labels: Sequence[np.ndarray], settings: AffinitySettings,
    cancel: CancelToken, device: torch.device | str = "cpu",
) -> Generator[Progress, None, AffinityModel]:
    """The head trained on the examples (batches of images with equal grids)."""
    if not features:
        raise ModelError("the affinity head has no images to learn from.")
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    channels = [int(f.shape[0]) for f in features[0]]
    head = AffinityHead(channels, settings.width, settings.embedding, AFFINITY_STAGES.index(GRID_STAGE)).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    by_shape: dict[tuple, list[int]] = {}
    for index, feats in enumerate(features):
        by_shape.setdefault(tuple(tuple(f.shape) for f in feats), []).append(index)
    clock = EtaClock(settings.epochs)
    head.train()
    for epoch in range(settings.epochs):
        total, batches = 0.0, 0
        for group in by_shape.values():
            order = [group[int(i)] for i in torch.randperm(len(group), generator=generator)]
            for start in range(0, len(order), settings.batch_size):
                cancel.raise_if_cancelled()
                chosen = order[start : start + settings.batch_size]
                batch = [torch.stack([features[i][s] for i in chosen]).to(device) for s in range(len(channels))]
                target = torch.from_numpy(np.stack([labels[i] for i in chosen])).long().to(device)
                loss = affinity_loss(head(batch), target, settings.radius)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, batches = total + float(loss.detach()), batches + 1
        yield clock.progress("affinity", epoch + 1, f"affinity head: epoch {epoch + 1}/{settings.epochs}, "
                             f"loss {total / max(1, batches):.4f}", {"affinity_loss": total / max(1, batches)})
    return AffinityModel(head.eval(), channels, settings)


def train_affinity(
    classifier: Any, defect_paths: Sequence[Path], good_paths: Sequence[Path], cancel: CancelToken,
    settings: AffinitySettings | None = None,
) -> Generator[Progress, None, AffinityModel | None]:
    """The affinity head of a trained classifier (None without a defect image to learn from)."""
    settings = settings or AffinitySettings()
    if not defect_paths or settings.epochs <= 0:
        return None
    features, labels = yield from collect_examples(classifier, defect_paths, good_paths, settings, cancel)
    return (yield from train_head(features, labels, settings, cancel, getattr(classifier, "device", "cpu")))


def walk_cams(classifier: Any, images: Sequence[np.ndarray], spec: CamSpec, batch_size: int) -> list[np.ndarray]:
    """The "affinity-walk" maps: the head's base CAM walked over the head's affinities, at original resolution."""
    affinity: AffinityModel | None = getattr(classifier, "affinity", None)
    if affinity is None:
        raise CamSettingsError("the affinity walk needs the affinity head that classifier training now adds to its "
                               "checkpoint; this classifier has none (trained before it existed, or on tiles): "
                               "train the classifier again.")
    device = next(affinity.head.parameters()).device
    results: list[np.ndarray] = []
    for start in range(0, len(images), max(1, batch_size)):
        chunk = list(images[start : start + max(1, batch_size)])
        cams = compute_cams(classifier, chunk, affinity.base, batch_size=len(chunk))
        feats, geometries = stage_features(classifier, chunk)
        for cam, image_features, geometry in zip(cams, feats, geometries):
            shape = grid_shape(image_features)
            with torch.no_grad():
                embedding = affinity.head([f[None].to(device) for f in image_features])[0]
                start_values = torch.from_numpy(map_on_grid(cam, geometry, shape)).to(device)
                valid = torch.from_numpy(valid_on_grid(geometry, shape)).to(device)
                walked = random_walk(embedding, start_values, valid, affinity.settings.radius,
                                     spec.settings["beta"], spec.settings["steps"]).cpu().numpy()
            at_input = cv2.resize(walked, (geometry.input_size[1], geometry.input_size[0]), interpolation=cv2.INTER_LINEAR)
            results.append(minmax(geometry.to_original(at_input)))
    return results


AFFINITY_WALK = CamComputation(lambda s: [], _no_stage_map, lambda maps, s: None, maps=walk_cams)



def add_affinity_head(
    checkpoint_path: Path, out_path: Path, defect_paths: Sequence[Path], good_paths: Sequence[Path], cancel: CancelToken,
    settings: AffinitySettings | None = None, device: str = "cpu",
) -> Generator[Progress, None, Path]:
    """A copy of a classifier checkpoint with an affinity head trained for it (classifiers from before the head;
    a classifier trains its own head now). The original is left as it is; the copy is written atomically."""
    import io

    from defect_studio.atomic import atomic_write_bytes
    from defect_studio.ml.classifier import load_classifier

    classifier = load_classifier(checkpoint_path, device)
    settings = settings or AffinitySettings(seed=int(classifier.config.seed))
    affinity = yield from train_affinity(classifier, defect_paths, good_paths, cancel, settings)
    if affinity is None:
        raise ModelError("the affinity head needs at least one defect-tagged image.")
    payload = torch.load(io.BytesIO(Path(checkpoint_path).read_bytes()), map_location="cpu", weights_only=True)
    payload["affinity"] = affinity.to_payload()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(out_path), buffer.getvalue())
    return Path(out_path)
