"""Calibration and the fused policy (raee/calibration.py, raee/exit_policy.py): hand-computed cases."""

import numpy as np
import pytest

from raee.calibration import Calibration, fit_calibration
from raee.exit_policy import (
    CalibratedExitPolicy,
    FusedPolicy,
    earliest_reliable_layer,
    fuse,
    fused_reliability,
    knn_prior,
    neighbour_weights,
)
from raee.records import Neighbours

# Two training examples, two layers, two classes. Layer 0 says class 0 for both (a constant layer);
# layer 1 separates them.
TRAIN = np.array([[[0.9, 0.1], [0.8, 0.2]],
                  [[0.7, 0.3], [0.2, 0.8]]])


def test_fit_is_the_per_layer_mean_and_apply_divides_it_out():
    cal = fit_calibration(TRAIN)
    np.testing.assert_allclose(cal.bias, [[0.8, 0.2], [0.5, 0.5]])
    assert cal.n_examples == 2
    out = cal.apply(TRAIN)
    # layer 0, example 0: (0.9/0.8, 0.1/0.2) = (1.125, 0.5) -> / 1.625
    np.testing.assert_allclose(out[0, 0], [1.125 / 1.625, 0.5 / 1.625])
    # layer 0, example 1: (0.875, 1.5) -> the constant layer now ranks example 1 as class 1
    np.testing.assert_allclose(out[1, 0], [0.875 / 2.375, 1.5 / 2.375])
    np.testing.assert_allclose(out[:, 1], TRAIN[:, 1])  # an unbiased layer is left alone
    assert (TRAIN[:, 0].argmax(-1) == 0).all() and out[:, 0].argmax(-1).tolist() == [0, 1]


def test_apply_at_uses_each_rows_own_layer_and_json_round_trips():
    cal = fit_calibration(TRAIN)
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    out = cal.apply_at(probs, np.array([0, 1]))
    np.testing.assert_allclose(out[0], [1.125 / 1.625, 0.5 / 1.625])
    np.testing.assert_allclose(out[1], [0.9, 0.1])
    back = Calibration.from_json(cal.to_json())
    np.testing.assert_array_equal(back.bias, cal.bias)
    assert back.n_examples == 2


def test_a_class_a_layer_never_predicts_does_not_divide_by_zero():
    cal = fit_calibration(np.array([[[1.0, 0.0]], [[1.0, 0.0]]]))
    out = cal.apply(np.array([[[0.5, 0.5]]]))
    assert np.isfinite(out).all() and out[0, 0].argmax() == 1


def test_bad_calibration_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="non-empty"):
        fit_calibration(np.zeros((0, 3, 2)))
    with pytest.raises(ValueError, match=r"\(N, 2, 2\)"):
        fit_calibration(TRAIN).apply(np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="layers must lie"):
        fit_calibration(TRAIN).apply_at(np.zeros((1, 2)), np.array([2]))


# Three neighbours at squared distances 1, 2, 4 -> Eq. 5 weights 1, 0.5, 0.25; labels 0, 0, 1.
DIST = np.array([[1.0, 2.0, 4.0]])
LABELS = np.array([[0, 0, 1]])
W = np.array([[1.0, 0.5, 0.25]])
# Per-layer distributions of the neighbours: layer 0 uninformative, layer 1 right for all three.
LAYERS = np.array([[[[0.5, 0.5], [0.6, 0.4]],
                    [[0.5, 0.5], [0.45, 0.55]],
                    [[0.5, 0.5], [0.2, 0.8]]]])


def test_knn_prior_and_leave_one_out_by_hand():
    np.testing.assert_allclose(neighbour_weights(DIST), W)
    prior, loo = knn_prior(W, LABELS, 2, alpha=1.0)
    np.testing.assert_allclose(prior, [[2.5 / 3.75, 1.25 / 3.75]])  # votes (1.5, 0.25) + 1 each
    np.testing.assert_allclose(loo[0, 0], [1.5 / 2.75, 1.25 / 2.75])  # without neighbour 0's vote (1 for 0)
    np.testing.assert_allclose(loo[0, 1], [2.0 / 3.25, 1.25 / 3.25])
    np.testing.assert_allclose(loo[0, 2], [2.5 / 3.5, 1.0 / 3.5])  # neighbour 2 never votes for itself


def test_fused_reliability_and_exit_by_hand():
    r = fused_reliability(W, LABELS, LAYERS, beta=1.0, alpha=1.0)
    # layer 0: fused = loo prior -> class 0 for all three; neighbour 2 (label 1, w 0.25) is wrong
    # layer 1: (0.6, 0.4) * loo0 -> 0 right; (0.45, 0.55) * (0.615, 0.385) = (0.277, 0.212) -> 0 right;
    #          (0.2, 0.8) * (0.714, 0.286) = (0.143, 0.229) -> 1 right
    np.testing.assert_allclose(r, [[1.5 / 1.75, 1.0]])
    assert earliest_reliable_layer(r, slack=0.0).tolist() == [1]
    assert earliest_reliable_layer(r, slack=0.15).tolist() == [0]  # 0.857 >= 1 - 0.15: exit earlier
    assert earliest_reliable_layer(np.zeros((1, 2)), slack=0.0).tolist() == [1]  # nothing known: full model


def test_fuse_is_a_product_of_experts():
    np.testing.assert_allclose(fuse(np.array([0.3, 0.7]), np.array([2 / 3, 1 / 3]), 1.0),
                               [0.2 / (0.2 + 0.7 / 3), (0.7 / 3) / (0.2 + 0.7 / 3)])
    np.testing.assert_allclose(fuse(np.array([0.3, 0.7]), np.array([0.9, 0.1]), 0.0), [0.3, 0.7])


def test_fused_policy_end_to_end_on_one_query():
    nb = Neighbours(ids=np.array([[1, 2, 3, -1]]), distances=np.array([[1.0, 2.0, 4.0, np.inf]]),
                    exit_probs=np.zeros((1, 4, 2)), labels=np.array([[0, 0, 1, -1]]),
                    layer_probs=np.concatenate([LAYERS, np.zeros((1, 1, 2, 2))], axis=1))
    policy = FusedPolicy(k=12, beta=1.0, slack=0.0, alpha=1.0)
    assert policy.calibrated
    assert policy.exit_layers(nb).tolist() == [1]  # padding ignored
    np.testing.assert_allclose(policy.final_probs(np.array([[0.3, 0.7]]), nb),
                               [[0.2 / (0.2 + 0.7 / 3), (0.7 / 3) / (0.2 + 0.7 / 3)]])
    no_dists = Neighbours(nb.ids, nb.distances, nb.exit_probs, nb.labels)
    with pytest.raises(ValueError, match="rebuild"):
        policy.exit_layers(no_dists)
    assert CalibratedExitPolicy().calibrated


def test_fused_policy_rejects_bad_knobs():
    for bad in ({"beta": -1.0}, {"slack": 1.5}, {"alpha": 0.0}, {"k": 0}):
        with pytest.raises(ValueError):
            FusedPolicy(**bad)
