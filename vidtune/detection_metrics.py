"""Temporal action detection metrics, computed as the ActivityNet / THUMOS-14 evaluation computes them.

``average_precision_at_tious`` follows ``compute_average_precision_detection`` of the
ActivityNet evaluation kit (also used by ActionFormer and AdaTAD): per class, predictions are
taken in decreasing score order; each one is matched to the unmatched ground-truth instance of
the same video with the highest tIoU, if that tIoU reaches the threshold, else it is a false
positive (a second detection of an already matched instance is a false positive). AP is the
interpolated area under the precision/recall curve, recall counted over *all* ground-truth
instances of the class. mAP averages AP over the classes that have ground truth; a class with
ground truth and no predictions scores 0.
"""

from __future__ import annotations

import numpy as np

TIOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # THUMOS-14's standard set


def segment_tiou(segment: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """tIoU of one ``[start, end]`` segment with each row of ``candidates`` ``(N, 2)``."""
    inter = np.clip(np.minimum(segment[1], candidates[:, 1]) - np.maximum(segment[0], candidates[:, 0]), 0, None)
    union = (candidates[:, 1] - candidates[:, 0]) + (segment[1] - segment[0]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision envelope (precision made monotone from the right), as ActivityNet."""
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    idx = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def average_precision_at_tious(gt: np.ndarray, pred: np.ndarray, tious=TIOU_THRESHOLDS) -> np.ndarray:
    """AP of one class at each tIoU threshold.

    ``gt``: ``(G, 3)`` rows ``[video, start, end]``; ``pred``: ``(P, 4)`` rows
    ``[video, start, end, score]``. Videos are any numeric ids. Returns ``(len(tious),)``.
    """
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 3)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    ap = np.zeros(len(tious))
    if len(gt) == 0 or len(pred) == 0:
        return ap
    # Stable order: equal scores keep their input order, so results do not depend on the sort.
    pred = pred[np.argsort(-pred[:, 3], kind="mergesort")]
    gt_rows_by_video: dict[float, np.ndarray] = {}
    for v in np.unique(gt[:, 0]):
        gt_rows_by_video[float(v)] = np.flatnonzero(gt[:, 0] == v)
    locked = np.full((len(tious), len(gt)), False)
    tp = np.zeros((len(tious), len(pred)))
    fp = np.zeros((len(tious), len(pred)))
    for p, (video, start, end, _score) in enumerate(pred):
        rows = gt_rows_by_video.get(float(video))
        if rows is None:
            fp[:, p] = 1  # no ground truth of this class in that video
            continue
        tiou = segment_tiou(np.array([start, end]), gt[rows, 1:3])
        order = np.argsort(-tiou, kind="mergesort")
        for t, threshold in enumerate(tious):
            for j in order:
                if tiou[j] < threshold:
                    break
                if locked[t, rows[j]]:
                    continue  # already matched: try the next best instance
                tp[t, p] = 1
                locked[t, rows[j]] = True
                break
            if not tp[t, p]:
                fp[t, p] = 1
    tp_cum, fp_cum = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    recall = tp_cum / len(gt)
    precision = tp_cum / (tp_cum + fp_cum)
    for t in range(len(tious)):
        ap[t] = interpolated_ap(precision[t], recall[t])
    return ap


def detection_map(gt: np.ndarray, pred: np.ndarray, class_names: list[str], tious=TIOU_THRESHOLDS) -> tuple[dict, dict]:
    """mAP over classes at every tIoU and their mean.

    ``gt``: ``(G, 4)`` rows ``[video, start, end, class]``; ``pred``: ``(P, 5)`` rows
    ``[video, start, end, class, score]``. Returns scalars ``{"map": mean over tIoUs,
    "map_0.3": ..., ...}`` and details (per-class AP at each tIoU, instance counts). Classes with
    no ground truth are left out of the mean (their AP is reported as None).
    """
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 5)
    per_class: dict[str, dict] = {}
    aps = []
    for k, name in enumerate(class_names):
        g = gt[gt[:, 3] == k][:, :3]
        p = pred[pred[:, 3] == k][:, [0, 1, 2, 4]]
        if len(g) == 0:
            per_class[name] = {"ap": None, "num_gt": 0, "num_pred": len(p)}
            continue
        ap = average_precision_at_tious(g, p, tious)
        aps.append(ap)
        per_class[name] = {"ap": {f"{t:.1f}": float(a) for t, a in zip(tious, ap)}, "mean_ap": float(ap.mean()),
                           "num_gt": len(g), "num_pred": len(p)}
    table = np.stack(aps) if aps else np.zeros((0, len(tious)))  # (classes with GT, tIoUs)
    by_tiou = table.mean(axis=0) if len(table) else np.zeros(len(tious))
    scalars = {"map": float(by_tiou.mean())}
    scalars.update({f"map_{t:.1f}": float(v) for t, v in zip(tious, by_tiou)})
    details = {"tious": list(tious), "per_class_ap": per_class, "num_gt": len(gt), "num_pred": len(pred)}
    return scalars, details


def nms_1d(segments: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5, soft: bool = False,
           sigma: float = 0.5, min_score: float = 1e-3, max_keep: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(Soft-)NMS of ``(N, 2)`` segments of one class. Hard NMS drops every segment overlapping a
    kept one by more than ``iou_threshold``; soft-NMS (Gaussian, as ActionFormer's THUMOS setting)
    decays their scores by ``exp(-tiou^2 / sigma)`` instead, and drops those under ``min_score``.
    Returns the kept segments and scores, best first."""
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).copy()
    keep_seg, keep_score = [], []
    alive = np.flatnonzero(scores >= min_score) if soft else np.arange(len(scores))
    while len(alive) and len(keep_seg) < max_keep:
        best = alive[np.argmax(scores[alive])]
        keep_seg.append(segments[best])
        keep_score.append(scores[best])
        alive = alive[alive != best]
        if not len(alive):
            break
        tiou = segment_tiou(segments[best], segments[alive])
        if soft:
            scores[alive] *= np.exp(-(tiou**2) / sigma)
            alive = alive[scores[alive] >= min_score]
        else:
            alive = alive[tiou <= iou_threshold]
    if not keep_seg:
        return np.zeros((0, 2)), np.zeros(0)
    return np.stack(keep_seg), np.asarray(keep_score)
