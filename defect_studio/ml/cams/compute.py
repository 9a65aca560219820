"""Class activation maps: Grad-CAM, Grad-CAM++, LayerCAM, FGBP and the region-aware CAM.

`../shared/docs/method.md` defines every method; this module follows it and names every parameter
there as a setting with a default (`default_settings`). The classifier is only used through its
interface: `model.stages` (four stages whose outputs are A^1..A^4), `model(x)` -> the defect logit
per image, and `nn.ReLU` modules for every non-linearity.

One forward and one backward pass per batch give every stage's activation and gradient
(`torch.autograd.grad` on the stage outputs, so no parameter's `.grad` is touched). Hooks and the
guided-backprop ReLUs are installed by context managers and always removed, and every module's
training flag is restored: the model is left exactly as it was.

Conventions of the baselines follow pytorch-grad-cam (the reference the tests compare with):
each stage map is ReLU'd, min-max normalised at feature resolution (x - min, / (1e-7 + max)),
then resized bilinearly (OpenCV's pixel-centre convention). Maps returned to callers are then put
back onto the original pixels (`Geometry.to_original`) and min-max normalised there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from defect_studio.errors import DefectStudioError
from defect_studio.ml.cams.registry import CamSpec
from defect_studio.ml.cams.settings import STAGE_COUNT, CamSettingsError
from defect_studio.ml.good_prior import GoodImagePrior, distance_maps

_EPS = 1e-7
PROBES = 8  # random inputs averaged when measuring where a stage cell's receptive field is centred


# ---------------------------------------------------------------------------------------------
# Model plumbing: guided ReLUs, stage capture, leaving the model exactly as it was


class _GuidedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, ceiling: float) -> torch.Tensor:
        ctx.save_for_backward(values)
        ctx.ceiling = ceiling
        return values.clamp(min=0, max=ceiling)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (values,) = ctx.saved_tensors
        # guided backprop: pass where the forward input was in the linear part AND the incoming gradient is positive
        passing = (values > 0) & (values < ctx.ceiling) & (grad_output > 0)
        return grad_output * passing.to(grad_output.dtype), None


class GuidedReLU(nn.Module):
    """A non-in-place ReLU (or ReLU6, with `ceiling` 6) whose backward pass is guided-backprop gating;
    stateless, so reusable."""

    def __init__(self, ceiling: float = math.inf) -> None:
        super().__init__()
        self.ceiling = ceiling

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return _GuidedReLUFunction.apply(values, self.ceiling)


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Swap every nn.ReLU / nn.ReLU6 of the model for a GuidedReLU; the originals go back on exit, always.

    A ReLU module reused twice in a block (torchvision's BasicBlock) is one attribute: swapping it
    gates both uses. Yields how many ReLU slots were swapped.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    guided, guided6 = GuidedReLU(), GuidedReLU(6.0)
    try:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, (nn.ReLU, nn.ReLU6)):
                    parent._modules[name] = guided6 if isinstance(child, nn.ReLU6) else guided
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, original in reversed(swapped):
            parent._modules[name] = original


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the block; each module's own training flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def capture_stage_outputs(model: nn.Module, stage_indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks on model.stages[i] (0-based) filling {i: output}; removed on exit, always."""
    stages = getattr(model, "stages", None)
    if stages is None or len(stages) != STAGE_COUNT:
        raise DefectStudioError("this classifier has no four `stages`; CAMs need a staged network.")
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for index in stage_indices:
            def hook(module: nn.Module, inputs: Any, output: torch.Tensor, index: int = index) -> None:
                outputs[index] = output
            handles.append(stages[index].register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()


def defect_score(logits: torch.Tensor) -> torch.Tensor:
    """s per image: the defect logit, or the logit difference of a two-class head."""
    if logits.ndim == 2 and logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    if logits.ndim == 2 and logits.shape[1] == 1:
        return logits[:, 0]
    if logits.ndim == 1:
        return logits
    raise DefectStudioError(f"the classifier returned logits of shape {tuple(logits.shape)}; expected (B,) or (B, 1|2).")


def stage_activations_and_gradients(
    model: nn.Module, batch: torch.Tensor, stage_indices: Sequence[int], guided: bool
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """One forward + backward pass: ({stage: A}, {stage: ds/dA}, scores), all detached.

    Runs under enable_grad (callers may sit inside no_grad) with the model in eval mode; the input
    is made to require grad so the graph exists even for a frozen model; parameters' .grad untouched.
    """
    stage_indices = sorted(set(stage_indices))
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        stack.enter_context(torch.enable_grad())
        if guided:
            stack.enter_context(guided_relus(model))
        captured = stack.enter_context(capture_stage_outputs(model, stage_indices))
        inputs = batch.detach().clone().requires_grad_(True)
        scores = defect_score(model(inputs))
        missing = [i + 1 for i in stage_indices if i not in captured]
        if missing:
            raise DefectStudioError(f"the classifier's forward pass never ran stage(s) {missing}.")
        tensors = [captured[i] for i in stage_indices]
        gradients = torch.autograd.grad(scores.sum(), tensors, allow_unused=True)
        activations = {i: t.detach() for i, t in zip(stage_indices, tensors)}
        grads = {
            i: (g.detach() if g is not None else torch.zeros_like(activations[i]))
            for i, g in zip(stage_indices, gradients)
        }
        return activations, grads, scores.detach()


# ---------------------------------------------------------------------------------------------
# Per-stage maps (torch, feature resolution)


def gradcam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))


def gradcampp_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Chattopadhay et al. (2018), eq. 19, with the sums and epsilon pytorch-grad-cam uses."""
    grads_2 = gradient.pow(2)
    grads_3 = grads_2 * gradient
    sum_activations = activation.sum(dim=(2, 3), keepdim=True)
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 1e-6)
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    weights = (torch.relu(gradient) * alpha).sum(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))


def layercam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    return torch.relu((torch.relu(gradient) * activation).sum(dim=1))


def magnitude_filter(gradient: torch.Tensor, quantile: float) -> torch.Tensor:
    """Keep the elements with |G| >= the q-quantile of |G| over C×H×W, per image (others -> 0)."""
    magnitude = gradient.abs().flatten(1)
    count = magnitude.shape[1]
    # the q-quantile as torch.quantile's "lower" order statistic; kthvalue is 1-based
    rank = min(count, max(1, int(math.floor(quantile * (count - 1))) + 1))
    threshold = magnitude.kthvalue(rank, dim=1).values.view(-1, 1, 1, 1)
    return gradient * (gradient.abs() >= threshold).to(gradient.dtype)


def fgbp_map(activation: torch.Tensor, gradient: torch.Tensor, quantile: float | None) -> torch.Tensor:
    """M^l = ReLU(sum_c Ĝ^l_c ⊙ A^l_c) with Ĝ the magnitude-filtered (guided) gradient."""
    if quantile is not None:
        gradient = magnitude_filter(gradient, quantile)
    return torch.relu((gradient * activation).sum(dim=1))


def normalise_like_reference(maps: torch.Tensor) -> torch.Tensor:
    """(B, h, w) -> each map minus its min, over (1e-7 + max): pytorch-grad-cam's scale_cam_image."""
    flat = maps.flatten(1)
    shifted = flat - flat.min(dim=1, keepdim=True).values
    return (shifted / (_EPS + shifted.max(dim=1, keepdim=True).values)).view_as(maps)


def _uses_prior(spec: CamSpec, computation: "CamComputation", prior: GoodImagePrior | None) -> bool:
    """Whether the method draws on the good-image prior (one that may use it does when the classifier has one)."""
    if computation.needs_prior:
        if prior is None:
            raise CamSettingsError(f"the {spec.label} map needs the good images' memory bank, which this classifier's "
                                   "checkpoint lacks (it predates the prior): train the classifier again.")
        return True
    return computation.wants_prior(spec.settings) and prior is not None


def feature_stage_maps(
    model: nn.Module, batch: torch.Tensor, spec: CamSpec, prior: GoodImagePrior | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    """({0-based stage: (B, h, w) float32 map normalised at feature resolution}, the (B, h', w') good-image
    prior at its stage's resolution, or None when the method does not use it) for one batch."""
    computation: CamComputation = spec.entry.load_computation()
    settings = spec.settings
    stage_indices = sorted({stage - 1 for stage in computation.stages(settings)})
    use_prior = _uses_prior(spec, computation, prior)
    wanted = sorted(set(stage_indices) | ({prior.stage - 1} if use_prior else set()))
    if not stage_indices:  # the prior alone: one forward pass, no gradient
        with eval_mode(model), torch.no_grad(), capture_stage_outputs(model, wanted) as captured:
            model(batch)
            activations = {index: captured[index] for index in wanted}
        gradients: dict[int, torch.Tensor] = {}
    else:
        activations, gradients, _ = stage_activations_and_gradients(model, batch, wanted, computation.guided(settings))
    maps: dict[int, np.ndarray] = {}
    for index in stage_indices:
        raw = computation.stage_map(activations[index].float(), gradients[index].float(), settings)
        maps[index] = normalise_like_reference(raw).cpu().numpy().astype(np.float32)
    prior_maps = None
    if use_prior:
        distances = distance_maps(prior, activations[prior.stage - 1].float(), settings.get("neighbours", 1))
        prior_maps = normalise_like_reference(distances).cpu().numpy().astype(np.float32)
    return maps, prior_maps


# ---------------------------------------------------------------------------------------------
# Fusion at image resolution (numpy)


def minmax(values: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Min-max to [0, 1] (over `where` if given; 0 elsewhere); a flat map becomes all zeros."""
    values = values.astype(np.float32, copy=False)
    selected = values if where is None else values[where]
    if selected.size == 0:
        return np.zeros_like(values)
    low, high = float(selected.min()), float(selected.max())
    if high - low <= _EPS:
        return np.zeros_like(values)
    out = (values - low) / (high - low)
    if where is not None:
        out = np.where(where, out, 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def grow(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Dilate a bool mask by a disk of `radius_px` (a distance transform: O(pixels) for any radius)."""
    if radius_px < 0.5 or not mask.any():
        return mask.copy()
    distance = cv2.distanceTransform(np.where(mask, 0, 1).astype(np.uint8), cv2.DIST_L2, 5)
    return distance <= radius_px


@dataclass(frozen=True)
class RegionAwareParts:
    """The region-aware CAM and what it was made of (for tests, the GUI and the ablation)."""

    fused: np.ndarray  # final map in [0, 1]
    deep_map: np.ndarray  # R (normalised)
    regions: np.ndarray  # int32 label image, 0 outside every region
    weights: dict[int, dict[int, float]]  # {region label: {stage (1-based): weight}}


def region_aware_fusion(
    stage_maps: dict[int, np.ndarray], deep_map: np.ndarray, cell_px: float, settings: dict[str, Any]
) -> RegionAwareParts:
    """method.md's region-aware module on image-resolution maps (each in [0, 1]).

    stage_maps: {1-based stage: H×W}; deep_map: R; cell_px: one deepest-salient-stage cell in pixels.
    """
    salient = (deep_map >= settings["region_threshold"]) & (deep_map > 0)
    grown = grow(salient, settings["region_margin_cells"] * cell_px)
    # components of the dilated union: regions whose margins touch are treated as one
    count, labels = cv2.connectedComponents(grown.astype(np.uint8), connectivity=8)
    fused = np.zeros_like(deep_map, dtype=np.float32)
    weights: dict[int, dict[int, float]] = {}
    ring_px = max(1.0, settings["ring_cells"] * cell_px)
    for label in range(1, count):
        region = labels == label
        ys, xs = np.nonzero(region)
        pad = int(math.ceil(ring_px)) + 1
        top, bottom = max(0, ys.min() - pad), min(region.shape[0], ys.max() + pad + 1)
        left, right = max(0, xs.min() - pad), min(region.shape[1], xs.max() + pad + 1)
        local = region[top:bottom, left:right]
        ring = grow(local, ring_px) & ~local
        contrasts: dict[int, float] = {}
        for stage, stage_map in stage_maps.items():
            crop = stage_map[top:bottom, left:right]
            inside = float(crop[local].mean())
            around = float(crop[ring].mean()) if ring.any() else 0.0
            contrasts[stage] = inside / (around + 1e-3)
        if settings["contrast_weights"]:
            total = sum(contrasts.values())
            stage_weights = {s: (c / total if total > 0 else 1.0 / len(contrasts)) for s, c in contrasts.items()}
        else:
            stage_weights = {s: 1.0 / len(stage_maps) for s in stage_maps}
        weights[label] = stage_weights
        combined = np.zeros(local.shape, dtype=np.float32)
        for stage, stage_map in stage_maps.items():
            crop = stage_map[top:bottom, left:right]
            part = minmax(crop, local) if settings["per_region_normalisation"] else crop
            combined += stage_weights[stage] * part
        target = fused[top:bottom, left:right]
        target[local] = combined[local]
    if settings["deep_gating"] and settings["gamma"] > 0:
        fused = fused * np.power(np.clip(deep_map, 0.0, 1.0), settings["gamma"], dtype=np.float32)
    return RegionAwareParts(minmax(fused), deep_map, labels.astype(np.int32), weights)


# ---------------------------------------------------------------------------------------------
# The shared interface


def _batches(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(count, start + size))


def _cell_px(geometry: Any, feature_shape: tuple[int, int]) -> float:
    """One feature cell of a stage, in original pixels."""
    stride = geometry.input_size[0] / feature_shape[0]
    scale = min(geometry.scale)
    return stride / max(scale, 1e-6)


_OFFSETS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, dict[int, tuple[float, float]]]]" = weakref.WeakKeyDictionary()


def stage_offsets(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> dict[int, tuple[float, float]]:
    """{0-based stage: (dy, dx)}: where a stage cell's receptive field is centred, in input pixels, minus
    where bilinear upsampling puts that cell ((i + 0.5) * stride - 0.5). Measured once per model and input
    shape from the gradient of the middle cell with respect to a random input (centroid of |gradient|)."""
    per_model = _OFFSETS.setdefault(model, {})
    key = tuple(input_shape)
    if key in per_model:
        return per_model[key]
    generator = torch.Generator().manual_seed(0)
    probes = torch.randn((PROBES, *input_shape), generator=generator)
    # |gradient| summed over the probes, one probe at a time: the same sums as one batch (BatchNorm in eval
    # mode keeps the probes apart), for an eighth of the memory (a batch of 8 at 256 px peaked at +1 GB).
    weights: dict[int, torch.Tensor] = {}
    shapes: dict[int, tuple[int, int]] = {}
    with eval_mode(model), torch.enable_grad(), capture_stage_outputs(model, range(STAGE_COUNT)) as captured:
        for probe in probes:
            pixels = probe[None].to(device).requires_grad_(True)
            model(pixels)
            for index in range(STAGE_COUNT):
                activation = captured[index]
                rows, cols = activation.shape[2], activation.shape[3]
                shapes[index] = (rows, cols)
                (gradient,) = torch.autograd.grad(activation[:, :, rows // 2, cols // 2].sum(), pixels,
                                                  retain_graph=index < STAGE_COUNT - 1)
                weight = gradient.abs().sum(dim=(0, 1)).double().cpu()
                weights[index] = weight if index not in weights else weights[index] + weight
    offsets: dict[int, tuple[float, float]] = {}
    for index, weight in weights.items():
        rows, cols = shapes[index]
        row, col = rows // 2, cols // 2
        total = float(weight.sum())
        if total <= 0:
            offsets[index] = (0.0, 0.0)
            continue
        ys = torch.arange(weight.shape[0], dtype=torch.float64)[:, None]
        xs = torch.arange(weight.shape[1], dtype=torch.float64)[None, :]
        centre_y, centre_x = float((weight * ys).sum()) / total, float((weight * xs).sum()) / total
        stride_y, stride_x = input_shape[1] / rows, input_shape[2] / cols
        offsets[index] = (centre_y - ((row + 0.5) * stride_y - 0.5), centre_x - ((col + 0.5) * stride_x - 0.5))
    per_model[key] = offsets
    return offsets


def _shift_to_input(feature_map: np.ndarray, input_size: tuple[int, int], offset: tuple[float, float]) -> np.ndarray:
    """Upsample a stage map to the input size and move it by `offset` (dy, dx) input pixels."""
    upsampled = cv2.resize(feature_map, (input_size[1], input_size[0]), interpolation=cv2.INTER_LINEAR)
    translation = np.float32([[1, 0, offset[1]], [0, 1, offset[0]]])
    return cv2.warpAffine(upsampled, translation, (input_size[1], input_size[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _work_geometry(geometry: Any) -> Any:
    """The geometry to fuse maps in: the original one, or, for an image larger than its place in the network
    input, the same mapping onto a canvas of that size. The maps hold no detail finer than the input pixels,
    so nothing is lost, and fusing (regions, rings, normalisation) costs pixels of the input, not of an 8000-px
    original; the fused map is resized to the original at the end."""
    height, width = geometry.original_size
    content = geometry.resized_size
    if height * width <= content[0] * content[1]:
        return geometry
    return dataclasses.replace(geometry, original_size=tuple(content))


def _to_original_size(result: np.ndarray | RegionAwareParts, size: tuple[int, int]) -> np.ndarray | RegionAwareParts:
    def linear(values: np.ndarray) -> np.ndarray:
        return cv2.resize(values, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    if isinstance(result, RegionAwareParts):
        regions = cv2.resize(result.regions, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        fused = np.where(regions > 0, linear(result.fused), 0.0).astype(np.float32)  # still 0 outside every region
        return RegionAwareParts(fused, linear(result.deep_map), regions, result.weights)
    return linear(result)


def _fuse_image(
    spec: CamSpec, per_stage: dict[int, np.ndarray], place: Callable[[np.ndarray, int], np.ndarray],
    geometry: Any, feature_shapes: dict[int, tuple[int, int]], renormalise: bool, prior: np.ndarray | None = None,
) -> np.ndarray | RegionAwareParts:
    """Put each stage map in the target frame (`place`), normalise, and fuse as the method says; `prior` is the
    good-image prior already in that frame (or None)."""
    placed = {index + 1: place(m, index) for index, m in per_stage.items()}
    if renormalise:
        placed = {stage: minmax(m) for stage, m in placed.items()}

    def cell_px(stage: int) -> float:
        return _cell_px(geometry, feature_shapes[stage - 1])

    computation: CamComputation = spec.entry.load_computation()
    return computation.fuse(StageMaps(placed, prior, cell_px), spec.settings)


# ---------------------------------------------------------------------------------------------
# The methods: what each computes per stage and how it fuses the stages (named by the registry)


@dataclass(frozen=True)
class StageMaps:
    """What a method fuses: {1-based stage: map} in the target frame, the good-image prior in that frame
    (or None), and one cell of a stage in pixels of that frame."""

    placed: dict[int, np.ndarray]
    prior: np.ndarray | None
    cell_px: Callable[[int], float]


def _never(settings: dict[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class CamComputation:
    """How one CAM method turns a classifier's stages into a map (the registry names one per method)."""

    stages: Callable[[dict[str, Any]], list[int]]  # 1-based stages whose activation and gradient it needs
    stage_map: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]  # (activation, gradient) -> map
    fuse: Callable[[StageMaps, dict[str, Any]], np.ndarray | RegionAwareParts]
    guided: Callable[[dict[str, Any]], bool] = _never  # guided-backprop ReLUs in the backward pass
    wants_prior: Callable[[dict[str, Any]], bool] = _never  # uses the good-image prior when the classifier has one
    needs_prior: bool = False  # is nothing without the prior
    aligned_by_default: bool = False  # stage alignment when the method has no align_stages setting
    # A method that is no fusion of stage maps (the affinity walk): (classifier, images, spec, batch size) ->
    # original-frame maps, computed instead of everything above.
    maps: Callable[[Any, Sequence[np.ndarray], CamSpec, int], list[np.ndarray]] | None = None


def _fgbp_stage_map(activation: torch.Tensor, gradient: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    return fgbp_map(activation, gradient, settings["fgbp_quantile"] if settings["magnitude_filter"] else None)


def _one_stage(maps: StageMaps, settings: dict[str, Any]) -> np.ndarray:
    return maps.placed[settings["stage"]]


def _maximum_of_stages(maps: StageMaps, settings: dict[str, Any]) -> np.ndarray:
    chosen = [maps.placed[s] for s in settings["stages"]]
    return np.maximum.reduce(chosen) if len(chosen) > 1 else chosen[0]


def _region_aware(maps: StageMaps, settings: dict[str, Any]) -> RegionAwareParts:
    deep = minmax(np.maximum.reduce([maps.placed[s] for s in settings["salient_stages"]]))
    weighting = None if maps.prior is None else np.power(maps.prior, settings["prior_power"], dtype=np.float32)
    if weighting is not None and settings["good_prior"] == "deep":
        deep = minmax(deep * weighting)
    parts = region_aware_fusion({s: maps.placed[s] for s in settings["stages"]}, deep,
                                maps.cell_px(max(settings["salient_stages"])), settings)
    if weighting is not None and settings["good_prior"] == "multiply":
        parts = dataclasses.replace(parts, fused=minmax(parts.fused * weighting))
    return parts


def _prior_alone(maps: StageMaps, settings: dict[str, Any]) -> np.ndarray | None:
    return maps.prior


def _no_stage_map(activation: torch.Tensor, gradient: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    raise AssertionError("the good-image prior uses no stage map")  # it asks for no stage


GRADCAM = CamComputation(lambda s: [s["stage"]], lambda a, g, s: gradcam_map(a, g), _one_stage)
GRADCAMPP = CamComputation(lambda s: [s["stage"]], lambda a, g, s: gradcampp_map(a, g), _one_stage)
LAYERCAM = CamComputation(lambda s: list(s["stages"]), lambda a, g, s: layercam_map(a, g), _maximum_of_stages)
FGBP = CamComputation(lambda s: list(s["stages"]), _fgbp_stage_map, _maximum_of_stages, guided=lambda s: s["guided"])
REGION_AWARE = CamComputation(
    lambda s: sorted(set(s["stages"]) | set(s["salient_stages"])), _fgbp_stage_map, _region_aware,
    guided=lambda s: s["guided"], wants_prior=lambda s: s["good_prior"] != "off",
)
GOOD_PRIOR = CamComputation(lambda s: [], _no_stage_map, _prior_alone, needs_prior=True, aligned_by_default=True)


def _compute(classifier: Any, images: Sequence[np.ndarray], spec: CamSpec, batch_size: int, frame: str) -> list[Any]:
    computation: CamComputation = spec.entry.load_computation()
    if computation.maps is not None:
        return computation.maps(classifier, images, spec, batch_size)
    resolved = spec.settings
    preprocessing = classifier.preprocessing
    device = torch.device(getattr(classifier, "device", "cpu"))
    good_prior = getattr(classifier, "good_prior", None)
    results: list[Any] = []
    scale = resolved.get("input_scale", 1.0)
    if scale != 1.0:  # the fully convolutional network looks at the image larger (or smaller) than it trained at
        preprocessing = dataclasses.replace(
            preprocessing, input_size=max(32, int(round(preprocessing.input_size * scale / 32)) * 32))
    for indices in _batches(len(images), max(1, batch_size)):
        chunk = [images[i] for i in indices]
        if hasattr(classifier, "prepare") and scale == 1.0:  # LoadedClassifier: on its device, in its memory format
            batch, geometries = classifier.prepare(chunk)
        else:
            batch, geometries = preprocessing.prepare_batch(chunk)
        maps, prior_maps = feature_stage_maps(classifier.model, batch.to(device), spec, good_prior)
        offsets: dict[int, tuple[float, float]] = {}
        aligned_by_default = spec.entry.load_computation().aligned_by_default
        if frame == "original" and resolved.get("align_stages", aligned_by_default):
            offsets = stage_offsets(classifier.model, tuple(batch.shape[1:]), batch.device)
        shapes = {index: (m.shape[1], m.shape[2]) for index, m in maps.items()}
        for position, geometry in enumerate(geometries):
            per_stage = {index: m[position] for index, m in maps.items()}
            if frame == "original":
                work = _work_geometry(geometry)

                def place_original(m: np.ndarray, index: int, work: Any = work) -> np.ndarray:
                    if index in offsets:
                        m = _shift_to_input(m, work.input_size, offsets[index])
                    return work.to_original(m)

                prior = None if prior_maps is None else minmax(place_original(prior_maps[position], good_prior.stage - 1))
                fused = _fuse_image(spec, per_stage, place_original, work, shapes, True, prior)
                if work is not geometry:
                    fused = _to_original_size(fused, geometry.original_size)
            else:  # the network input frame with pytorch-grad-cam's conventions (reference tests)
                size = (geometry.input_size[1], geometry.input_size[0])
                def place(m: np.ndarray, index: int, size: tuple[int, int] = size) -> np.ndarray:
                    # pytorch-grad-cam normalises again after resizing
                    resized = cv2.resize(m, size, interpolation=cv2.INTER_LINEAR)
                    return normalise_like_reference(torch.from_numpy(resized[None]))[0].numpy()
                fused = _fuse_image(spec, per_stage, place, geometry, shapes, False)
            results.append(fused)
    return results


def compute_cams(
    classifier: Any, images: Sequence[np.ndarray], method: str | CamSpec, settings: dict[str, Any] | None = None,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """float32 maps in [0, 1], one per image, each at that image's original resolution.

    images: float H×W×C in [0, 1] (as `imageio.read_image` gives); classifier: a LoadedClassifier
    (.model, .preprocessing, .device); `method`: a resolved CamSpec, or a method name with `settings`.
    """
    results = _compute(classifier, images, CamSpec.resolve(method, settings), batch_size, "original")
    return [minmax(r.fused if isinstance(r, RegionAwareParts) else r) for r in results]


def compute_cam(
    classifier: Any, image: np.ndarray, method: str | CamSpec, settings: dict[str, Any] | None = None
) -> np.ndarray:
    return compute_cams(classifier, [image], method, settings)[0]


def compute_region_aware_parts(
    classifier: Any, images: Sequence[np.ndarray], settings: dict[str, Any] | None = None, batch_size: int = 8
) -> list[RegionAwareParts]:
    """The region-aware CAM with its regions, deep map and stage weights (GUI inspection, tests)."""
    return _compute(classifier, images, CamSpec.resolve("region-aware", settings), batch_size, "original")


def compute_cams_at_input(
    classifier: Any, images: Sequence[np.ndarray], method: str | CamSpec, settings: dict[str, Any] | None = None,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Baseline maps in the network-input frame with pytorch-grad-cam's scaling (no letterbox inverse)."""
    spec = CamSpec.resolve(method, settings)
    if not spec.entry.at_input:
        raise CamSettingsError(f"{spec.method} maps exist only at the original resolution.")
    return _compute(classifier, images, spec, batch_size, "input")
