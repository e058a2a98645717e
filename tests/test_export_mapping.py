"""Index -> name mapping: it returns the true assignment or refuses; it never guesses."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.mapping import Candidate, map_indices


def _brute_force(shapes, names):
    """Every way to place the state shapes (in order) onto a subsequence of ``names``, by enumeration."""
    return [
        chosen
        for chosen in itertools.combinations(range(len(names)), len(shapes))
        if all(s is None or s == names[j][1] for s, j in zip(shapes, chosen))
    ]


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(st.integers(0, 2), min_size=1, max_size=9),
    frozen=st.data(),
    unknown=st.data(),
)
def test_mapping_is_the_truth_or_an_error_and_agrees_with_brute_force(kinds, frozen, unknown):
    """Parameters of a few shapes, some left out of the optimizer (frozen), some without state: the mapping
    equals the true index -> name assignment exactly when brute force finds one alignment, else it raises."""
    names = [(f"p{i}", (kind + 1, 3)) for i, kind in enumerate(kinds)]
    kept = frozen.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    trained = [n for n, keep in zip(names, kept) if keep]
    no_state = unknown.draw(st.lists(st.booleans(), min_size=len(trained), max_size=len(trained)))
    indices = list(range(len(trained)))
    shapes = {i: (None if missing else trained[i][1]) for i, missing in zip(indices, no_state)}
    truth = {i: trained[i][0] for i in indices}
    alignments = _brute_force([shapes[i] for i in indices], names)
    candidate = Candidate("one group", (tuple(names),))
    if len(alignments) == 1:
        assert map_indices([indices], shapes, [candidate], "opt").names == truth
    else:
        assert len(alignments) > 1  # the truth is always one alignment
        with pytest.raises(CurvatureError, match="ambiguous"):
            map_indices([indices], shapes, [candidate], "opt")


def test_candidates_that_disagree_are_an_error_and_agreeing_ones_are_merged():
    """Two orders that both fit with different names are refused naming an index and both names; two rules
    giving the same assignment are reported together."""
    a, b = ("a", (2, 2)), ("b", (2, 2))
    shapes = {0: (2, 2), 1: (2, 2)}
    with pytest.raises(CurvatureError, match=r"state index 0 is 'a' under first but 'b' under second"):
        map_indices([[0, 1]], shapes, [Candidate("first", ((a, b),)), Candidate("second", ((b, a),))], "opt")
    found = map_indices([[0, 1]], shapes, [Candidate("first", ((a, b),)), Candidate("again", ((a, b),))], "opt")
    assert found.names == {0: "a", 1: "b"} and found.rules == ("first", "again")


def test_group_count_and_shape_mismatches_name_the_problem():
    """A candidate with another number of groups, or a shape that cannot fit, is named in the error."""
    names = (("x", (4,)), ("y", (3, 3)))
    with pytest.raises(CurvatureError) as error:
        map_indices(
            [[0], [1]],
            {0: (4,), 1: (5, 5)},
            [Candidate("single", (names,)), Candidate("split", (names[:1], names[1:]))],
            "opt",
        )
    assert "single: 1 group(s), the optimizer has 2" in str(error.value)
    assert "[5, 5]" in str(error.value) and "'y' has shape [3, 3]" in str(error.value)


def test_large_models_map_quickly():
    """100k parameters with one frozen: the banded alignment is linear, not quadratic, in the model size."""
    import time

    names = [(f"p{i}", (i % 7 + 1, 4)) for i in range(100_000)]
    trained = names[:50_000] + names[50_001:]
    shapes = {i: s for i, (_, s) in enumerate(trained)}
    start = time.perf_counter()
    found = map_indices([list(shapes)], shapes, [Candidate("one", (tuple(names),))], "opt")
    assert time.perf_counter() - start < 10
    assert found.names[50_000] == "p50001" and found.skipped == ("p50000",)
