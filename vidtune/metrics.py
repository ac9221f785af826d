"""Classification metrics from logits and labels, defined as scikit-learn defines them.

- ``mean_class_acc`` = sklearn ``balanced_accuracy_score``: recall averaged over classes present
  in the labels.
- ``f1_macro`` = sklearn ``f1_score(average="macro")``: F1 averaged over classes present in the
  labels or the predictions (a class never seen nor predicted is not counted).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def topk_accuracy(scores: np.ndarray, y_true: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    topk = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(topk == np.asarray(y_true)[:, None], axis=1))) if len(y_true) else 0.0


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"recall": recall, "precision": precision, "f1": f1, "support": support, "predicted": predicted}


def classification_metrics(scores: np.ndarray, y_true: np.ndarray, class_names: list[str]) -> tuple[dict, dict]:
    """Scalar metrics (``top1``, ``top5``, ``mean_class_acc``, ``f1_macro``) and details
    (``confusion_matrix``, per-class ``f1``/``acc`` keyed by class name)."""
    num_classes = len(class_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = scores.argmax(axis=1) if len(scores) else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    pc = per_class(cm)
    present = pc["support"] > 0
    seen = present | (pc["predicted"] > 0)
    scalars = {
        "top1": float(np.mean(y_pred == y_true)) if len(y_true) else 0.0,
        "top5": topk_accuracy(scores, y_true, 5),
        "mean_class_acc": float(pc["recall"][present].mean()) if present.any() else 0.0,
        "f1_macro": float(pc["f1"][seen].mean()) if seen.any() else 0.0,
    }
    details = {
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
        "per_class_f1": {n: float(v) for n, v in zip(class_names, pc["f1"])},
        "per_class_acc": {n: float(v) for n, v in zip(class_names, pc["recall"])},
        "support": {n: int(v) for n, v in zip(class_names, pc["support"])},
    }
    return scalars, details


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (= sklearn ``roc_auc_score``): the probability that a random
    positive outscores a random negative, ties counting one half. NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (Mann-Whitney U).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# Characters a metric key may hold in MLflow (its validation's `[/\w.\- :]`), less '/' (it nests
# keys and must not make `..` paths) and ':' (refused by servers on Windows).
_KEY_REFUSED = re.compile(r"[^\w.\- ]+")
KEY_MAX_CHARS = 64


def class_key(name: str, hash_digits: int = 6) -> str:
    """The part of a per-class metric key (``val_acc/<key>``) that stands for class ``name``.

    A name MLflow takes as it is stays itself; any other gets a readable slug (refused characters
    become ``_``, ends trimmed, long names cut) plus ``-`` and the start of its name's SHA-1, so two
    names never meet on one key (``a,b`` vs ``a_b``) and a name maps the same way in every sweep."""
    slug = _KEY_REFUSED.sub("_", name).strip(" _")[:KEY_MAX_CHARS].rstrip(" ")
    if slug == name and name.strip("."):
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:hash_digits]
    return f"{slug if slug.strip('.') else 'class'}-{digest}"


def class_keys(class_names: list[str]) -> dict[str, str]:
    """``{name: key}`` for a data set's classes, every key distinct (see ``class_key``)."""
    taken = {n for n in class_names if class_key(n) == n}
    keys = {}
    for name in class_names:
        key = name if name in taken else next(k for k in (class_key(name, d) for d in (6, 10, 16, 40)) if k not in taken)
        taken.add(key)
        keys[name] = key
    return keys
