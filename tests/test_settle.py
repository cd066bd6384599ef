"""Settle statistics on a hand-made 5-record × 4-weight trajectory (answers worked out by hand below)."""
import numpy as np
import pytest

from lts_core.analysis import settle as st

# records →   r0 r1 r2 r3 r4
# w0:          2  2  2  2  2   never moved: settle 0, flips 0, reversals 0
# w1:          0  1  2  2  2   converged at record 2: settle 2, flips 2, reversals 0 (always upward)
# w2:          0  1  0  1  0   oscillates to the end: settle 4, flips 4, reversals at r2, r3, r4 → 3/4
# w3:          1  1  1  1  2   moves only at the last record: settle 4, flips 1, reversals 0
LEVELS = np.array([[2, 0, 0, 1],
                   [2, 1, 1, 1],
                   [2, 2, 0, 1],
                   [2, 2, 1, 1],
                   [2, 2, 0, 2]], dtype=np.uint8)


def test_per_weight_statistics():
    np.testing.assert_array_equal(st.final_levels(LEVELS), [2, 2, 0, 2])
    np.testing.assert_array_equal(st.settle_records(LEVELS), [0, 2, 4, 4])
    np.testing.assert_array_equal(st.never_moved(LEVELS), [True, False, False, False])
    np.testing.assert_array_equal(st.flips(LEVELS), [0, 2, 4, 1])
    np.testing.assert_array_equal(st.direction_reversals(LEVELS), [0, 0, 3, 0])
    np.testing.assert_allclose(st.oscillation_frequency(LEVELS), [0, 0, 0.75, 0])


def test_curves_histogram_occupancy():
    # settle records [0, 2, 4, 4] → settled share at r0..r4: 1/4, 1/4, 2/4, 2/4, 4/4
    np.testing.assert_allclose(st.fraction_settled_curve(LEVELS), [0.25, 0.25, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(st.settle_histogram(st.settle_records(LEVELS), 5), [1, 0, 1, 0, 2])
    # layers {w0, w1} and {w2, w3}: settle [0, 2] and [4, 4]
    np.testing.assert_allclose(st.fraction_settled_curve(LEVELS, [2, 2]),
                               [[0.5, 0.5, 1, 1, 1], [0, 0, 0, 0, 1]])
    # occupancy of levels 0..3 per record
    np.testing.assert_array_equal(st.level_occupancy(LEVELS, 4),
                                  [[2, 1, 1, 0], [0, 3, 1, 0], [1, 1, 2, 0], [0, 2, 2, 0], [1, 0, 3, 0]])
    with pytest.raises(ValueError):
        st.level_occupancy(LEVELS, 2)


def test_summary_categories():
    s = st.settle_summary(LEVELS, layer_sizes=[2, 2], layer_names=["a", "b"], steps=np.arange(5) * 10,
                          steps_per_epoch=10)
    assert (s.n_never_moved, s.n_converged_later, s.n_not_settled) == (1, 1, 2)
    assert s.fractions["not_settled"] == 0.5
    np.testing.assert_allclose(s.curve, [0.25, 0.25, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(s.histogram, [1, 0, 1, 0, 2])
    np.testing.assert_allclose(s.epochs, np.arange(5))
    assert s.layer_curves.shape == (2, 5)


def test_single_record_and_blocks(monkeypatch):
    one = LEVELS[:1]
    np.testing.assert_array_equal(st.settle_records(one), [0, 0, 0, 0])
    np.testing.assert_array_equal(st.oscillation_frequency(one), [0, 0, 0, 0])
    assert st.settle_summary(one).n_never_moved == 4
    # tiny blocks: the block-wise code gives the same answers as one block
    rng = np.random.default_rng(0)
    lv = rng.integers(0, 3, size=(23, 7)).astype(np.uint8)
    ref = (st.settle_records(lv), st.flips(lv), st.never_moved(lv))
    monkeypatch.setattr(st, "_BLOCK_ELEMS", 5)
    got = (st.settle_records(lv), st.flips(lv), st.never_moved(lv))
    for x, y in zip(ref, got):
        np.testing.assert_array_equal(x, y)
    # brute force settle records
    final = lv[-1]
    brute = [min(r for r in range(23) if (lv[r:, i] == final[i]).all()) for i in range(7)]
    np.testing.assert_array_equal(ref[0], brute)


def test_layer_size_validation():
    with pytest.raises(ValueError):
        st.fraction_settled_curve(LEVELS, [1, 2])
