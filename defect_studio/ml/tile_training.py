"""Training the classifier on tiles: multiple-instance learning from image-level tags (issue 15).

Letterboxed whole into the network's input, a 25 MP image loses a 3 px pit. Cut into tiles of the
input size at native resolution (`classifier_tile_grid`, the same tiles the tiled CAMs cut), each tile
reaches the network unshrunk. The tags stay per image, so an image is a bag of tiles: a defect image
has at least one defect tile, a good image's tiles are all good. Each epoch (after Campanella et al.,
Nature Medicine 2019, which is cheap on a CPU: one gradient-free pass, then a few instances per image):

1. every training tile is scored without gradients;
2. each defect image's `mil_top_k` highest-ranked tiles are trained as defect; each good image's
   `mil_top_k` highest (its hard negatives) and RANDOM_NEGATIVES times as many others at random as good;
3. the network trains on those instances with the usual class-balanced sampler and augmentation.

A defect image's tiles are ranked by the network's score blended with their novelty, how unlike every
good tile they look (`good_tile_novelty`), whose weight is 1 for the first half of the planned epochs and
then falls to 0. Ranked by the untrained network's scores alone, the first "defect" tiles are arbitrary,
and with few images the network learns those by heart and never finds the defects (on the synthetic
pits of tests/test_tile_training.py: training AUROC 1, the pits ranked at chance). The good images'
tiles are known good, so a tile unlike all of them is the likeliest defect before the network knows
anything: there the pits ranked in the top two of 7 of 8 images.

An image's probability is its largest tile's (`bag_probability`): validation (AUROC, F1, the threshold),
`predict_scores` and the tiled CAMs' tile weights all score an image that way. An image the tiling
keeps whole (an "auto" image below one segmenter tile of pixels, one no larger than a tile) is a bag of
one instance, its letterboxed self.

Memory: an instance is kept as its prepared network input quantised to 8 bits, with its own offset and
step (one byte per input pixel: about 1.8 bytes per image pixel at a quarter-tile overlap), never as
float; each batch is turned back into floats when it is used. A frozen backbone's features are not
cached here (they would be larger than the tiles): the frozen stages run in every pass.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generator, Iterable, Iterator, Sequence

import numpy as np
import torch

from defect_studio.errors import DataError
from defect_studio.imageio import read_image
from defect_studio.jobs import CancelToken, EtaClock, Progress, ProgressKind
from defect_studio.ml.classifier_options import ClassifierConfig, classifier_tile_grid
from defect_studio.ml.device import describe_device, peak_memory_mb
from defect_studio.ml.distributed import Ranks
from defect_studio.ml.metrics import auroc, binary_scores
from defect_studio.ml.models import DefectClassifier, build_classifier
from defect_studio.ml.preprocess import Preprocessing
from defect_studio.ml.tiling import Tiling

if TYPE_CHECKING:
    from defect_studio.ml.classifier import TrainResult

# Each good image gives this many times `mil_top_k` random tiles besides its hard negatives: good texture is
# plentiful and cheap to learn from, and the balanced sampler repeats the defect tiles to match.
RANDOM_NEGATIVES = 3
PRIOR_TILES = 2048  # good tiles whose features feed the good-image prior (its candidates are capped anyway)
NOVELTY_BANK = 512  # good locations kept (a k-centre coreset) to measure the novelty against
NOVELTY_CANDIDATES = 16384  # good locations the coreset is chosen from
SCORING_CHUNK_BYTES = 128 * 2**20  # float tiles made from the 8-bit store at a time


def bag_probability(tile_probabilities: np.ndarray) -> float:
    """An image's defect probability from its tiles': the largest (an image is defect when some tile is)."""
    return float(np.max(tile_probabilities))


class InstanceStore:
    """Every image's instances (its tiles, or itself) as prepared network inputs quantised to 8 bits.

    Indexing (a slice, or an index array) gives float32 inputs, so the classifier's batch loops take it
    as they take a float16 cache. Bag b holds the instances `starts[b]:starts[b + 1]`."""

    def __init__(self, pixels: torch.Tensor, offsets: torch.Tensor, steps: torch.Tensor, starts: np.ndarray) -> None:
        self.pixels, self.offsets, self.steps, self.starts = pixels, offsets, steps, starts

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: slice | np.ndarray | torch.Tensor) -> torch.Tensor:
        scale = self.steps[index].view(-1, 1, 1, 1)
        return self.pixels[index].float() * scale + self.offsets[index].view(-1, 1, 1, 1)

    def bag_probabilities(self, instance_probabilities: np.ndarray) -> np.ndarray:
        """Each bag's probability (`bag_probability`) from its instances'."""
        return np.maximum.reduceat(np.asarray(instance_probabilities), self.starts[:-1]).astype(np.float32)


def quantise(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A prepared input as uint8 with its offset and step (the rounding error is at most step / 2)."""
    low, high = float(array.min()), float(array.max())
    step = (high - low) / 255.0 if high > low else 1.0
    return np.rint((array - low) / step).astype(np.uint8), low, step


def cut_into_bags(
    paths: Sequence[Path], preprocessing: Preprocessing, tiling: Tiling, cancel: CancelToken, device: torch.device,
    ranks: Ranks | None = None,
) -> Generator[Progress, None, tuple[InstanceStore, int]]:
    """Each image decoded once and cut as the tiling says, its instances prepared and quantised; returns
    the store and how many images were cut into more than one tile. With `ranks`, each rank decodes and cuts
    its shard of the images (`Ranks.shard`) and receives the other bags from their owners: every rank ends
    with the whole store."""
    ranks = ranks or Ranks.single()
    mine = set(ranks.shard(len(paths)))
    loading = EtaClock(len(paths))
    bags: dict[int, list[torch.Tensor]] = {}  # image -> [its uint8 instances, their offsets, their steps]
    instances = 0
    for number, path in enumerate(paths, 1):
        cancel.raise_if_cancelled()
        if number - 1 in mine:
            image = read_image(path)
            grid = classifier_tile_grid(tiling, image.shape[0], image.shape[1])
            pieces = [image] if grid is None else [image[box.slices] for box in grid.boxes()]
            prepared = [quantise(preprocessing.prepare_array(piece)[0]) for piece in pieces]
            bags[number - 1] = [torch.from_numpy(np.stack([quantised for quantised, _, _ in prepared])),
                                torch.tensor([low for _, low, _ in prepared], dtype=torch.float32),
                                torch.tensor([step for _, _, step in prepared], dtype=torch.float32)]
            instances += len(prepared)
            del image, pieces, prepared
        if number % 5 == 0 or number == len(paths):
            yield loading.progress("load", number, f"cut into {instances} tiles; device: {describe_device(device)}")
    bags.update(ranks.share_tensor_lists(bags, [i for i in range(len(paths)) if i not in mine], len(paths)))
    ordered = [bags.pop(index) for index in range(len(paths))]
    starts = np.cumsum([0] + [len(bag[0]) for bag in ordered]).astype(np.int64)
    if not ordered:
        empty = torch.zeros(0, dtype=torch.float32)
        return InstanceStore(torch.zeros((0, preprocessing.channels, 1, 1), dtype=torch.uint8), empty, empty, starts), 0
    store = InstanceStore(torch.cat([bag[0] for bag in ordered]), torch.cat([bag[1] for bag in ordered]),
                          torch.cat([bag[2] for bag in ordered]), starts)
    # an image the tiling cuts is larger than one tile, so it has two tiles or more; one left whole has one instance
    return store, sum(len(bag[0]) > 1 for bag in ordered)


@torch.no_grad()
def good_tile_novelty(model: DefectClassifier, store: InstanceStore, labels: np.ndarray, device: torch.device,
                      config: ClassifierConfig, cancel: CancelToken, batch_size: int = 64,
                      ranks: Ranks | None = None) -> np.ndarray:
    """Each instance's novelty: its most unusual first-stage location's distance to the nearest location of
    the good images' tiles (PatchCore's measure, against a k-centre coreset), in the network as it is. The
    first stage: a small defect is most unlike good texture in the finest features, and even random
    convolutions there tell a dark pit from grain. With `ranks`, every rank builds the same (bounded) bank and
    scores its share of the instances; all get every instance's novelty."""
    from defect_studio.ml.classifier import _to_device
    from defect_studio.ml.good_prior import greedy_coreset, local_features, nearest_distances

    ranks = ranks or Ranks.single()
    model.eval()

    def locations(index: slice | np.ndarray) -> torch.Tensor:  # batch × cells × channels
        batch = _to_device(store[index], device, config.channels_last)
        features = local_features(model.stages[0](model.stem(batch)), 3).float().cpu()
        return features.flatten(2).transpose(1, 2)

    good = np.concatenate([np.arange(store.starts[b], store.starts[b + 1]) for b in np.flatnonzero(labels == 0)])
    generator = torch.Generator().manual_seed(config.seed)
    sampled = good[torch.randperm(len(good), generator=generator).numpy()]
    candidates, count = [], 0
    for first in range(0, len(sampled), batch_size):
        if count >= NOVELTY_CANDIDATES:
            break
        part = locations(np.sort(sampled[first : first + batch_size]))
        candidates.append(part.reshape(-1, part.shape[-1]))
        count += len(candidates[-1])
    pool = torch.cat(candidates)[:NOVELTY_CANDIDATES]
    bank = pool[greedy_coreset(pool, NOVELTY_BANK, config.seed)]
    mine = np.asarray(ranks.shard(len(store)), dtype=np.int64)
    longest_share = -(-len(store) // ranks.world_size)  # every rank runs as many batches (each checks for a cancel)
    novelty = np.zeros(len(mine), np.float32)
    for first in range(0, longest_share, batch_size):
        ranks.raise_if_cancelled(cancel)
        indices = mine[first : first + batch_size]
        if not len(indices):
            continue
        part = locations(indices)
        distances = nearest_distances(part.reshape(-1, part.shape[-1]), bank).view(len(part), -1)
        novelty[first : first + len(part)] = distances.max(dim=1).values.numpy()
    return ranks.gather_rows(torch.from_numpy(novelty), len(store)).numpy()


def select_instances(
    probabilities: np.ndarray, starts: np.ndarray, labels: np.ndarray, top_k: int, generator: torch.Generator,
    novelty: np.ndarray | None = None, novelty_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(instance indices, their 0/1 targets) to train on this epoch: each defect bag's `top_k` highest
    ranked tiles (by probability, blended with `novelty` by `novelty_weight`, ranks within the bag) as defect; each good bag's `top_k` highest (hard negatives) and RANDOM_NEGATIVES * `top_k` others at
    random as good.
    How many each bag gives depends only on its size, so every epoch has as many steps."""
    chosen: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for bag, label in enumerate(labels):
        first, end = int(starts[bag]), int(starts[bag + 1])
        ranking = probabilities[first:end]
        if label == 1 and novelty is not None and novelty_weight > 0:
            ranking = (1.0 - novelty_weight) * _ranks(ranking) + novelty_weight * _ranks(novelty[first:end])
        ranked = first + np.argsort(-ranking, kind="stable")
        picks = ranked[:top_k]
        if label == 0 and len(ranked) > top_k:
            others = ranked[top_k:]
            drawn = torch.randperm(len(others), generator=generator)[: RANDOM_NEGATIVES * top_k].numpy()
            picks = np.concatenate([picks, others[drawn]])
        chosen.append(picks)
        targets.append(np.full(len(picks), int(label), np.int64))
    return np.concatenate(chosen), np.concatenate(targets)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank among `values`, scaled to [0, 1] (so scores of any scale blend)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values)) / max(1, len(values) - 1)
    return ranks


def novelty_weight(epoch: int, planned_epochs: int) -> float:
    """The novelty's share of a defect tile's rank: 1 for the first half of the plan (the network needs
    that long to learn the defects it shows), then falling to 0 at its end."""
    half = planned_epochs / 2
    return float(min(1.0, max(0.0, (planned_epochs - epoch) / max(1.0, half))))


class SelectedInstances:
    """This epoch's chosen instances, indexable by position as the training loop indexes its inputs."""

    def __init__(self, store: InstanceStore, chosen: np.ndarray) -> None:
        self.store, self.chosen = store, torch.from_numpy(chosen)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.store[self.chosen[index]]


@dataclass
class _Bags:
    """The training, validation and evaluation images as bags of quantised instances."""

    train_samples: list
    val_samples: list
    train: InstanceStore
    val: InstanceStore
    evaluation: InstanceStore | None
    train_y: np.ndarray
    val_y: np.ndarray
    tiled_images: int


def _bag_probabilities(model: DefectClassifier, store: InstanceStore, device: torch.device, config: ClassifierConfig,
                       cancel: CancelToken, ranks: Ranks) -> tuple[np.ndarray, np.ndarray]:
    """(every instance's probability, every bag's), on every rank: each rank scores its share of the
    instances (`ranks.shard`), a float chunk of at most SCORING_CHUNK_BYTES at a time, and the shares are
    gathered."""
    from defect_studio.ml.classifier import predict_cached

    tile_bytes = 4 * store.pixels[0].numel() if len(store) else 1
    chunk = 64 * max(1, SCORING_CHUNK_BYTES // (64 * tile_bytes))  # whole batches of predict_cached's 64
    mine = np.asarray(ranks.shard(len(store)), dtype=np.int64)
    longest_share = -(-len(store) // ranks.world_size)  # every rank runs as many chunks (each one checks for a cancel)
    parts = []
    for start in range(0, longest_share, chunk):
        ranks.raise_if_cancelled(cancel)  # a pass over every tile of a large project takes minutes
        indices = mine[start : start + chunk]
        if len(indices):
            parts.append(predict_cached(model, store[indices], device, config))
    local = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    instance = ranks.gather_rows(torch.from_numpy(local), len(store)).numpy()
    return instance, store.bag_probabilities(instance)


def _validate(model: DefectClassifier, bags: _Bags, config: ClassifierConfig, device: torch.device, cancel: CancelToken,
              ranks: Ranks) -> tuple[dict[str, float], float]:
    from defect_studio.ml.classifier import choose_threshold

    _, val_p = _bag_probabilities(model, bags.val, device, config, cancel, ranks)
    val_loss = float(torch.nn.functional.binary_cross_entropy(
        torch.from_numpy(val_p).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(bags.val_y).double()))
    threshold = choose_threshold(bags.val_y, val_p)
    return {"val_loss": val_loss, "val_auroc": auroc(bags.val_y, val_p),
            "val_f1": binary_scores(bags.val_y, val_p > threshold).f1}, threshold


def _prepare_bags(
    samples: Sequence, config: ClassifierConfig, preprocessing: Preprocessing, tiling: Tiling, cancel: CancelToken,
    device: torch.device, validation_keys: Iterable[str] | None, evaluation: Sequence, ranks: Ranks,
) -> Generator[Progress, None, _Bags]:
    from defect_studio.ml.classifier import _split_samples

    train_samples, val_samples = _split_samples(samples, config, validation_keys)
    everything = [s[0] for s in (*train_samples, *val_samples, *evaluation)]
    yield Progress("load", 0, len(everything), f"device: {describe_device(device)}; cutting {len(everything)} images "
                   f"into tiles of {tiling.tile_size} px")
    stores = []
    tiled_total = 0  # images cut into tiles
    for group in (train_samples, val_samples, evaluation):
        store, tiled = yield from cut_into_bags([s[0] for s in group], preprocessing, tiling, cancel, device, ranks)
        stores.append(store)
        tiled_total += tiled
    if tiling.mode == "tiles" and not tiled_total:
        raise DataError(f"the tile size ({tiling.tile_size} px) is not smaller than any image, so no image would be "
                        "cut into tiles: choose smaller tiles or tiling 'whole'.")
    return _Bags(train_samples, val_samples, stores[0], stores[1], stores[2] if len(evaluation) else None,
                 np.array([s[1] == "defect" for s in train_samples], dtype=np.int64),
                 np.array([s[1] == "defect" for s in val_samples], dtype=np.int64), tiled_total)


def train_by_tiles(
    samples: Sequence, config: ClassifierConfig, checkpoint_path: Path, cancel: CancelToken, device: torch.device,
    validation_keys: Iterable[str] | None, evaluation: Sequence, ranks: Ranks,
) -> Generator[Progress, None, TrainResult]:
    """The classifier's training job (`train_classifier_job`) when its tiling cuts images: the same epochs,
    budget, early stopping, best-epoch checkpoint and result, over bags of tiles (module docstring).

    On several processes each rank cuts its share of the images into bags and receives the others' (every
    rank holds every bag), each computes the novelty of its share of the tiles against the same bank, the
    ranks share the scoring of the tiles (each scores every world_size-th tile, all get all the scores, so all
    select the same instances), each trains on its part of every global batch under DistributedDataParallel
    as the whole-image training does, and rank 0 alone writes the checkpoint."""
    from defect_studio.ml import classifier as whole

    started = time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tiling = config.image_tiling()
    assert tiling is not None
    preprocessing = Preprocessing(config.input_size, config.channels, config.normalisation)
    bags = yield from _prepare_bags(samples, config, preprocessing, tiling, cancel, device, validation_keys, evaluation,
                                    ranks)
    if not bags.tiled_images:  # "auto" cut no image: train whole, exactly as before tiles, and record it so
        del bags
        whole_config = dataclasses.replace(config, tiling="whole")
        return (yield from whole._train(samples, whole_config, checkpoint_path, cancel, device, validation_keys, evaluation, ranks))
    torch.manual_seed(config.seed)
    model = build_classifier(config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ranks.distributed:
        torch.manual_seed(config.seed + ranks.rank)  # image augmentation: each rank draws for its own part
    yield Progress("novelty", 0, 1, "how unlike the good images' tiles each tile looks")
    novelty = good_tile_novelty(model, bags.train, bags.train_y, device, config, cancel, ranks=ranks)
    generator = torch.Generator().manual_seed(config.seed)
    _, first_targets = select_instances(np.zeros(len(bags.train), np.float32), bags.train.starts, bags.train_y,
                                        config.mil_top_k, torch.Generator())
    optimisation = whole._make_optimisation(model, config, first_targets, device)
    step_model = whole._step_model(model, False, device, ranks)

    loop = whole._EpochLoop(config, optimisation, ranks, started)
    for epoch in loop.epochs():
        ranks.raise_if_cancelled(cancel)
        epoch_start = time.monotonic()
        tile_p, _ = _bag_probabilities(model, bags.train, device, config, cancel, ranks)
        chosen, targets = select_instances(tile_p, bags.train.starts, bags.train_y, config.mil_top_k, generator,
                                           novelty, novelty_weight(epoch, loop.planned_epochs))
        ranks.raise_if_cancelled(cancel)
        epoch_data = whole._TrainingData(bags.train_samples, bags.val_samples, SelectedInstances(bags.train, chosen),  # type: ignore[arg-type]
                                         torch.zeros(0), torch.zeros(0), targets, bags.val_y, from_frozen=False)
        step_model.train()
        order = whole._epoch_order(targets, config, optimisation.steps_per_epoch, generator)
        train_loss = whole._run_epoch(step_model, epoch_data, config, optimisation, order, generator, False, cancel, device, ranks)
        ranks.raise_if_cancelled(cancel)
        ranks.share_buffers_of_rank0(model)
        val_metrics, threshold = _validate(model, bags, config, device, cancel, ranks)
        yield loop.end_epoch(epoch, epoch_start, train_loss, val_metrics, threshold, model, False, " by tiles")

    best, epochs_run = loop.best, loop.epochs_run
    assert best.state is not None  # every epoch runs at full resolution, and the first is always kept
    model.load_state_dict(best.state)
    final_metrics, test_probabilities = _final_metrics(model, bags, evaluation, config, device, best, cancel, ranks)
    ranks.raise_if_cancelled(cancel)
    if ranks.is_writer:
        yield from _write_checkpoint(model, bags, config, preprocessing, best, final_metrics, checkpoint_path, cancel, device)
    result = whole.TrainResult(
        checkpoint_path=checkpoint_path, metrics=final_metrics, best_epoch=best.epoch, epochs_run=epochs_run,
        seconds=time.monotonic() - started, seconds_per_epoch=loop.seconds_per_epoch,
        peak_memory_mb=peak_memory_mb(device), decision_threshold=best.threshold,
        device=describe_device(device) + (f", {ranks.world_size} processes" if ranks.distributed else ""),
        history=loop.history, train_hashes=[s[2] for s in bags.train_samples], validation_hashes=[s[2] for s in bags.val_samples],
        test_probabilities=test_probabilities,
    )
    yield Progress("done", epochs_run, config.epochs, f"saved {checkpoint_path.name}", final_metrics, kind=ProgressKind.RESULT)
    return result


def _final_metrics(model: DefectClassifier, bags: _Bags, evaluation: Sequence, config: ClassifierConfig,  # type: ignore[no-untyped-def]
                   device: torch.device, best, cancel: CancelToken, ranks: Ranks) -> tuple[dict[str, float], list[float] | None]:
    _, train_p = _bag_probabilities(model, bags.train, device, config, cancel, ranks)
    final = {**best.metrics, "train_auroc": auroc(bags.train_y, train_p), "best_epoch": float(best.epoch),
             "val_threshold": best.threshold, "train_images": float(len(bags.train_samples)),
             "val_images": float(len(bags.val_samples)), "train_tiles": float(len(bags.train))}
    if bags.evaluation is None:
        return final, None
    eval_y = np.array([s[1] == "defect" for s in evaluation], dtype=np.int64)
    _, eval_p = _bag_probabilities(model, bags.evaluation, device, config, cancel, ranks)
    scores = binary_scores(eval_y, eval_p > best.threshold)
    final.update({"test_auroc": auroc(eval_y, eval_p), "test_f1": scores.f1, "test_accuracy": scores.accuracy,
                  "test_precision": scores.precision, "test_recall": scores.recall})
    return final, eval_p.tolist()


def _good_tiles(bags: _Bags, seed: int) -> Iterator[torch.Tensor]:
    """Up to PRIOR_TILES tiles of the good training and validation images, in batches of float inputs."""
    good = [(store, np.arange(store.starts[bag], store.starts[bag + 1]))
            for store, labels in ((bags.train, bags.train_y), (bags.val, bags.val_y)) for bag in np.flatnonzero(labels == 0)]
    which = np.concatenate([np.full(len(tiles), number) for number, (_, tiles) in enumerate(good)])
    tiles = np.concatenate([tiles for _, tiles in good])
    keep = np.arange(len(tiles))
    if len(keep) > PRIOR_TILES:
        keep = np.sort(torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:PRIOR_TILES].numpy())
    for start in range(0, len(keep), 32):
        part = keep[start : start + 32]
        yield torch.cat([good[which[i]][0][torch.tensor([tiles[i]])] for i in part])


def _write_checkpoint(model: DefectClassifier, bags: _Bags, config: ClassifierConfig, preprocessing: Preprocessing, best,  # type: ignore[no-untyped-def]
                      final_metrics: dict[str, float], checkpoint_path: Path, cancel: CancelToken, device: torch.device,
                      ) -> Generator[Progress, None, None]:
    """The good-image prior from good tiles' features (the tiles the CAMs will compare), then the checkpoint."""
    from defect_studio.atomic import atomic_write_bytes
    from defect_studio.ml.classifier import _to_device, build_prior_from_features, checkpoint_bytes

    yield Progress("prior", 0, 1, "memory bank of the good tiles' features")
    features = []
    model.eval()
    with torch.no_grad():
        for tiles in _good_tiles(bags, config.seed):
            cancel.raise_if_cancelled()
            batch = _to_device(tiles, device, config.channels_last)
            features.append(model.frozen_features(batch).to("cpu", torch.float16))
    good_prior = build_prior_from_features(model, torch.cat(features), device, config)
    cancel.raise_if_cancelled()
    seen = sorted({s[2] for s in bags.train_samples} | {s[2] for s in bags.val_samples})
    atomic_write_bytes(checkpoint_path, checkpoint_bytes(model, config, preprocessing, best.threshold, final_metrics,
                                                         seen, best.epoch, good_prior))
