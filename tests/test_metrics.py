from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from vidtune.metrics import classification_metrics, confusion_matrix, topk_accuracy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    y = rng.integers(0, num_classes - 1, size=200)  # class 6 never occurs in the labels
    scores = rng.normal(size=(200, num_classes))
    scores[np.arange(200), y] += rng.uniform(0, 2.5, size=200)  # better than chance
    names = [f"c{i}" for i in range(num_classes)]
    scalars, details = classification_metrics(scores, y, names)
    pred = scores.argmax(1)
    assert scalars["top1"] == pytest.approx(skm.accuracy_score(y, pred))
    assert scalars["top5"] == pytest.approx(skm.top_k_accuracy_score(y, scores, k=5, labels=range(num_classes)))
    assert scalars["mean_class_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert scalars["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    per_class = skm.f1_score(y, pred, average=None, labels=range(num_classes), zero_division=0)
    assert [details["per_class_f1"][n] for n in names] == pytest.approx(per_class)
    assert details["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(num_classes)).tolist()


def test_imbalanced_majority_predictor_exposes_low_mean_class_accuracy():
    # The report-000 failure: top-1 looks fine while rare classes are never predicted.
    y = np.array([0] * 54 + list(range(1, 14)) * 3 + [1] * 7)
    scores = np.zeros((len(y), 14))
    scores[:, 0] = 1.0
    s, _ = classification_metrics(scores, y, [str(i) for i in range(14)])
    assert s["top1"] > 0.5 and s["mean_class_acc"] == pytest.approx(1 / 14)


def test_confusion_and_topk_small_cases():
    assert confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 1]), 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    scores = np.array([[0.1, 0.5, 0.4], [0.8, 0.15, 0.05]])
    assert topk_accuracy(scores, np.array([2, 2]), 1) == 0.0
    assert topk_accuracy(scores, np.array([2, 2]), 2) == 0.5
    assert topk_accuracy(scores, np.array([2, 2]), 10) == 1.0  # k capped at the class count


NAMES = ["driver's seat", "lift (arm)", "a,b", "a_b", "a b", "R&D", "café", "übung", "走路", "left/right", " walk",
         "walk", "walk ", "..", ".", "", "x:y", "$5", "a" * 300, "tab\there", "new\nline", "q?", "#1", "%", "a\\b"]


def test_class_keys_are_accepted_by_mlflow_distinct_and_stable():
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name

    from vidtune.metrics import class_key, class_keys

    keys = class_keys(NAMES)
    assert len(set(keys.values())) == len(NAMES)  # "a,b" and "a_b", " walk" and "walk" never meet
    for name, key in keys.items():
        _validate_metric_name(f"val_acc/{key}")  # raises on any key MLflow refuses
        assert "/" not in key and ":" not in key and len(key) <= 80
    # A name MLflow takes stays itself; any other keeps a readable slug and a hash suffix.
    assert [keys[n] for n in ("a_b", "a b", "café", "übung", "走路", "walk")] == ["a_b", "a b", "café", "übung", "走路", "walk"]
    assert keys["driver's seat"].startswith("driver_s seat-") and keys["lift (arm)"].startswith("lift _arm-")
    assert keys["a,b"].startswith("a_b-") and keys["R&D"].startswith("R_D-") and keys["left/right"].startswith("left_right-")
    # Stable: the same name gives the same key in any data set, in any order.
    assert class_keys(list(reversed(NAMES))) == keys
    assert all(class_key(n) == keys[n] for n in NAMES)
    # Every character MLflow refuses is mapped away.
    refused = [chr(c) for c in range(32, 0x3000) if not _accepts(f"val_acc/x{chr(c)}x", _validate_metric_name, MlflowException)]
    assert "'" in refused and "&" in refused and "(" in refused
    for ch in refused:
        _validate_metric_name(f"val_acc/{class_key(f'x{ch}x')}")


def _accepts(key, validate, error) -> bool:
    try:
        validate(key)
        return True
    except error:
        return False


def test_class_keys_stay_distinct_when_a_real_name_looks_like_a_mapped_one():
    from vidtune.metrics import class_key, class_keys

    lookalike = class_key("a,b")  # a class literally named like the mapping of another
    keys = class_keys(["a,b", lookalike])
    assert keys[lookalike] == lookalike and keys["a,b"] != lookalike and keys["a,b"].startswith("a_b-")
