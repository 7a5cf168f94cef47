"""The peers' decision rules and tuning (raee/peers.py): hand-computed cases and hypothesis properties."""

from functools import partial
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from threadpoolctl import threadpool_limits

from raee.peers import (
    CALM_SOFTMAX_THRESHOLD,
    AdaInfer,
    adainfer_features,
    candidate_thresholds,
    earliest,
    entropy,
    entropy_exit,
    fit_adainfer,
    predictions_at,
    probs_at,
    saturation_exit,
    sleb_n_remove,
    sleb_select,
    softmax_response,
    softmax_response_exit,
    state_saturation,
    tune_threshold,
)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: BLAS threads only add overhead here (OpenBLAS's spin up to 10x on a loaded machine)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# Two examples, three layers (L = 2), two classes.
# Example 0: uniform, then 0.9 for class 1, then certain of class 1.
# Example 1: certain of class 0 at layer 0, then 0.6 / 0.4, then 0.8 for class 1.
LP = np.array([[[0.5, 0.5], [0.1, 0.9], [0.0, 1.0]],
               [[1.0, 0.0], [0.6, 0.4], [0.2, 0.8]]])
H_09 = -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))  # 0.325
H_06 = -(0.6 * np.log(0.6) + 0.4 * np.log(0.4))  # 0.673
H_08 = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8))  # 0.500


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean())


def layer_probs_strategy(max_n: int = 6, max_layers: int = 5, max_c: int = 4):
    """(N, L+1, C) rows on the simplex: positive weights normalised."""
    shapes = st.tuples(st.integers(1, max_n), st.integers(1, max_layers), st.integers(2, max_c))
    return shapes.flatmap(lambda shape: arrays(np.float64, shape, elements=st.floats(0.0, 1.0))).map(
        lambda w: (w + 1e-3) / (w + 1e-3).sum(axis=-1, keepdims=True))


def test_earliest_by_hand_and_against_a_loop():
    mask = np.array([[False, True, True], [False, False, False], [True, False, True]])
    np.testing.assert_array_equal(earliest(mask), [1, 2, 0])
    assert earliest(mask).dtype == np.int64
    with pytest.raises(ValueError, match=r"\(N, L\+1\)"):
        earliest(np.zeros(3, dtype=bool))


@given(arrays(bool, st.tuples(st.integers(0, 6), st.integers(1, 6))))
def test_earliest_is_the_first_true_layer_or_the_last(mask):
    expected = [next((i for i, v in enumerate(row) if v), len(row) - 1) for row in mask]
    np.testing.assert_array_equal(earliest(mask), expected)


def test_probs_and_predictions_at_the_exit_layer():
    np.testing.assert_array_equal(probs_at(LP, np.array([1, 0])), [[0.1, 0.9], [1.0, 0.0]])
    np.testing.assert_array_equal(predictions_at(LP, np.array([0, 1])), [0, 0])  # a tie goes to class 0
    with pytest.raises(ValueError, match=r"exit_layers must lie in \[0, 2\]"):
        probs_at(LP, np.array([0, 3]))


def test_entropy_by_hand():
    np.testing.assert_allclose(entropy(np.array([0.5, 0.25, 0.25])), 1.5 * np.log(2))
    np.testing.assert_allclose(entropy(np.full((2, 4), 0.25)), [np.log(4)] * 2)
    assert entropy(np.array([1.0, 0.0])) == 0.0  # 0 log 0 = 0
    np.testing.assert_allclose(entropy(LP), [[np.log(2), H_09, 0.0], [0.0, H_06, H_08]])


def test_deebert_entropy_exit_by_hand():
    np.testing.assert_array_equal(entropy_exit(LP, 0.4), [1, 0])  # H_09 = 0.325 < 0.4; example 1 at layer 0
    np.testing.assert_array_equal(entropy_exit(LP, 0.0), [2, 2])  # nothing is < 0: the full model
    np.testing.assert_array_equal(entropy_exit(LP[:, 1:], 0.6), [0, 1])  # without layer 0: 0.673 no, 0.500 yes
    np.testing.assert_array_equal(entropy_exit(LP, np.log(2) + 1e-9), [0, 0])


@settings(deadline=None)
@given(layer_probs_strategy(), st.floats(0, 2), st.floats(0, 2))
def test_a_larger_entropy_threshold_never_exits_later(lp, t1, t2):
    low, high = sorted((t1, t2))
    assert (entropy_exit(lp, high) <= entropy_exit(lp, low)).all()


def test_calm_softmax_response_by_hand():
    np.testing.assert_allclose(softmax_response(np.array([0.1, 0.6, 0.3])), 0.3)
    assert softmax_response(np.array([0.4, 0.2, 0.4])) == 0.0  # a tie at the top: no margin
    np.testing.assert_allclose(softmax_response(LP), [[0.0, 0.8, 1.0], [1.0, 0.2, 0.6]], atol=1e-12)
    np.testing.assert_array_equal(softmax_response_exit(LP, 0.5), [1, 0])
    np.testing.assert_array_equal(softmax_response_exit(LP[:, 1:], 0.5), [0, 1])
    assert CALM_SOFTMAX_THRESHOLD == 0.9
    np.testing.assert_array_equal(softmax_response_exit(LP), [2, 0])  # zero-shot default: margin >= 0.9


@settings(deadline=None)
@given(layer_probs_strategy(), st.floats(0, 1), st.floats(0, 1))
def test_a_larger_softmax_response_threshold_never_exits_earlier(lp, t1, t2):
    low, high = sorted((t1, t2))
    assert (softmax_response_exit(lp, high) >= softmax_response_exit(lp, low)).all()


def test_calm_state_saturation_by_hand():
    states = np.array([[[1.0, 0.0], [1.0, 1.0], [2.0, 2.1], [0.0, 0.0]]], dtype=np.float32)  # (1, L+1 = 4, H = 2)
    s = state_saturation(states)
    cos_12 = (2.0 + 2.1) / (np.sqrt(2.0) * np.hypot(2.0, 2.1))
    np.testing.assert_allclose(s, [[-np.inf, 1 / np.sqrt(2), cos_12, 0.0]], rtol=1e-6)  # zero state: cosine 0
    np.testing.assert_array_equal(saturation_exit(states, 0.99), [2])
    np.testing.assert_array_equal(saturation_exit(states, 0.5), [1])  # never layer 0: it has no predecessor
    np.testing.assert_array_equal(saturation_exit(states, -1.0), [1])
    np.testing.assert_array_equal(saturation_exit(states, 1.1), [3])


@settings(deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4)),
              elements=st.floats(-10, 10)), st.floats(-1, 1), st.floats(-1, 1))
def test_saturation_scales_out_and_a_larger_threshold_never_exits_earlier(states, t1, t2):
    low, high = sorted((t1, t2))
    assert (saturation_exit(states, high) >= saturation_exit(states, low)).all()
    np.testing.assert_allclose(state_saturation(3.0 * states), state_saturation(states), atol=1e-9)


def test_candidate_thresholds_cover_both_extremes():
    h = entropy(LP)
    ts = candidate_thresholds(h, n=5)
    assert (np.diff(ts) > 0).all() and ts[0] < 0.0 and ts[-1] > np.log(2)
    np.testing.assert_array_equal(entropy_exit(LP, ts[0]), [2, 2])  # below everything: never exit early
    np.testing.assert_array_equal(entropy_exit(LP, ts[-1]), [0, 0])  # above everything: exit at layer 0
    with pytest.raises(ValueError, match="no finite entry"):
        candidate_thresholds(np.array([-np.inf]))


# Tuning slice: four examples, L = 2. Layer 0 always says class 0; layer 1 is right for examples 0-2
# with falling confidence; layer 2 is right for all four.
TUNE = np.array([[[0.6, 0.4], [0.05, 0.95], [0.1, 0.9]],
                 [[0.6, 0.4], [0.9, 0.1], [0.9, 0.1]],
                 [[0.6, 0.4], [0.3, 0.7], [0.2, 0.8]],
                 [[0.6, 0.4], [0.6, 0.4], [0.1, 0.9]]])
TUNE_Y = np.array([1, 0, 1, 1])


def test_tune_threshold_by_hand():
    # softmax response per layer: layer 0 is 0.2 for all; layer 1 is 0.9, 0.8, 0.4, 0.2; layer 2 ends it.
    rule = partial(softmax_response_exit, TUNE)
    tuned = tune_threshold(rule, [0.1, 0.3, 0.5, 0.85, 0.95], TUNE, TUNE_Y, accuracy)
    # 0.1: all exit at 0 -> acc 1/4. 0.3: exits (1, 1, 1, 2) -> acc 1 (ex 3 at layer 2 is right).
    # 0.5: (1, 1, 2, 2) -> acc 1, deeper. 0.85: (1, 2, 2, 2) -> acc 1. 0.95: all at 2 -> acc 1.
    np.testing.assert_allclose(tuned.scores, [0.25, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(tuned.mean_exits, [0.0, 1.25, 1.5, 1.75, 2.0])
    assert (tuned.threshold, tuned.score, tuned.mean_exit) == (0.3, 1.0, 1.25)  # ties: the shallower
    budget = tune_threshold(rule, [0.1, 0.3, 0.5, 0.85, 0.95], TUNE, TUNE_Y, accuracy, max_mean_exit=1.0)
    assert (budget.threshold, budget.score) == (0.1, 0.25)  # only 0.1 keeps the mean exit <= 1
    with pytest.raises(ValueError, match=r"mean exit layer <= 0.5; the shallowest reaches 1.250"):
        tune_threshold(rule, [0.3, 0.5], TUNE, TUNE_Y, accuracy, max_mean_exit=0.5)


def test_tune_threshold_takes_any_score_and_the_first_of_equal_candidates():
    rule = partial(softmax_response_exit, TUNE)
    calls = []

    def wrong_rate(preds, labels):  # any callable: here lower error is a higher score
        calls.append(len(preds))
        return -float((preds != labels).mean())

    tuned = tune_threshold(rule, [0.95, 0.96, 0.3], TUNE, TUNE_Y, wrong_rate)
    assert calls == [4, 4, 4] and tuned.threshold == 0.3
    same = tune_threshold(rule, [0.97, 0.96], TUNE, TUNE_Y, accuracy)  # same exits, same score
    assert same.threshold == 0.97
    with pytest.raises(ValueError, match="non-finite"):
        tune_threshold(rule, [0.3], TUNE, TUNE_Y, lambda p, y: float("nan"))
    with pytest.raises(ValueError, match="exit_layers must be"):
        tune_threshold(lambda t: np.zeros(3, dtype=np.int64), [0.3], TUNE, TUNE_Y, accuracy)


def test_deebert_tuned_end_to_end_on_the_entropy_grid():
    grid = candidate_thresholds(entropy(TUNE))
    tuned = tune_threshold(partial(entropy_exit, TUNE), grid, TUNE, TUNE_Y, accuracy)
    assert tuned.score == 1.0
    exits = entropy_exit(TUNE, tuned.threshold)
    assert exits.mean() == tuned.mean_exit == tuned.mean_exits.min(where=tuned.scores == 1.0, initial=9)


def test_adainfer_features_and_rule_by_hand():
    f = adainfer_features(LP)
    np.testing.assert_allclose(f[0], [[0.5, 0.0], [0.9, 0.8], [1.0, 1.0]])
    np.testing.assert_allclose(f[1], [[1.0, 1.0], [0.6, 0.2], [0.8, 0.6]])
    rule = AdaInfer(coef=np.array([0.0, 10.0]), intercept=-5.0)  # stop where the gap > 0.5
    np.testing.assert_allclose(rule.stop_probs(LP)[0], 1 / (1 + np.exp(-np.array([-5.0, 3.0, 5.0]))))
    np.testing.assert_array_equal(rule.exit_layers(LP), [1, 0])
    np.testing.assert_array_equal(rule.exit_layers(LP, threshold=0.999), [2, 2])  # sigmoid(5) = 0.9933
    with pytest.raises(ValueError, match="coef must be 2"):
        AdaInfer(np.zeros(3), 0.0)


def test_adainfer_learns_to_stop_where_layers_are_right():
    # A layer is right exactly when its top probability exceeds 0.75; a margin-free toy of AdaInfer's premise.
    rng = np.random.default_rng(0)
    top = rng.uniform(0.5, 1.0, size=(400, 6))
    labels = rng.integers(0, 2, 400)
    predicted = np.where(top > 0.75, labels[:, None], 1 - labels[:, None])  # (N, L+1)
    lp = np.where(predicted[..., None] == np.arange(2), top[..., None], 1 - top[..., None])
    ada = fit_adainfer(lp, labels, l2=1e-3)
    assert ada.coef[0] + ada.coef[1] * 2 > 0  # more confident -> more likely to stop (gap = 2 top - 1)
    exits = ada.exit_layers(lp)
    first_right = earliest(top > 0.75)
    assert (exits == first_right).mean() > 0.9
    correct = predictions_at(lp, exits) == labels
    assert correct.mean() > 0.9


def test_adainfer_on_one_target_is_a_constant_rule():
    always_right = np.tile([[[0.2, 0.8]]], (3, 4, 1))
    ada = fit_adainfer(always_right, np.ones(3, dtype=np.int64))
    np.testing.assert_array_equal(ada.exit_layers(always_right), [0, 0, 0])
    never = fit_adainfer(always_right, np.zeros(3, dtype=np.int64))
    np.testing.assert_array_equal(never.exit_layers(always_right), [3, 3, 3])


def test_sleb_with_additive_costs_removes_the_cheapest_blocks_inside_the_barriers():
    damage = np.array([0.0, 5.0, 1.0, 4.0, 2.0, 3.0, 0.0])  # blocks 0 and 6 are "free" but fenced off
    seen = []

    def cost(removed):
        seen.append(removed)
        return float(damage[list(removed)].sum())

    assert sleb_select(7, 3, cost) == (0, 1, 3, 6)  # removes 2, 4, 5
    assert all(list(r) == sorted(r) for r in seen) and len(seen) == 5 + 4 + 3
    assert sleb_select(7, 2, cost, early_barrier=0, latter_barrier=0) == (1, 2, 3, 4, 5)
    assert sleb_select(7, 0, cost) == tuple(range(7))


def test_sleb_is_greedy_not_the_best_subset():
    # Pair costs with an interaction: removing 1 alone is cheapest, but {2, 3} is the best pair.
    single = {1: 1.0, 2: 2.0, 3: 3.0}
    pair = {(1, 2): 10.0, (1, 3): 9.0, (2, 3): 4.0}

    def cost(removed):
        return single[removed[0]] if len(removed) == 1 else pair[removed]

    best_pair = min(combinations((1, 2, 3), 2), key=lambda p: pair[p])
    assert best_pair == (2, 3)
    assert sleb_select(5, 2, cost) == (0, 2, 4)  # step 1 removes 1, step 2 the cheaper of {1,2}, {1,3}


def test_sleb_ties_go_to_the_lowest_block_and_bad_costs_are_errors():
    assert sleb_select(6, 2, lambda removed: 1.0) == (0, 3, 4, 5)
    with pytest.raises(ValueError, match=r"not finite when also removing block\(s\) \[2\]"):
        sleb_select(5, 1, lambda removed: np.nan if removed == (2,) else 1.0)
    with pytest.raises(ValueError, match=r"n_remove must lie in \[0, 3\]"):
        sleb_select(5, 4, lambda removed: 1.0)


def test_the_papers_sleb_setting():
    assert sleb_n_remove(18) == 10  # Gemma 3 270M: keep 8 of 18 blocks
    assert sleb_n_remove(32) == 19  # Llama-3-8B: keep 13, Table 8's 13.00
    assert sleb_n_remove(24) == 14
