"""The report's scores against scikit-learn's (a dev dependency only; the report needs numpy alone)."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from vit.report import append_metrics, per_class_scores


@pytest.mark.parametrize("seed", range(3))
def test_per_class_scores_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    k = 5
    labels = rng.integers(0, k - 1, 300)  # the last class never occurs: support 0
    probs = rng.dirichlet(np.ones(k), 300)
    probs[np.arange(150), labels[:150]] += 1.0  # better than chance
    probs /= probs.sum(1, keepdims=True)
    ours = per_class_scores(probs, labels, [f"c{i}" for i in range(k)])
    pred = probs.argmax(1)
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=range(k), zero_division=0)
    for i in range(k):
        row = ours["per_class"][f"c{i}"]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i]), abs=1e-4
        )
    present = [i for i in range(k) if s[i]]
    mp, mr, mf, _ = precision_recall_fscore_support(labels, pred, labels=present, average="macro", zero_division=0)
    assert ours["macro"]["precision"] == pytest.approx(mp, abs=1e-3)
    assert ours["macro"]["recall"] == pytest.approx(mr, abs=1e-3)
    assert ours["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-4)


def test_metrics_rows_are_replaced_after_a_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    for epoch, loss in ((1, 0.9), (2, 0.8), (3, 0.7), (2, 0.5)):  # a resume redoes epoch 2
        append_metrics(path, dict(epoch=epoch, loss=loss))
    assert path.read_text().splitlines() == ["epoch,loss", "1,0.9", "2,0.5"]
