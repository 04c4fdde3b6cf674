"""Semantic-segmentation evaluator: int64 confusion matrix, mIoU and friends, summed across ranks.

The protocol is detectron2's (``reset`` / ``process`` / ``evaluate``); the averaging of classes
without ground truth is an explicit policy (``absent_classes``, see specs/evaluation.md):

- ``"zero"`` (default; mmseg ``IoUMetric``, detectron2 v0.6): a class predicted but absent from
  the ground truth has IoU 0 and enters the mean; a class neither labelled nor predicted is left
  out.
- ``"exclude"`` (detectron2 main since 2022): only classes with ground-truth pixels enter the
  mean.

The result says which policy was used and how many classes entered the mean, so numbers can be
matched to other code bases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovseg.errors import OvsegError
from ovseg.io import atomic_write_text
from ovseg.vis.writers import write_json

logger = logging.getLogger(__name__)

ABSENT_CLASS_POLICIES = ("zero", "exclude")

# guards against silent mapping bugs (specs/evaluation.md, "Ours")
_LOW_MIOU_PERCENT = 1.0
_DOMINANT_PREDICTION_FRACTION = 0.5
_MAX_NAMES_IN_NOTE = 10
_MAX_UINT8_VALUES = 256
# label lookup tables reach up to the ignore value (65535 -> 512 KiB); larger ones are not built
_MAX_TABLE_LENGTH = 1 << 20

ArrayLike = np.ndarray | torch.Tensor


class EvaluationError(OvsegError, ValueError):
    """Predictions or labels cannot be evaluated: wrong size, dtype or values out of range."""


def _is_integer_dtype(array: ArrayLike) -> bool:
    if isinstance(array, torch.Tensor):
        dtype = array.dtype
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.issubdtype(array.dtype, np.integer)


def _check_map(array: Any, what: str, source: str) -> None:
    if not isinstance(array, np.ndarray | torch.Tensor):
        raise EvaluationError(
            f"{what} of {source} is a {type(array).__name__}; expected an (H, W) integer "
            "numpy array or torch tensor"
        )
    if array.ndim != 2:
        raise EvaluationError(f"{what} of {source} has shape {tuple(array.shape)}; expected (H, W)")
    if not _is_integer_dtype(array):
        # a float map is usually logits or probabilities that were not argmax-ed
        raise EvaluationError(
            f"{what} of {source} has dtype {array.dtype}; expected integer class indices "
            "(argmax the logits first)"
        )


def _to_int64(array: ArrayLike, device: torch.device | None) -> ArrayLike:
    """Widen to int64 without ever narrowing (16-bit labels must keep values above 255).

    Returns a numpy array when ``device`` is None, else a torch tensor on ``device``.
    """
    if device is None:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        # numpy, not torch, for CPU maps: single-threaded numpy is steadier than torch's
        # intra-op thread pool on busy machines, and torch converts uint16 slowly
        return np.asarray(array).astype(np.int64, copy=False)
    if isinstance(array, np.ndarray):
        array = torch.from_numpy(np.asarray(array).astype(np.int64, copy=False))
    return array.to(device=device, dtype=torch.int64)


class SemSegEvaluator:
    """Accumulate a confusion matrix over images and compute mIoU, mAcc, pAcc and fwIoU.

    The matrix is (C, C) int64 with **rows = ground truth, columns = prediction**:
    ``matrix[g, p]`` counts the evaluated pixels labelled ``g`` and predicted ``p`` (the
    transpose of detectron2's layout, and without its extra ignore row/column). Pixels whose
    label is ``ignore_value`` are dropped, whatever is predicted there.

    Args:
        num_classes: C.
        ignore_value: label value of pixels that are not evaluated (255 for most benchmarks,
            65535 for the 16-bit 847/459-class ones). It must lie outside [0, C), else a class
            would silently never be evaluated.
        class_names: C names for the per-class table; default ``"0"``, ``"1"``, ...
        absent_classes: ``"zero"`` or ``"exclude"``, see the module docstring.
        distributed: when torch.distributed is initialised, ``evaluate`` sums the matrices of
            all ranks and only rank 0 returns results.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_value: int = 255,
        class_names: Sequence[str] | None = None,
        absent_classes: str = "zero",
        distributed: bool = True,
    ) -> None:
        if absent_classes not in ABSENT_CLASS_POLICIES:
            raise ValueError(
                f"absent_classes is {absent_classes!r}; expected one of {ABSENT_CLASS_POLICIES}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise EvaluationError(f"num_classes is {num_classes!r}; expected an int >= 1")
        if 0 <= ignore_value < num_classes:
            raise EvaluationError(
                f"ignore_value {ignore_value} is a class index for {num_classes} classes, so "
                f"class {ignore_value} would never be evaluated; use a value outside "
                f"[0, {num_classes}) (benchmarks with more than 255 classes use 65535)"
            )
        if class_names is None:
            class_names = [str(index) for index in range(num_classes)]
        class_names = [str(name) for name in class_names]
        if len(class_names) != num_classes:
            raise EvaluationError(
                f"{len(class_names)} class names for {num_classes} classes; expected one name "
                "per class"
            )
        if len(set(class_names)) != num_classes:
            seen: set[str] = set()
            repeated = next(name for name in class_names if name in seen or seen.add(name))
            raise EvaluationError(
                f"class name {repeated!r} appears more than once; the per-class table needs "
                "unique names"
            )
        self.num_classes = num_classes
        self.ignore_value = int(ignore_value)
        self.class_names = class_names
        self.absent_classes = absent_classes
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        size = self.num_classes
        self._matrix = np.zeros((size, size), dtype=np.int64)
        # GPU inputs are counted on their device, so an eval loop does not copy per image
        self._device_matrices: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[torch.device | None, ArrayLike] = {}
        self._num_images = 0
        self._saw_uint8_labels = False

    @property
    def confusion_matrix(self) -> np.ndarray:
        """(C, C) int64 copy of this process's matrix; rows = ground truth, cols = prediction."""
        matrix = self._matrix.copy()
        for device_matrix in self._device_matrices.values():
            matrix += device_matrix.cpu().numpy()
        return matrix

    @property
    def num_images(self) -> int:
        """Images processed by this process since the last ``reset``."""
        return self._num_images

    def state_dict(self) -> dict[str, np.ndarray]:
        """What this process has accumulated, as numpy arrays (for ``np.savez``):
        ``matrix`` (C, C) int64, ``num_images`` and ``saw_uint8_labels`` () int64."""
        return {
            "matrix": self.confusion_matrix,
            "num_images": np.asarray(self._num_images, dtype=np.int64),
            "saw_uint8_labels": np.asarray(int(self._saw_uint8_labels), dtype=np.int64),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace everything accumulated by ``state`` (a ``state_dict()``), e.g. to resume an
        interrupted evaluation: processing the remaining images then gives the same matrix,
        bit for bit, as processing all of them in one go.

        Raises:
            EvaluationError: the matrix is not (C, C) integer with non-negative counts.
        """
        matrix = np.asarray(state["matrix"])
        size = self.num_classes
        if matrix.shape != (size, size) or not np.issubdtype(matrix.dtype, np.integer):
            raise EvaluationError(
                f"saved confusion matrix has shape {matrix.shape} and dtype {matrix.dtype}; "
                f"expected ({size}, {size}) integer counts for {size} classes"
            )
        if matrix.size and int(matrix.min()) < 0:
            raise EvaluationError("saved confusion matrix has negative counts")
        self.reset()
        self._matrix = matrix.astype(np.int64, copy=True)
        self._num_images = int(state["num_images"])
        self._saw_uint8_labels = bool(int(state["saw_uint8_labels"]))

    def process(self, prediction: ArrayLike, label: ArrayLike, source: str = "") -> None:
        """Add one image.

        Args:
            prediction: (H, W) integer class indices in [0, C), numpy or torch (CPU or CUDA),
                any integer dtype. Every pixel must be in range, also where the label is ignore.
            label: (H, W) integer ground truth, values in [0, C) or ``ignore_value``; any
                integer dtype (uint16 for 16-bit label files; never narrowed).
            source: the image's file or id, named in errors.

        Raises:
            EvaluationError: a map is not (H, W) integer, the sizes differ, or a value is out
                of range.
        """
        source = source or f"image #{self._num_images}"
        _check_map(prediction, "prediction", source)
        _check_map(label, "label", source)
        if tuple(prediction.shape) != tuple(label.shape):
            raise EvaluationError(
                f"prediction of {source} has size {tuple(prediction.shape)} but its label has "
                f"{tuple(label.shape)}; resize the logits to the label size before the argmax "
                "(labels are never resized)"
            )
        device = None
        for array in (prediction, label):
            if isinstance(array, torch.Tensor) and array.device.type != "cpu":
                device = array.device
                break
        gt = _to_int64(label, device)
        pred = _to_int64(prediction, device)
        if gt.shape[0] * gt.shape[1]:
            self._count(gt, pred, source, device)
        self._num_images += 1
        if label.dtype == (torch.uint8 if isinstance(label, torch.Tensor) else np.uint8):
            self._saw_uint8_labels = True

    def _label_table(self, device: torch.device | None) -> ArrayLike:
        """Lookup table: label value -> offset of its row in the flat pair index.

        Class g -> g*C; the ignore value -> C*C (pair indices [C*C, C*C + C), never counted);
        any other value -> C*C + C (indices >= C*C + C flag a bad label). One gather through it
        replaces a boolean mask for the ignore pixels and the label range check, both slow on
        scattered masks.
        """
        if device not in self._tables:
            size = self.num_classes
            length = size
            if 0 <= self.ignore_value < _MAX_TABLE_LENGTH:
                length = max(size, self.ignore_value + 1)
            table = np.full(length, size * size + size, dtype=np.int64)
            table[:size] = np.arange(size, dtype=np.int64) * size
            if self.ignore_value < length:
                table[self.ignore_value] = size * size
            self._tables[device] = table if device is None else torch.from_numpy(table).to(device)
        return self._tables[device]

    def _count(
        self, gt: ArrayLike, pred: ArrayLike, source: str, device: torch.device | None
    ) -> None:
        """Add one image's pairs; gt, pred: (H, W) int64, numpy (device None) or torch."""
        size = self.num_classes
        low, high = int(pred.min()), int(pred.max())
        if low < 0 or high >= size:
            raise EvaluationError(
                f"prediction of {source} has class index {low if low < 0 else high}; expected "
                f"indices in [0, {size}) for {size} classes"
            )
        table = self._label_table(device)
        low, high = int(gt.min()), int(gt.max())
        if 0 <= low and high < len(table):
            flat = np.take(table, gt) if device is None else torch.take(table, gt)
            flat += pred
            if int(flat.max()) >= size * size + size:
                self._raise_on_bad_label(gt, source)
        else:
            # an ignore value outside the table (negative or huge), or a bad label
            self._raise_on_bad_label(gt, source)
            flat = gt * size + pred
            flat[gt == self.ignore_value] = size * size

        # pair index g*C + p of every pixel, ignore pixels in [C*C, C*C + C): one bincount
        if device is None:
            counts = np.bincount(flat.reshape(-1), minlength=size * size + size)
            self._matrix += counts[: size * size].reshape(size, size)
        else:
            counts = torch.bincount(flat.reshape(-1), minlength=size * size + size)
            if device not in self._device_matrices:
                self._device_matrices[device] = torch.zeros(
                    (size, size), dtype=torch.int64, device=device
                )
            self._device_matrices[device] += counts[: size * size].view(size, size)

    def _raise_on_bad_label(self, gt: ArrayLike, source: str) -> None:
        """Raise naming the first label value that is neither a class nor the ignore value."""
        size = self.num_classes
        bad = (gt != self.ignore_value) & ((gt < 0) | (gt >= size))
        if bool(bad.any()):
            count = int(bad.sum())
            raise EvaluationError(
                f"label of {source} has value {int(gt[bad][0])} ({count} pixel"
                f"{'s' if count > 1 else ''} out of range); expected class indices in "
                f"[0, {size}) or the ignore value {self.ignore_value} (wrong ignore value, label "
                "offset or class list?)"
            )

    def process_batch(
        self,
        predictions: Sequence[ArrayLike] | ArrayLike,
        labels: Sequence[ArrayLike] | ArrayLike,
        sources: Sequence[str] | None = None,
    ) -> None:
        """Add several images; the same as ``process`` on each in turn.

        Args:
            predictions: B (H, W) maps, or one (B, H, W) array / tensor.
            labels: B (H, W) maps, or one (B, H, W) array / tensor.
            sources: B names for errors, or None.
        """
        if len(predictions) != len(labels):
            raise EvaluationError(
                f"{len(predictions)} predictions but {len(labels)} labels; expected one label "
                "per prediction"
            )
        if sources is not None and len(sources) != len(labels):
            raise EvaluationError(f"{len(sources)} sources for {len(labels)} images")
        for index in range(len(labels)):
            source = sources[index] if sources is not None else ""
            self.process(predictions[index], labels[index], source)

    def reduced_confusion_matrix(self) -> np.ndarray | None:
        """(C, C) int64 sum of the matrices of all ranks (rows = ground truth, cols = prediction).

        Collective when distributed: every rank must call it; ranks other than 0 get None.
        Without torch.distributed (or with ``distributed=False``) it is ``confusion_matrix``.
        """
        reduced = self._reduced()
        return None if reduced is None else reduced[0]

    def _reduced(self) -> tuple[np.ndarray, int, bool] | None:
        """Sum matrix, image count and the uint8-labels flag over ranks; None off rank 0."""
        matrix = self.confusion_matrix
        num_images = self._num_images
        saw_uint8 = self._saw_uint8_labels
        dist = torch.distributed
        if not (self.distributed and dist.is_available() and dist.is_initialized()):
            return matrix, num_images, saw_uint8
        # one all_reduce for the matrix and the two counters
        packed = torch.from_numpy(np.append(matrix.ravel(), [num_images, int(saw_uint8)]))
        if dist.get_backend() == "nccl":
            packed = packed.cuda()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        if dist.get_rank() != 0:
            return None
        packed_numpy = packed.cpu().numpy()
        size = self.num_classes
        matrix = packed_numpy[: size * size].reshape(size, size)
        return matrix, int(packed_numpy[-2]), bool(packed_numpy[-1])

    def evaluate(self) -> dict[str, Any] | None:
        """Compute the metrics over everything processed (by all ranks when distributed).

        Every rank must call it (it all-reduces); ranks other than 0 get None.

        Returns:
            ``mIoU``, ``mAcc``, ``pAcc``, ``fwIoU`` in percent; ``per_class``:
            ``{name: {"IoU", "Acc", "gt_pixels", "pred_pixels"}}`` (IoU None where the class is
            left out of the mean, Acc None where it has no GT pixel); ``absent_classes``,
            ``num_classes_in_mean``, ``num_classes``, ``num_images``, ``pixels`` (evaluated),
            ``classes_without_gt`` and ``warnings`` (list of str).

        Raises:
            EvaluationError: no pixel was evaluated.
        """
        reduced = self._reduced()
        if reduced is None:
            return None
        matrix, num_images, saw_uint8 = reduced
        results = compute_metrics(matrix, self.class_names, self.absent_classes)
        results["num_images"] = num_images
        if saw_uint8 and self.num_classes > _MAX_UINT8_VALUES:
            results["warnings"].insert(
                0,
                f"labels were uint8 but there are {self.num_classes} classes: classes >= 256 "
                "cannot appear; were 16-bit label files cast to uint8?",
            )
        for message in results["warnings"]:
            # notes describe the data (e.g. a subset without some classes), not a likely bug
            logger.log(logging.INFO if message.startswith("note:") else logging.WARNING, message)
        return results


def compute_metrics(
    matrix: np.ndarray, class_names: Sequence[str], absent_classes: str = "zero"
) -> dict[str, Any]:
    """Metrics of a confusion matrix (see ``SemSegEvaluator.evaluate`` for the keys).

    Args:
        matrix: (C, C) integer confusion matrix, rows = ground truth, cols = prediction.
        class_names: C unique names.
        absent_classes: ``"zero"`` or ``"exclude"``.
    """
    if absent_classes not in ABSENT_CLASS_POLICIES:
        raise ValueError(
            f"absent_classes is {absent_classes!r}; expected one of {ABSENT_CLASS_POLICIES}"
        )
    matrix = np.asarray(matrix, dtype=np.int64)
    true_positives = np.diag(matrix)
    gt_pixels = matrix.sum(axis=1)
    pred_pixels = matrix.sum(axis=0)
    total = int(gt_pixels.sum())
    if total == 0:
        raise EvaluationError(
            "no pixel was evaluated: nothing was processed, or every label pixel is the ignore "
            "value (wrong ignore value?)"
        )
    union = gt_pixels + pred_pixels - true_positives
    has_gt = gt_pixels > 0
    in_mean = union > 0 if absent_classes == "zero" else has_gt
    # float64 division of exact int64 counts; classes outside the mask get NaN, never used
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = true_positives / union
        accuracy = true_positives / gt_pixels
    frequency = gt_pixels / total

    def percent(value: float) -> float:
        return float(100.0 * value)

    per_class = {
        name: {
            "IoU": percent(iou[index]) if in_mean[index] else None,
            "Acc": percent(accuracy[index]) if has_gt[index] else None,
            "gt_pixels": int(gt_pixels[index]),
            "pred_pixels": int(pred_pixels[index]),
        }
        for index, name in enumerate(class_names)
    }
    results: dict[str, Any] = {
        "mIoU": percent(iou[in_mean].mean()),
        "mAcc": percent(accuracy[has_gt].mean()),
        "pAcc": percent(true_positives.sum() / total),
        "fwIoU": percent((frequency[has_gt] * iou[has_gt]).sum()),
        "absent_classes": absent_classes,
        "num_classes_in_mean": int(in_mean.sum()),
        "num_classes": len(class_names),
        "pixels": total,
        "per_class": per_class,
        "classes_without_gt": [
            name for name, seen in zip(class_names, has_gt, strict=True) if not seen
        ],
    }
    results["warnings"] = _guard_warnings(results, pred_pixels, class_names, total)
    return results


def _guard_warnings(
    results: Mapping[str, Any], pred_pixels: np.ndarray, class_names: Sequence[str], total: int
) -> list[str]:
    """Messages about numbers that usually mean a class-order or label-mapping bug."""
    warnings = []
    if results["mIoU"] < _LOW_MIOU_PERCENT:
        warnings.append(
            f"mIoU is {results['mIoU']:.2f} % (< {_LOW_MIOU_PERCENT:g} %): check that the class "
            "names, label mapping and ignore value belong to the same benchmark"
        )
    dominant = int(np.argmax(pred_pixels))
    dominant_fraction = pred_pixels[dominant] / total
    if dominant_fraction > _DOMINANT_PREDICTION_FRACTION:
        warnings.append(
            f"{100 * dominant_fraction:.1f} % of the evaluated pixels are predicted as "
            f"{class_names[dominant]!r} (> {100 * _DOMINANT_PREDICTION_FRACTION:g} %): a "
            "background threshold or a class-name mix-up?"
        )
    missing = results["classes_without_gt"]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:_MAX_NAMES_IN_NOTE])
        hidden = len(missing) - _MAX_NAMES_IN_NOTE
        more = f" and {hidden} more" if hidden > 0 else ""
        warnings.append(
            f"note: {len(missing)} of {len(class_names)} classes have no ground-truth pixel "
            f"({shown}{more}); expected on a subset, suspicious on a full split"
        )
    return warnings


def _format_percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _markdown_cell(text: Any) -> str:
    # a "|" in a class name would split the table cell
    return str(text).replace("|", "\\|")


def _protocol_lines(protocol: Mapping[str, Any]) -> list[str]:
    """Markdown bullets of the one-line scalar entries of ``protocol``, one level of nesting."""
    lines = []
    for key, value in protocol.items():
        entries = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub_key, sub_value in entries:
            name = key if sub_key is None else f"{key}.{sub_key}"
            one_line = not (isinstance(sub_value, str) and "\n" in sub_value)
            # multi-line text (a config dump) and containers stay in results.json only
            if one_line and (isinstance(sub_value, str | int | float | bool) or sub_value is None):
                lines.append(f"- {_markdown_cell(name)}: {_markdown_cell(sub_value)}")
    return lines


def results_to_markdown(
    results: Mapping[str, Any], protocol: Mapping[str, Any] | None = None
) -> str:
    """Render ``evaluate()``'s results as Markdown: a summary table and a per-class table.

    Args:
        results: the dict returned by ``SemSegEvaluator.evaluate``.
        protocol: optional protocol info; its one-line scalar entries (also those of dicts
            inside it) are listed under the summary.
    """
    lines = ["# Semantic segmentation results", ""]
    lines += ["| mIoU | mAcc | pAcc | fwIoU | classes in mean | absent classes | images | pixels |"]
    lines += ["|---:|---:|---:|---:|---:|---|---:|---:|"]
    lines.append(
        f"| {results['mIoU']:.2f} | {results['mAcc']:.2f} | {results['pAcc']:.2f} "
        f"| {results['fwIoU']:.2f} | {results['num_classes_in_mean']} / {results['num_classes']} "
        f"| {results['absent_classes']} | {results.get('num_images', '–')} "
        f"| {results['pixels']} |"
    )
    protocol_lines = _protocol_lines(protocol or {})
    if protocol_lines:
        lines += ["", "## Protocol", ""] + protocol_lines
    if results.get("warnings"):
        lines += ["", "## Warnings", ""]
        lines += [f"- {_markdown_cell(message)}" for message in results["warnings"]]
    lines += ["", "## Per class", ""]
    lines += ["| class | IoU | Acc | GT pixels | predicted pixels |", "|---|---:|---:|---:|---:|"]
    for name, row in results["per_class"].items():
        lines.append(
            f"| {_markdown_cell(name)} | {_format_percent(row['IoU'])} "
            f"| {_format_percent(row['Acc'])} | {row['gt_pixels']} | {row['pred_pixels']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    results: Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``results.json`` (results and ``extra`` in one object) and ``results.md``, atomically.

    Args:
        results: the dict returned by ``SemSegEvaluator.evaluate``.
        output_dir: folder, created if needed.
        extra: protocol info added to the JSON's top level, e.g. ``{"protocol": {"benchmark":
            ..., "class_file_sha256": ..., "config": ...}}``; its keys must not repeat result
            keys. Its one-line scalar entries are also listed in the Markdown.

    Returns:
        the paths of ``results.json`` and ``results.md``.

    Raises:
        ValueError: a key of ``extra`` is also a result key.
    """
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(results))
    if clashes:
        # never let protocol info overwrite a metric silently
        raise ValueError(f"extra has keys {clashes} that the results already have")
    output_dir = Path(output_dir)
    json_path = output_dir / "results.json"
    markdown_path = output_dir / "results.md"
    write_json(json_path, {**results, **extra})
    markdown = results_to_markdown(results, extra)
    atomic_write_text(markdown_path, markdown)
    return json_path, markdown_path
