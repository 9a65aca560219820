"""Refinement rounds: proposals -> (review) -> segmenter training, until the masks stop changing.

Round k's proposals come from the CAM (k = 0) or from segmenter k-1 fused with the CAM; the
store carries accepted/edited masks forward untouched; the user (or `review_callback`) reviews;
a segmenter trains on every mask of round k that is not rejected (a proposal nobody reviewed
counts as the user's silent acceptance; a rejected image is left out), ignoring the ignore band
recorded with pseudo-labels. Per-round metrics go to `project.update_round`, a trained round's with
its segmenter run (`project.record_round_segmenter`, one transaction).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator

import numpy as np

from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import read_image
from defect_studio.jobs import CancelToken, Progress
from defect_studio.ml.cams.registry import DEFAULT_CAM_METHOD, CamSpec
from defect_studio.ml.distributed import Ranks
from defect_studio.project.provenance import segmenter_to_build_on
from defect_studio.project.store import RunInput
from defect_studio.ml.pseudo import PseudoLabelSettings, create_checked_round, load_ignore, pseudo_job
from defect_studio.ml.review_order import rank_for_review_job
from defect_studio.ml.segmenter import (
    SegmentationSample,
    SegmenterConfig,
    SegmenterTrainingResult,
    make_target,
    train_segmenter_job,
)

if TYPE_CHECKING:
    from defect_studio.project.store import Project

DEFAULT_STOP_CHANGE = 0.02  # stop when under 2 % of the defect pixels change between rounds


@dataclass
class RefineConfig:
    method: str = DEFAULT_CAM_METHOD  # the CAM method, with `cam_settings` over its defaults
    cam_settings: dict[str, Any] = field(default_factory=dict)
    pseudo: dict[str, Any] = field(default_factory=dict)
    segmenter: dict[str, Any] = field(default_factory=dict)
    stop_change: float = DEFAULT_STOP_CHANGE

    @classmethod
    def for_project(cls, project: Project, **overrides: Any) -> "RefineConfig":
        """The project's workflow settings (what the app and the commands chose), `overrides` over them."""
        from defect_studio.workflow_settings import load_workflow_settings

        record = load_workflow_settings(project)
        values: dict[str, Any] = {"method": record.cam_method, "cam_settings": record.cam_settings.get(record.cam_method, {}),
                                  "pseudo": dict(record.pseudo), "segmenter": dict(record.segmenter)}
        if "method" in overrides and "cam_settings" not in overrides:  # another method: the settings chosen for it
            values["cam_settings"] = record.cam_settings.get(overrides["method"], {})
        for name in ("pseudo", "segmenter"):
            values[name].update(overrides.pop(name, None) or {})
        return cls(**{**values, **overrides})

    @property
    def cam_spec(self) -> CamSpec:
        return CamSpec.resolve(self.method, self.cam_settings)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.cam_spec.to_record(),
            "pseudo": PseudoLabelSettings.from_dict(self.pseudo).to_dict(),
            "segmenter": SegmenterConfig.from_dict(self.segmenter).to_dict(),
            "stop_change": self.stop_change,
        }


def _segmenter_runs_for(project: Project, round_index: int) -> list[Any]:
    return [r for r in project.training_runs("segmenter") if r.round_index == round_index]


def training_samples(project: Project, round_index: int) -> tuple[list[SegmentationSample], list[str]]:
    """Samples from the round's masks (rejected ones left out) and their image:mask content hashes."""
    samples, hashes, _ = _training_set(project, round_index)
    return samples, hashes


def _training_set(project: Project, round_index: int) -> tuple[list[SegmentationSample], list[str], list[Any]]:
    """training_samples, and what each sample is for the run's provenance: a RunInput per mask, and
    the mask records (whose parameters say which models proposed them)."""
    samples, hashes, used = [], [], []
    for record in project.mask_records(round_index=round_index):
        if record.state == "rejected":
            continue
        image = project.image(record.image_id)
        if image.tag not in ("good", "defect"):
            continue
        pixels = read_image(image.path).astype(np.float16)  # half the memory; ample precision for [0, 1]
        mask = project.load_mask(record)
        ignore = load_ignore(project, record, mask.shape)
        samples.append(SegmentationSample(image.stem, pixels, make_target(mask, ignore)))
        hashes.append(f"{image.sha256}:{record.sha256}")
        used.append((image, record))
    return samples, hashes, used


def _segmenter_provenance(project: Project, round_index: int, used: list[Any], data_hash: str,
                          start_run: Any) -> tuple[dict[str, Any], list[RunInput]]:
    """The provenance of a segmenter trained on `used` (image, mask record) pairs of round `round_index`."""
    inputs = [RunInput(image.id, record.round_index, record.state,
                       image.sha256, record.sha256) for image, record in used]
    made_by: dict[str, set[str]] = {"classifier_sha256": set(), "segmenter_sha256": set()}
    for _, record in used:
        for key, shas in made_by.items():
            if record.params.get(key):
                shas.add(str(record.params[key]))
    rejected = sum(r.state == "rejected" for r in project.mask_records(round_index=round_index))
    provenance = {
        "round": round_index,
        "round_config": project.round(round_index).config,
        "training_data_hash": data_hash,
        "masks_by_state": dict(sorted(Counter(record.state for _, record in used).items())),
        "rejected_left_out": rejected,
        "warm_start": None if start_run is None else {
            "run": start_run.id, "round": start_run.round_index, "checkpoint_sha256": start_run.checkpoint_sha256},
        "proposals_from": {key: sorted(shas) for key, shas in made_by.items()},
    }
    return provenance, inputs


def _finish_recorded_training(project: Project, round_index: int) -> None:
    """A round whose segmenter run is recorded but whose status still says "training" gets the status and
    metrics the finished job would have given it, so resuming does not leave it. Only projects written
    before record_round_segmenter can be so: they recorded the run and set the status in two writes,
    and a kill between them left the round there."""
    runs = _segmenter_runs_for(project, round_index)
    record = project.round(round_index)
    if runs and record.status == "training":
        metrics = {k: v for k, v in runs[-1].metrics.items() if k != "history"}
        project.update_round(round_index, status="trained", metrics={"segmenter": metrics})


def _missing_masks(project: Project, round_index: int) -> bool:
    """Whether a tagged image has no mask in the round (a proposal job stopped before the end)."""
    present = {m.image_id for m in project.mask_records(round_index=round_index)}
    return any(i.tag in ("good", "defect") and i.id not in present for i in project.images())


def next_segmenter_path(project: Project, round_index: int) -> Path:
    models = Path(project.models_dir)
    models.mkdir(parents=True, exist_ok=True)
    attempt = len(_segmenter_runs_for(project, round_index))
    while True:
        path = models / f"segmenter-round{round_index}-{attempt}.pt"
        if not path.exists():
            return path
        attempt += 1


def train_project_segmenter_job(
    project: Project, round_index: int, config: SegmenterConfig, cancel: CancelToken,
    classifier_path: str | Path | None = None, ranks: Ranks | None = None, round_metrics: dict[str, Any] | None = None,
) -> Generator[Progress, None, tuple[SegmenterTrainingResult, dict[str, Any]]]:
    """Train on round `round_index`'s masks, record the run and set the round "trained", in one
    transaction; a cancelled run records nothing. The round's metrics get `round_metrics`, the
    segmenter's metrics and the job's seconds (`train_s`); returns the result and those metrics.
    `classifier_path` (default: the project's latest classifier) starts the segmenter's encoder when the
    config's encoder_weights is "classifier". `ranks`: this is rank 0 of a distributed command, the other
    ranks train with it (train_segmenter_job)."""
    from defect_studio.ml.export import training_data_hash

    started = time.monotonic()
    yield Progress("loading masks", 0, None, f"round {round_index}")
    project.round(round_index)  # "this project has no round K"
    samples, hashes, used = _training_set(project, round_index)
    if not samples:
        raise DataError(f"round {round_index} has no mask to train on (none proposed yet, or every one rejected); "
                        "nothing was trained and nothing changed.")
    if not any((s.target == 1).any() for s in samples):
        raise DataError(f"round {round_index} has no defect pixel in any usable mask: nothing to learn from.")
    path = next_segmenter_path(project, round_index)
    meta = {"round_index": round_index, "training_data_hash": training_data_hash(hashes)}
    # The network this round builds on: the previous round's, or an earlier one the user made current.
    start_run = segmenter_to_build_on(project, round_index) if config.warm_start else None
    start_from = start_run.checkpoint_path if start_run is not None else None
    if classifier_path is None:  # the encoder starts from it (encoder_weights "classifier") and it gates the masks
        classifier_run = project.latest_run("classifier")  # none yet: the encoder starts from ImageNet, no gate
        classifier_path = classifier_run.checkpoint_path if classifier_run is not None else None
    result = yield from train_segmenter_job(samples, config, path, cancel, extra_meta=meta, start_from=start_from,
                                            classifier_path=classifier_path, ranks=ranks)
    provenance, inputs = _segmenter_provenance(project, round_index, used, meta["training_data_hash"], start_run)
    trained_metrics = {**(round_metrics or {}), "segmenter": dict(result.metrics), "train_s": time.monotonic() - started}
    project.record_round_segmenter(
        round_index,
        config=config.to_dict(),
        seed=config.seed,
        metrics={**result.metrics, "history": result.history},
        checkpoint_path=path,
        dataset_hashes=hashes,
        provenance=provenance,
        inputs=inputs,
        round_metrics=trained_metrics,
    )
    return result, trained_metrics


def round_review_metrics(project: Project, round_index: int) -> dict[str, Any]:
    """Accept rate and edited-pixel fraction over the round's defect-tagged images."""
    records = project.mask_records(round_index=round_index, tag="defect")
    images = {image.id: image for image in project.images("defect")}
    states = {state: sum(r.state == state for r in records) for state in ("proposed", "accepted", "rejected", "edited")}
    edited_pixels = total_pixels = 0
    for record in records:
        image = images[record.image_id]
        total_pixels += image.width * image.height
        if record.state == "edited":
            proposal = project.load_proposal(record.image_id, round_index)
            if proposal is not None:
                edited_pixels += int(np.count_nonzero(proposal != project.load_mask(record)))
    reviewed = states["accepted"] + states["rejected"] + states["edited"]
    return {
        "defect_images": len(records),
        "states": states,
        "flagged": sum(r.flagged for r in records),
        "accept_rate": states["accepted"] / reviewed if reviewed else float("nan"),
        "edited_pixel_fraction": edited_pixels / total_pixels if total_pixels else 0.0,
    }


def mask_change(project: Project, previous_round: int, round_index: int) -> float:
    """Changed defect pixels / defect pixels of either round (1 − IoU of the two rounds' masks)."""
    before = {r.image_id: r for r in project.mask_records(round_index=previous_round)}
    changed = union = 0
    for record in project.mask_records(round_index=round_index):
        old = before.get(record.image_id)
        if old is None or old.sha256 == record.sha256:
            if old is not None:
                union += int(project.load_mask(record).sum())
            continue
        new_mask, old_mask = project.load_mask(record), project.load_mask(old)
        changed += int(np.count_nonzero(new_mask ^ old_mask))
        union += int(np.count_nonzero(new_mask | old_mask))
    return changed / union if union else 0.0


def round_truth_metrics(project: Project, round_index: int, gt_dir: str | Path) -> dict[str, Any]:
    """The round's masks on defect-tagged images vs ground truth (pseudo-label quality)."""
    from defect_studio.ml.evaluate import evaluate_pairs, iterate_against_truth, load_ground_truth

    truth = load_ground_truth(gt_dir)
    records = {project.image(r.image_id).stem: r for r in project.mask_records(round_index=round_index)}
    stems = [s for s in truth.stems() if s in records and project.image(records[s].image_id).tag == "defect"]
    if not stems:
        return {}
    metrics = evaluate_pairs(iterate_against_truth(truth, stems, lambda stem, shape: project.load_mask(records[stem])))
    return {k: v for k, v in metrics.items() if k in ("defect_iou", "background_iou", "miou", "dice", "per_type")}


ReviewCallback = Callable[[Any, int], None]


def refine_job(
    project: Project,
    rounds: int,
    cancel: CancelToken,
    review_callback: ReviewCallback | None = None,
    gt_dir: str | Path | None = None,
    config: RefineConfig | None = None,
    classifier_path: str | Path | None = None,
    ranks: Ranks | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Run up to `rounds` proposal -> review -> train rounds; returns a summary per round. `ranks`: the
    segmenters train on every rank of a distributed command (rank 0 runs this job).

    Continues from the project's state: a latest round without a segmenter is reviewed and
    trained on as it is (the user may have reviewed it already); otherwise a new round starts.
    """
    if rounds < 1:
        raise DataError("--rounds must be at least 1.")
    config = config or RefineConfig.for_project(project)
    segmenter_config = SegmenterConfig.from_dict(config.segmenter)
    summaries: list[dict[str, Any]] = []
    existing = project.rounds()
    if existing:
        _finish_recorded_training(project, existing[-1].index)
    round_index = existing[-1].index if existing and not _segmenter_runs_for(project, existing[-1].index) else None
    stopped_early = False
    for step in range(rounds):
        timings: dict[str, float] = {}
        if round_index is None:
            round_index = create_checked_round(project, config.to_dict(), classifier_path)
            started = time.monotonic()
            yield from pseudo_job(project, round_index, config.cam_spec, config.pseudo, cancel, None, classifier_path)
            timings["pseudo_s"] = time.monotonic() - started
        elif _missing_masks(project, round_index):  # its proposing was interrupted: finish it first
            started = time.monotonic()
            made_with = project.round(round_index).config  # the rest of the round gets the same settings
            yield from pseudo_job(project, round_index, CamSpec.from_record(made_with) or config.cam_spec,
                                  made_with.get("pseudo", config.pseudo), cancel, None, classifier_path, only_missing=True)
            timings["pseudo_s"] = time.monotonic() - started
        change = mask_change(project, round_index - 1, round_index) if round_index > 0 else None
        if review_callback is not None:
            review_callback(project, round_index)
        metrics: dict[str, Any] = {"review": round_review_metrics(project, round_index), "mask_change": change}
        if gt_dir is not None:
            metrics["ground_truth"] = round_truth_metrics(project, round_index, gt_dir)
        if step > 0 and change is not None and change < config.stop_change:
            metrics["stopped"] = f"masks changed {change:.3%} < {config.stop_change:.1%}"
            project.update_round(round_index, status="converged", metrics=metrics)
            summaries.append({"round": round_index, **metrics, **timings})
            stopped_early = True
            break
        project.update_round(round_index, status="training", metrics=metrics)
        _, metrics = yield from train_project_segmenter_job(project, round_index, segmenter_config, cancel,
                                                            classifier_path, ranks, round_metrics={**metrics, **timings})
        summaries.append({"round": round_index, **metrics})
        round_index = None
    return {"rounds": summaries, "stopped_early": stopped_early}


def ground_truth_dir(project: Project) -> Path | None:
    """Ground-truth masks for the round metrics: the project's `ground_truth_dir` setting, else a `masks/`
    folder beside the image folder (the dataset layout, as in the demo). Used for evaluation only."""
    setting = project.get_setting("ground_truth_dir")
    if setting:
        return Path(setting) if Path(setting).is_dir() else None
    beside = Path(project.image_root).parent / "masks"
    return beside if beside.is_dir() else None


def next_round_job(
    project: Project, round_index: int, cancel: CancelToken, segmenter: dict[str, Any] | None = None,
    gt_dir: str | Path | None = None, classifier_path: str | Path | None = None, ranks: Ranks | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Train the segmenter on round `round_index`'s reviewed masks, then propose round `round_index` + 1's
    masks from segmenter + CAM: the Rounds tab's "next round" and `defect-studio next-round`.

    The next round is made with the CAM and thresholds of round `round_index` (the rounds of one loop
    compare like with like), the segmenter with the project's workflow settings, `segmenter` over them
    (this machine's threads, say). A round whose segmenter was trained already (a run stopped before
    proposing) is not trained again. The summary: refine_job's, plus `next_round` and its `proposals`.
    """
    from defect_studio.ml.pseudo import create_checked_round

    made_with = project.round(round_index).config or {}  # "this project has no round K"
    pseudo = made_with.get("pseudo") if isinstance(made_with.get("pseudo"), dict) else None
    spec = CamSpec.from_record(made_with)
    overrides: dict[str, Any] = {"segmenter": segmenter or {}}
    if spec is not None:
        overrides.update(method=spec.method, cam_settings=spec.settings)
    config = RefineConfig.for_project(project, **overrides)
    if pseudo is not None:
        config.pseudo = dict(pseudo)
    summary: dict[str, Any] = {}
    _finish_recorded_training(project, round_index)
    if not _segmenter_runs_for(project, round_index):  # else a previous run trained it and stopped before proposing
        summary = yield from refine_job(project, 1, cancel, gt_dir=gt_dir, config=config, classifier_path=classifier_path,
                                        ranks=ranks)
        if summary.get("stopped_early"):
            return summary
    next_round = create_checked_round(project, config.to_dict(), classifier_path)
    proposals = yield from pseudo_job(project, next_round, config.cam_spec, config.pseudo, cancel, None, classifier_path)
    # The Review tab opens on the new round in the edit-first order (ml/review_order.py), made now so the
    # inspector does not wait for it; a round with nothing to review simply has no order.
    try:
        ranked = yield from rank_for_review_job(project, next_round, cancel, classifier_path)
        review_order = f"{len(ranked)} mask(s) in the edit-first order"
    except (DataError, ModelError) as error:
        review_order = f"no edit-first order: {error}"
    return {**summary, "next_round": next_round, "proposals": proposals, "review_order": review_order}
