"""CLOC's region evaluation (specs/cloc.md "Evaluation"), sharded across processes.

- recognition: every non-crowd ground-truth box is classified against the set's category
  names (no templates; argmax cosine); mean per-class accuracy (mAcc) over the categories with
  at least one box, and the overall accuracy.
- retrieval: regions with captions; recall@k region -> text (its caption among all distinct
  captions of the set) and text -> region (one of that caption's regions among all regions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ovseg.data.image_io import read_image
from ovseg.io import atomic_write_text
from ovseg.methods.cloc.data import (
    annotation_box,
    category_names,
    image_path,
    load_coco,
    region_text,
    resolve_region_set,
)
from ovseg.methods.cloc.dist import all_gather_objects, all_reduce_sum, rank, shard, world_size
from ovseg.modeling.prompter import PromptError

logger = logging.getLogger(__name__)
RECALL_AT = (1, 5, 10)


class RegionRecognitionEvaluator:
    """reset / process / evaluate of region classification, reduced across processes.

    Args:
        class_names: the C categories.
    """

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros(len(self.class_names), dtype=torch.int64)
        self.total = torch.zeros(len(self.class_names), dtype=torch.int64)

    def process(self, predicted, target) -> None:
        """(R,) predicted and (R,) true class indices of some regions."""
        predicted = torch.as_tensor(predicted, dtype=torch.int64).flatten()
        target = torch.as_tensor(target, dtype=torch.int64).flatten()
        size = len(self.class_names)
        self.total += torch.bincount(target, minlength=size)
        self.correct += torch.bincount(target[predicted == target], minlength=size)

    def evaluate(self) -> dict[str, Any]:
        """{"mAcc", "accuracy" (percent), "classes_evaluated", "regions", "per_class_acc"}; the
        counts summed over processes first, so every process gets the same numbers."""
        counts = torch.stack([self.correct, self.total])
        all_reduce_sum(counts)
        correct, total = counts[0], counts[1]
        present = total > 0
        per_class = torch.where(present, correct.double() / total.clamp(min=1).double(),
                                torch.zeros_like(correct, dtype=torch.float64))
        mean = float(per_class[present].mean()) * 100 if bool(present.any()) else 0.0
        overall = float(correct.sum()) / max(int(total.sum()), 1) * 100
        return {
            "mAcc": mean, "accuracy": overall, "classes_evaluated": int(present.sum()),
            "regions": int(total.sum()),
            "per_class_acc": {name: float(per_class[i]) * 100
                              for i, name in enumerate(self.class_names) if bool(present[i])},
        }


def recall_at_k(similarity: np.ndarray, positives: list[set[int]], ks=RECALL_AT) -> dict:
    """Percent of rows whose top-k columns hold one of its ``positives``, per k."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    out = {}
    for k in ks:
        hits = [bool(positives[i] & set(order[i, :k].tolist())) for i in range(len(order))]
        out[f"R@{k}"] = 100.0 * float(np.mean(hits)) if hits else 0.0
    return out


def evaluate_region_set(model, name: str, cfg, output_dir) -> dict | None:
    """Evaluate ``model`` on the region set ``name``; rank 0 returns and writes the results
    (``<output_dir>/<name>/results.json``)."""
    region_set = resolve_region_set(name, cfg.model.cloc, cfg.datasets.root or None)
    coco = load_coco(region_set.annotations)
    ids, names = category_names(coco)
    by_id = dict(zip(ids, names, strict=True))
    index_of = {cat: i for i, cat in enumerate(ids)}
    image_ids = sorted(coco.getImgIds())
    positions = shard(len(image_ids))
    evaluator = RegionRecognitionEvaluator(names)
    retrieval: list[tuple[np.ndarray, str]] = []
    skipped = 0
    model.eval()
    for position in tqdm(positions, desc=f"eval {name}", unit="img", disable=rank() != 0):
        info = coco.loadImgs(image_ids[position])[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
                if not a.get("iscrowd", 0)]
        if region_set.task == "retrieval":
            anns = [a for a in anns if region_text(a, by_id, "caption")]
        if not anns:
            continue
        state = model.encode(read_image(image_path(region_set.image_dir, info)))
        kept = anns
        try:
            boxes = torch.tensor([annotation_box(a) for a in kept], dtype=torch.float64)
            embeddings = model.embed_regions(state, boxes=boxes)
        except PromptError:  # find the boxes the image cannot take, one by one
            good = []
            for ann in kept:
                try:
                    model.embed_regions(state, boxes=[annotation_box(ann)])
                    good.append(ann)
                except PromptError:
                    skipped += 1
            kept = good
            if not kept:
                continue
            embeddings = model.embed_regions(
                state, boxes=torch.tensor([annotation_box(a) for a in kept]))
        if region_set.task == "recognition":
            text = model.class_text(names).to(embeddings)
            predicted = (embeddings @ text.T).argmax(1).cpu()
            evaluator.process(predicted, [index_of[a["category_id"]] for a in kept])
        else:
            for ann, row in zip(kept, embeddings.cpu().numpy(), strict=True):
                retrieval.append((row, region_text(ann, by_id, "caption")))
    if skipped:
        logger.warning("%s: %d boxes of zero area inside their image were skipped", name,
                       skipped)
    if region_set.task == "recognition":
        results = evaluator.evaluate()
    else:
        gathered = [item for part in all_gather_objects(retrieval) for item in part]
        if rank() != 0:
            return None
        results = _retrieval_results(model, gathered)
    if rank() != 0:
        return None
    results["protocol"] = {"region_set": name, "task": region_set.task,
                           "annotations": str(region_set.annotations),
                           "extractor": model.settings.region_extractor,
                           "processes": world_size()}
    folder = Path(output_dir) / name
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2) + "\n")
    headline = {k: round(v, 2) for k, v in results.items() if isinstance(v, float)}
    logger.info("%s: %s", name, headline)
    return results


def _retrieval_results(model, regions: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    if not regions:
        return {"regions": 0}
    captions = sorted({caption for _, caption in regions})
    column = {caption: i for i, caption in enumerate(captions)}
    region_z = torch.from_numpy(np.stack([row for row, _ in regions]))
    text_z = model.class_text(captions).cpu().to(region_z)
    similarity = (region_z @ text_z.T).numpy()
    owner = [column[caption] for _, caption in regions]
    r2t = recall_at_k(similarity, [{c} for c in owner])
    t2r = recall_at_k(similarity.T, [{i for i, c in enumerate(owner) if c == j}
                                     for j in range(len(captions))])
    out: dict[str, Any] = {f"r2t_{k}": v for k, v in r2t.items()}
    out.update({f"t2r_{k}": v for k, v in t2r.items()})
    out["regions"], out["captions"] = len(regions), len(captions)
    return out
