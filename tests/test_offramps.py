"""Trained off-ramps (raee/offramps.py): hand-computed heads, the fit against scikit-learn, cross-fitting."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from raee.heads import ExitHead
from raee.offramps import CrossFit, OffRamps, cross_fit, fit_offramps


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: BLAS threads only add overhead here (OpenBLAS's spin up to 10x on a loaded machine)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# A hand-built head: 2 layers (L = 1), H = 2, C = 3. Layer 1 standardises x to ((x0 - 1) / 2, (x1 + 1) / 4).
HAND = OffRamps(
    mean=np.array([[0.0, 0.0], [1.0, -1.0]]),
    scale=np.array([[1.0, 1.0], [2.0, 4.0]]),
    weight=np.array([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                     [[1.0, -1.0, 0.0], [0.0, 2.0, 0.0]]]),
    bias=np.array([[0.0, 0.0, 0.0], [0.0, 0.0, np.log(2.0)]]),
)


def _states(n: int, n_layers1: int, hidden: int, seed: int) -> np.ndarray:
    """Correlated float32 states; layer 0 identical for every input, as the embedding of the last token is."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, n_layers1, hidden)) @ rng.standard_normal((hidden, hidden))).astype(np.float32)
    x[:, 0] = x[0, 0]
    return x


def test_probs_by_hand():
    # x = (3, 3) at layer 1 -> z = (1, 1) standardised -> logits (1 + 0, -1 + 2, 0 + log 2) = (1, 1, log 2)
    p = HAND.probs(1, np.array([[3.0, 3.0]]))
    np.testing.assert_allclose(p, np.array([[np.e, np.e, 2.0]]) / (2 * np.e + 2.0))
    np.testing.assert_allclose(HAND.probs(0, np.array([[5.0, -7.0]])), [[1 / 3, 1 / 3, 1 / 3]])  # zero weights
    both = HAND.layer_probs(np.array([[[5.0, -7.0], [3.0, 3.0]]]))  # (N=1, L+1=2, H=2)
    np.testing.assert_allclose(both[0], [[1 / 3, 1 / 3, 1 / 3], p[0]])
    assert (HAND.n_layers, HAND.hidden_size, HAND.n_classes) == (1, 2, 3)


def test_an_offramps_is_an_exit_head_with_a_stable_name():
    assert isinstance(HAND, ExitHead)
    # sha256 of the float64 tensors: the same in every process and on every machine
    assert HAND.name == "offramp:c85f20ffd1f2"
    moved = OffRamps(HAND.mean, HAND.scale, HAND.weight + 1e-9, HAND.bias)
    assert moved.name != HAND.name and moved.name.startswith("offramp:")
    with pytest.raises(ValueError, match="read-only"):
        HAND.weight[0, 0, 0] = 1.0  # frozen weights keep the name true


def test_bytes_and_file_round_trips_give_identical_probs(tmp_path):
    head = fit_offramps(_states(60, 3, 5, seed=0), np.arange(60) % 3, 3)
    x = _states(7, 3, 5, seed=1)
    back = OffRamps.from_bytes(head.to_bytes())
    assert back.name == head.name
    np.testing.assert_array_equal(back.layer_probs(x), head.layer_probs(x))
    head.save(tmp_path / "offramps.safetensors")
    loaded = OffRamps.load(tmp_path / "offramps.safetensors")
    np.testing.assert_array_equal(loaded.probs(2, x[:, 2]), head.probs(2, x[:, 2]))
    assert b"raee.offramps/1" in head.to_bytes()  # a safetensors header with our format tag, not a pickle


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (4, 3, 2), elements=st.floats(-1e3, 1e3)),
       arrays(np.float64, (3, 2, 4), elements=st.floats(-50, 50)),
       arrays(np.float64, (3, 4), elements=st.floats(-50, 50)))
def test_probability_rows_sum_to_one_and_layer_probs_agrees_with_probs(states, weight, bias):
    head = OffRamps(np.zeros((3, 2)), np.ones((3, 2)), weight, bias)
    lp = head.layer_probs(states)
    assert lp.shape == (4, 3, 4) and np.isfinite(lp).all() and (lp >= 0).all()
    np.testing.assert_allclose(lp.sum(axis=-1), 1.0)
    for layer in range(3):
        np.testing.assert_allclose(head.probs(layer, states[:, layer]), lp[:, layer], atol=1e-12)


def test_validation_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"mean and scale .* \(2, 2\) and \(3, 2\)"):
        OffRamps(np.zeros((2, 2)), np.ones((3, 2)), np.zeros((2, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"weight must be \(L\+1, H, C\) = \(2, 2, 'C'\)"):
        OffRamps(np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 3, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"bias must be \(L\+1, C\) = \(2, 3\), got \(2, 2\)"):
        OffRamps(np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="scale must be > 0"):
        OffRamps(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite entry on every layer"):
        OffRamps(np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2, 2)), np.full((2, 2), -np.inf))
    with pytest.raises(ValueError, match=r"states must be \(n, H\) = \(n, 2\), got shape \(4, 3\)"):
        HAND.probs(1, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"layer_idx must lie in \[0, 1\], got 2"):
        HAND.probs(2, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(N, L\+1, H\) = \(N, 2, 2\), got shape \(4, 3, 2\)"):
        HAND.layer_probs(np.zeros((4, 3, 2)))
    with pytest.raises(ValueError, match="not a safetensors file"):
        OffRamps.from_bytes(b"not safetensors at all")
    from safetensors.numpy import save
    with pytest.raises(ValueError, match="holds the tensors"):
        OffRamps.from_bytes(save({"mean": np.zeros((2, 2))}))


@pytest.mark.parametrize(("n_classes", "sklearn_c"), [(3, 0.5), (2, 1.0)])
def test_the_fit_is_scikit_learns_logistic_regression(n_classes, sklearn_c):
    # Same objective: sum of cross-entropies + (l2 / 2) ||W||^2 on standardised states, l2 = 2 here. sklearn's
    # multinomial fit (C >= 3) penalises all C columns, so C = 1 / l2; its binary fit has one column w = w1 - w0,
    # and our optimum has w0 = -w1, so ||W||^2 = ||w||^2 / 2 and C = 2 / l2.
    x = _states(300, 3, 8, seed=2)
    y = np.random.default_rng(3).integers(0, n_classes, 300)
    head = fit_offramps(x, y, n_classes, l2=2.0)
    lp = head.layer_probs(x)
    for layer in (1, 2):
        z = (x[:, layer] - head.mean[layer]) / head.scale[layer]
        reference = LogisticRegression(C=sklearn_c, tol=1e-10, max_iter=10_000).fit(z, y)
        np.testing.assert_allclose(lp[:, layer], reference.predict_proba(z), atol=1e-5)
    np.testing.assert_allclose(head.mean[1], x[:, 1].astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(head.scale[1], x[:, 1].astype(np.float64).std(axis=0), rtol=1e-9)


def test_a_constant_layer_learns_the_class_prior_and_a_separable_one_the_labels():
    x = _states(400, 2, 6, seed=4)
    y = (x[:, 1, 0] > np.median(x[:, 1, 0])).astype(np.int64) + 2 * (x[:, 1, 1] > 0)  # 4 classes
    head = fit_offramps(x, y, 4, l2=1e-2)
    lp = head.layer_probs(x)
    # layer 0: the same state for every input (its scale floored, not divided up to noise): the prior
    np.testing.assert_allclose(lp[:, 0], np.tile(np.bincount(y) / len(y), (len(y), 1)), atol=1e-6)
    assert (lp[:, 1].argmax(axis=1) == y).mean() > 0.97


def test_a_class_missing_from_training_gets_probability_zero():
    x = _states(90, 3, 4, seed=5)
    y = np.arange(90) % 3 * 2  # classes 0, 2, 4 of 5
    lp = fit_offramps(x, y, 5).layer_probs(_states(20, 3, 4, seed=6))
    assert np.isfinite(lp).all()
    np.testing.assert_allclose(lp.sum(axis=-1), 1.0)
    assert (lp[..., [1, 3]] == 0).all()
    only = fit_offramps(x, np.full(90, 1), 3).layer_probs(x)  # one class seen: certain everywhere
    np.testing.assert_array_equal(only, np.broadcast_to([0.0, 1.0, 0.0], only.shape))


def test_stopping_at_max_iter_warns_and_bad_training_inputs_are_errors():
    x = _states(50, 2, 4, seed=7)
    y = np.arange(50) % 2
    with pytest.warns(RuntimeWarning, match="max_iter=1"):
        fit_offramps(x, y, 2, max_iter=1)
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(50,\)"):
        fit_offramps(x, y[:10], 2)
    with pytest.raises(ValueError, match=r"ints in \[0, 2\)"):
        fit_offramps(x, y + 1, 2)
    with pytest.raises(ValueError, match="finite"):
        fit_offramps(np.where(x > 0, np.nan, x), y, 2)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_offramps(x, y, 2, l2=0.0)
    with pytest.raises(ValueError, match=r"n_folds must lie in \[2, N\]"):
        cross_fit(x, y, 2, n_folds=1)


def _memorising_problem() -> tuple[np.ndarray, np.ndarray]:
    """Random labels on 200 points in 150 dimensions: linearly separable (200 < 2 * 150), nothing to learn."""
    rng = np.random.default_rng(8)
    return rng.standard_normal((200, 2, 150)).astype(np.float32), rng.integers(0, 2, 200)


def test_cross_fitted_predictions_never_come_from_a_head_trained_on_the_example():
    x, y = _memorising_problem()
    cf = cross_fit(x, y, 2, n_folds=4, seed=0)
    # each fold's head is exactly the fit on the examples outside that fold ...
    for k in range(4):
        assert fit_offramps(x[cf.folds != k], y[cf.folds != k], 2).name == cf.heads[k].name
    # ... and every example's probabilities are its fold head's
    for i in range(0, 200, 7):
        np.testing.assert_allclose(cf.layer_probs[i, 1], cf.heads[cf.folds[i]].probs(1, x[i:i + 1, 1])[0], atol=1e-12)
    # memorisation shows in sample, never in the cross-fitted probabilities
    in_sample = (cf.final.layer_probs(x)[:, 1].argmax(axis=1) == y).mean()
    crossed = (cf.layer_probs[:, 1].argmax(axis=1) == y).mean()
    assert in_sample > 0.95
    assert 0.35 < crossed < 0.65


def test_cross_fit_is_deterministic_and_stratified():
    x = _states(120, 2, 4, seed=9)
    y = np.repeat([0, 1, 2], [60, 40, 20])
    a = cross_fit(x, y, 3, n_folds=4, seed=3)
    b = cross_fit(x, y, 3, n_folds=4, seed=3)
    assert isinstance(a, CrossFit) and a.layer_probs.shape == (120, 2, 3)
    np.testing.assert_array_equal(a.folds, b.folds)
    np.testing.assert_array_equal(a.layer_probs, b.layer_probs)
    assert a.final.name == fit_offramps(x, y, 3).name  # serving uses the fit on everything
    counts = np.stack([np.bincount(a.folds[y == c], minlength=4) for c in range(3)])
    np.testing.assert_array_equal(counts, [[15] * 4, [10] * 4, [5] * 4])
    assert not np.array_equal(cross_fit(x, y, 3, n_folds=4, seed=4).folds, a.folds)
