"""Exit maths (raee/exit_policy.py): worked examples by hand, then hypothesis properties on small shapes."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raee.exit_policy import (
    POLICIES,
    ConfidentPolicy,
    ExitPolicy,
    FusedPolicy,
    choose_exit_layers,
    confidence_exit,
    get_policy,
    knn_vote,
    layer_scores,
    neighbour_weights,
    oracle_exit,
)
from raee.records import Neighbours

INF = np.inf
PROPERTY = settings(max_examples=150, deadline=None)


# ---------------------------------------------------------------- worked examples


def test_neighbour_weights_by_hand():
    # min d = 1 -> w = 1/1, 1/2, 1/4; the padded neighbour (inf) gets 0.
    d = np.array([[1.0, 2.0, 4.0, INF]], dtype=np.float32)
    np.testing.assert_allclose(neighbour_weights(d), [[1.0, 0.5, 0.25, 0.0]])


def test_exact_duplicates_take_all_the_weight():
    # min d = 0: the two duplicates get 1 (limit of min/d at d = min), the rest 0/3 = 0, padding 0.
    d = np.array([[0.0, 0.0, 3.0, INF]])
    np.testing.assert_array_equal(neighbour_weights(d), [[1.0, 1.0, 0.0, 0.0]])
    # 1 - cos rounded below 0, or a squared L2 rounded above it (relative to the row's distances), is still a
    # duplicate: the same query gets the same weights whatever the batch it was searched in (found by the
    # engine cross-check of `raee eval`)
    np.testing.assert_array_equal(neighbour_weights(np.array([[-1e-7, 2.0]])), [[1.0, 0.0]])
    np.testing.assert_array_equal(neighbour_weights(np.array([[1.2e-7, 2.0]])), [[1.0, 0.0]])
    # a row of nothing but duplicates, whose rounding differs with the batch: equal weights all the same
    np.testing.assert_array_equal(neighbour_weights(np.array([[6.9e-13, 7.6e-13, 7.6e-13]])), [[1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(neighbour_weights(np.array([[1.1e-12, 1.1e-12, 1.2e-12]])), [[1.0, 1.0, 1.0]])


def test_neighbour_weights_valid_mask_and_empty_rows():
    # valid=False hides the closest hit, so min d = 2: w = 0, 2/2, 2/4.
    d = np.array([[1.0, 2.0, 4.0], [INF, INF, INF]])
    valid = np.array([[False, True, True], [True, True, True]])
    np.testing.assert_allclose(neighbour_weights(d, valid=valid), [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])


def test_neighbour_weights_reject_bad_distances():
    with pytest.raises(ValueError, match="non-negative"):
        neighbour_weights(np.array([[-0.5, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        neighbour_weights(np.array([[np.nan, 1.0]]))


def _worked_example():
    # L = 3 (layers 0..3), K = 3 neighbours at d = 1, 2, 4 -> w = 1, 0.5, 0.25.
    d = np.array([[1.0, 2.0, 4.0]])
    p = np.array([[
        [0.00, 0.95, 0.97, 0.99],  # i=0: layers 1, 2, 3 reach tau=0.9
        [0.60, 0.00, 0.80, 0.70],  # i=1: none reaches tau -> fallback to its top correct layers
        [0.00, 0.92, 0.00, 0.00],  # i=2: layer 1 only
    ]])
    return d, p


def test_layer_scores_by_hand():
    d, p = _worked_example()
    # fallback_top=3: i=1 keeps layers 2 (0.8), 3 (0.7), 0 (0.6).
    # l=0: 0.5*0.6 = 0.30
    # l=1: 1*0.95 + 0.25*0.92 = 0.95 + 0.23 = 1.18
    # l=2: 1*0.97 + 0.5*0.8 = 0.97 + 0.40 = 1.37  <- exit
    # l=3: 1*0.99 + 0.5*0.7 = 0.99 + 0.35 = 1.34
    s = layer_scores(d, p, tau=0.9, fallback_top=3)
    np.testing.assert_allclose(s, [[0.30, 1.18, 1.37, 1.34]])
    assert choose_exit_layers(s, n_layers=3).tolist() == [2]
    # fallback_top=1: i=1 keeps layer 2 only: 0, 1.18, 1.37, 0.99 -> still 2.
    np.testing.assert_allclose(layer_scores(d, p, fallback_top=1), [[0.0, 1.18, 1.37, 0.99]])
    # fallback_top=0 (off): i=1 adds nothing: 0, 1.18, 0.97, 0.99 -> layer 1.
    s0 = layer_scores(d, p, fallback_top=0)
    np.testing.assert_allclose(s0, [[0.0, 1.18, 0.97, 0.99]])
    assert choose_exit_layers(s0, n_layers=3).tolist() == [1]


def test_fallback_ties_keep_the_earliest_layers():
    # No layer reaches tau; p = 0.5 at layers 0, 1, 2 and top-2 fallback keeps layers 0 and 1.
    p = np.array([[[0.5, 0.5, 0.5, 0.0]]])
    np.testing.assert_allclose(layer_scores(np.array([[1.0]]), p, fallback_top=2), [[0.5, 0.5, 0.0, 0.0]])


def test_nothing_accumulates_means_full_model():
    # Neither neighbour has a correct layer: all scores 0 -> exit L = 3.
    s = layer_scores(np.array([[1.0, 2.0]]), np.zeros((1, 2, 4)))
    np.testing.assert_array_equal(s, [[0.0, 0.0, 0.0, 0.0]])
    assert choose_exit_layers(s, n_layers=3).tolist() == [3]


def test_choose_exit_layers_by_hand():
    scores = np.array([
        [0.2, 0.5, 0.5, 0.1],  # tie at 1 and 2 -> earliest, 1
        [0.0, 0.0, 0.0, 0.0],  # nothing accumulated -> L = 3
        [0.3, 0.1, 0.0, 0.0],  # layer 0 (the embedding output) is a valid exit
        [0.0, 0.7, 0.7 + 1e-13, 0.0],  # equal up to float rounding -> still a tie, 1
    ])
    assert choose_exit_layers(scores, n_layers=3).tolist() == [1, 3, 0, 1]
    with pytest.raises(ValueError, match="n_layers"):
        choose_exit_layers(scores, n_layers=4)


def test_exit_policy_on_neighbours_with_padding():
    d, p = _worked_example()
    # Append a padded slot (id -1, inf, 0): the worked example's exit, 2, is unchanged.
    nb = Neighbours(
        ids=np.array([[10, 11, 12, -1]]),
        distances=np.append(d, [[INF]], axis=1).astype(np.float32),
        exit_probs=np.concatenate([p, np.zeros((1, 1, 4))], axis=1).astype(np.float32),
        labels=np.array([[1, 1, 0, -1]]),
    )
    assert ExitPolicy().exit_layers(nb).tolist() == [2]
    assert ExitPolicy(fallback_top=0).exit_layers(nb).tolist() == [1]
    # k=2 keeps the two closest (d = 1, 2): l=1: 0.95, l=2: 0.97 + 0.4 = 1.37, l=3: 0.99 + 0.35 -> 2.
    # k=1 keeps d = 1 only: 0, 0.95, 0.97, 0.99 -> 3.
    assert ExitPolicy(k=1).exit_layers(nb).tolist() == [3]
    assert ExitPolicy(k=2).exit_layers(nb).tolist() == [2]


def test_policy_registry():
    assert POLICIES["raee"] is ExitPolicy
    assert get_policy("raee", tau=0.8, k=4) == ExitPolicy(tau=0.8, k=4)
    assert get_policy("raee-cal", k=4).calibrated and not get_policy("raee").calibrated
    assert get_policy("fused", beta=2.0, slack=0.1) == FusedPolicy(beta=2.0, slack=0.1)
    with pytest.raises(ValueError, match="known policies: confident, fused, raee, raee-cal"):
        get_policy("nope")
    with pytest.raises(ValueError, match="accepts"):
        get_policy("raee", calibrated=True)  # fixed by the policy's name, not a parameter
    with pytest.raises(ValueError, match="accepts"):
        get_policy("raee", tua=0.8)
    with pytest.raises(ValueError, match="tau"):
        ExitPolicy(tau=1.5)


def test_confident_policy_by_hand():
    # one query, two neighbours at distances 1 and 2 (weights 1, 1/2), labels 0 and 1: votes (1, 0.5); with
    # alpha 1 the prior is (2, 1.5) / 3.5 = (4/7, 3/7)
    nb = Neighbours(ids=np.array([[1, 2]]), distances=np.array([[1.0, 2.0]]), exit_probs=np.zeros((1, 2, 3)),
                    labels=np.array([[0, 1]]))
    policy = ConfidentPolicy(k=2, beta=1.0, threshold=0.5, min_layer=1)
    np.testing.assert_allclose(policy.prior(nb, 2), [[4 / 7, 3 / 7]])
    # layers 0..2 of the query: (0.99, 0.01) at layer 0 is never asked (min_layer 1); layer 1 (0.5, 0.5) fused
    # with the prior gives (4/7, 3/7), entropy 0.683 > 0.5; layer 2 (0.9, 0.1) gives (36, 3) / 39, entropy 0.271
    probs = np.array([[[0.99, 0.01], [0.5, 0.5], [0.9, 0.1]]])
    prior = policy.prior(nb, 2)
    assert policy.exit_layers_recorded(probs, prior).tolist() == [2]
    np.testing.assert_allclose(policy.final_probs(probs[:, 2], nb), [[36 / 39, 3 / 39]])
    np.testing.assert_array_equal(policy.stops(probs[0, 1:], np.repeat(prior, 2, 0)), [False, True])
    assert ConfidentPolicy(threshold=0.0).exit_layers_recorded(probs, prior).tolist() == [2]  # never confident: L
    with pytest.raises(TypeError, match="during the forward"):
        policy.exit_layers(nb)
    # beta = 0 is DeeBERT's entropy exit on the layer alone
    from raee import peers

    zero = ConfidentPolicy(beta=0.0, threshold=0.3, min_layer=0)
    np.testing.assert_array_equal(zero.exit_layers_recorded(probs, prior), peers.entropy_exit(probs, 0.3 + 1e-12))
    assert get_policy("confident", threshold=0.2, beta=0.5) == ConfidentPolicy(threshold=0.2, beta=0.5)


def test_knn_vote_by_hand():
    # w = 1, 0.5, 0.25, 0 (padding): class 0 gets 1, class 1 gets 0.75; total 1.75 -> 4/7, 3/7.
    # An all-padding row votes uniformly.
    d = np.array([[1.0, 2.0, 4.0, INF], [INF, INF, INF, INF]])
    labels = np.array([[0, 1, 1, -1], [-1, -1, -1, -1]])
    np.testing.assert_allclose(knn_vote(d, labels, 2), [[4 / 7, 3 / 7], [0.5, 0.5]])


def test_confidence_exit_by_hand():
    # max prob per layer: 0.6, 0.85, 0.95.
    probs = np.array([[[0.6, 0.4], [0.15, 0.85], [0.95, 0.05]]])
    assert confidence_exit(probs, 0.8).tolist() == [1]  # first layer with max >= 0.8
    assert confidence_exit(probs, 0.5).tolist() == [0]
    assert confidence_exit(probs, 0.99).tolist() == [2]  # none reaches it -> L


def test_oracle_exit_by_hand():
    # argmax per layer: 0, 1, 1.
    probs = np.array([[[0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]] * 3)
    labels = np.array([1, 0, 2])  # earliest correct: layer 1; layer 0; never -> L = 2
    assert oracle_exit(probs, labels).tolist() == [1, 0, 2]


# ---------------------------------------------------------------- properties


def _reference_exit(distances, exit_probs, tau, fallback_top):
    """The authors' loop (dict of layer sums per query), with our zero-distance and tie rules."""
    n_layers = exit_probs.shape[2] - 1
    exits = []
    for n in range(distances.shape[0]):
        valid = [i for i in range(distances.shape[1]) if math.isfinite(distances[n, i])]
        sums = [0.0] * (n_layers + 1)
        if valid:
            d_min = min(distances[n, i] for i in valid)
            for i in valid:
                w = 1.0 if distances[n, i] == d_min else d_min / distances[n, i]
                table = [(layer, p) for layer, p in enumerate(exit_probs[n, i]) if p > 0]
                chosen = [(layer, p) for layer, p in table if p >= tau]
                if not chosen:
                    chosen = sorted(table, key=lambda item: -item[1])[:fallback_top]
                for layer, p in chosen:
                    sums[layer] += w * p
        best = max(sums)
        exits.append(n_layers if best <= 0 else next(i for i, s in enumerate(sums) if s >= best * (1 - 1e-9)))
    return np.array(exits)


# Distances: exact duplicates (0), padding (inf) or ordinary values; probabilities: wrong (0), a few
# repeated values (to provoke ties) or anything in [0.05, 1].
_distance = st.one_of(st.just(0.0), st.just(INF), st.floats(1e-3, 10.0))
_prob = st.one_of(st.just(0.0), st.sampled_from([0.5, 0.9, 0.95]), st.floats(0.05, 1.0))


@st.composite
def neighbour_batches(draw, min_k=1):
    n, k, n_layers = draw(st.integers(1, 3)), draw(st.integers(min_k, 5)), draw(st.integers(1, 4))
    d = draw(arrays(np.float64, (n, k), elements=_distance))
    p = draw(arrays(np.float64, (n, k, n_layers + 1), elements=_prob))
    p[np.isinf(d)] = 0.0  # padding carries no probabilities
    return d, p


_params = st.fixed_dictionaries({"tau": st.sampled_from([0.5, 0.9, 1.0]), "fallback_top": st.integers(0, 3)})


def _exits(d, p, params):
    return choose_exit_layers(layer_scores(d, p, **params), n_layers=p.shape[2] - 1)


@PROPERTY
@given(neighbour_batches(), _params)
def test_agrees_with_loop_reference(batch, params):
    d, p = batch
    exits = _exits(d, p, params)
    assert exits.dtype == np.int64
    assert ((exits >= 0) & (exits <= p.shape[2] - 1)).all()
    np.testing.assert_array_equal(exits, _reference_exit(d, p, **params))


@PROPERTY
@given(neighbour_batches(), _params, st.floats(1e-2, 1e2))
def test_scaling_distances_keeps_the_exit(batch, params, c):
    d, p = batch
    np.testing.assert_array_equal(_exits(d * c, p, params), _exits(d, p, params))


@PROPERTY
@given(neighbour_batches(), _params, st.one_of(st.just(INF), st.floats(1e-3, 10.0)))
def test_a_neighbour_with_no_correct_layer_changes_nothing(batch, params, extra_d):
    # Holds for any positive distance; an exact duplicate with no correct layer would instead take all
    # the weight and send the query to the full model (docs/exit-policy.md).
    d, p = batch
    d2 = np.concatenate([d, np.full((d.shape[0], 1), extra_d)], axis=1)
    p2 = np.concatenate([p, np.zeros((p.shape[0], 1, p.shape[2]))], axis=1)
    np.testing.assert_array_equal(_exits(d2, p2, params), _exits(d, p, params))


@PROPERTY
@given(neighbour_batches(), _params, st.randoms(use_true_random=False))
def test_permuting_neighbours_keeps_the_exit(batch, params, rnd):
    d, p = batch
    perm = list(range(d.shape[1]))
    rnd.shuffle(perm)
    np.testing.assert_array_equal(_exits(d[:, perm], p[:, perm], params), _exits(d, p, params))


@PROPERTY
@given(neighbour_batches(), st.data())
def test_padding_by_id_is_ignored(batch, data):
    # Marking slots as padding through ids = -1 (whatever distance and probabilities they hold) gives the
    # exit of the batch without those slots.
    d, p = batch
    n, k, _ = p.shape
    pad = data.draw(arrays(np.bool_, (n, k)))
    ids = np.where(pad, -1, np.arange(n * k).reshape(n, k))
    nb = Neighbours(ids=ids, distances=np.where(pad, 0.0, d), exit_probs=np.where(pad[..., None], 1.0, p),
                    labels=np.zeros((n, k), dtype=np.int64))
    unpadded = np.where(pad, INF, d), np.where(pad[..., None], 0.0, p)
    expected = _exits(*unpadded, {"tau": 0.9, "fallback_top": 3})
    np.testing.assert_array_equal(ExitPolicy(k=k).exit_layers(nb), expected)


@PROPERTY
@given(neighbour_batches(), st.integers(2, 4), st.data())
def test_knn_vote_rows_are_distributions(batch, n_classes, data):
    d, _ = batch
    labels = data.draw(arrays(np.int64, d.shape, elements=st.integers(0, n_classes - 1)))
    votes = knn_vote(d, np.where(np.isinf(d), -1, labels), n_classes)
    assert votes.shape == (d.shape[0], n_classes)
    assert (votes >= 0).all()
    np.testing.assert_allclose(votes.sum(axis=1), 1.0)


@PROPERTY
@given(arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 3)),
              elements=st.floats(0.0, 1.0)), st.floats(0.0, 1.0), st.data())
def test_baselines_agree_with_loops(probs, threshold, data):
    n, n_layers_plus_1, n_classes = probs.shape
    labels = data.draw(arrays(np.int64, (n,), elements=st.integers(0, n_classes - 1)))
    last = n_layers_plus_1 - 1
    conf = [next((lay for lay in range(last + 1) if max(probs[i, lay]) >= threshold), last) for i in range(n)]
    orac = [next((lay for lay in range(last + 1) if np.argmax(probs[i, lay]) == labels[i]), last)
            for i in range(n)]
    assert confidence_exit(probs, threshold).tolist() == conf
    assert oracle_exit(probs, labels).tolist() == orac
