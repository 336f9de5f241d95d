"""class_coverage measures the model: the share of classes whose validation recall reaches the bound."""
import numpy as np
import pytest

from pillsnap.metrics.classification import class_coverage


def test_every_class_having_a_val_photo_is_not_coverage():
    """The old measure (classes with a val photo / classes) was ~1.0 by construction; a model that answers one
    class for everything covers one class."""
    y_true = np.repeat(np.arange(10), 5)
    always_zero = np.zeros_like(y_true)
    got = class_coverage(y_true, always_zero, 10, 0.5)
    assert got["class_coverage"] == pytest.approx(0.1) and got["classes_covered"] == 1


def test_recall_bound_and_classes_without_val_photos():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 2, 0, 0])  # class 0 recall 1.0, class 1 0.5, class 2 0.0; class 3 never seen
    got = class_coverage(y_true, y_pred, 4, 0.5)
    assert got["classes_covered"] == 2 and got["class_coverage"] == pytest.approx(0.5)
    assert got["classes_without_val"] == 1
    assert class_coverage(y_true, y_pred, 4, 0.6)["classes_covered"] == 1
