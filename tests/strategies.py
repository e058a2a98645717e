"""Hypothesis strategies the property tests share (``from strategies import ...``).

The generic ones (seeds for ``torch.Generator``, small shapes, expert weights, lambdas) and the degenerate values
every method must survive: curvature that is 0 (a frozen layer), denormal (``1e-45`` .. ``2**-126``), near
float32's maximum (``3e38``), whole zero rows or columns, single-element and 1-D tensors, for full tensors and for
rank-1 stores (their row and column factors ``r``, ``c`` drawn independently: either may be all zero, as a
store ``mergekit-ota check`` accepts may hold), and task vectors that are exactly zero (an expert equal to the
base) or denormal.
"""

from __future__ import annotations

from typing import Tuple

import torch
from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**31 - 1)
shapes = st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=3).map(tuple)
weight_values = st.floats(min_value=0.1, max_value=3.0, allow_nan=False)
lams = st.floats(min_value=0.1, max_value=2.0, allow_nan=False)

F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32, 2**-126

# curvature values with a name: zero, denormals, the smallest normal, ordinary, near float32's maximum
DEGENERATE_CURVATURE = (0.0, 1e-45, 1e-40, F32_TINY, 1e-20, 1e-8, 1.0, 1e20, 3e38, F32_MAX)
curvature_values = st.one_of(
    st.sampled_from(DEGENERATE_CURVATURE), st.floats(min_value=0.0, max_value=F32_MAX, width=32)
)
# task-vector entries: exact zero, denormal, tiny, ordinary, large (huge ones: see the merge-level tests)
DEGENERATE_TAU = (0.0, 1e-45, -1e-40, 1e-30, -1e-8, 1.0, -1.0, 1e10, -1e10)
tau_values = st.one_of(st.sampled_from(DEGENERATE_TAU), st.floats(min_value=-1e3, max_value=1e3, width=32))

# single-element, 1-D, a single row or column, and the generic small shapes
degenerate_shapes = st.one_of(st.sampled_from([(1,), (1, 1), (6,), (1, 5), (4, 1), (3, 4)]), shapes)
rank1_shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))


@st.composite
def degenerate_tensors(draw, shape: Tuple[int, ...], values=curvature_values) -> torch.Tensor:
    """A float32 tensor of ``shape``: all zero, one drawn value everywhere, drawn entries, or (2-D) drawn
    entries with whole rows or columns zeroed."""
    kind = draw(st.sampled_from(["zeros", "constant", "entries", "zero_lines"]))
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, draw(values), dtype=torch.float32)
    numel = 1
    for size in shape:
        numel *= size
    tensor = torch.tensor(draw(st.lists(values, min_size=numel, max_size=numel)), dtype=torch.float32).reshape(shape)
    if kind == "zero_lines" and tensor.dim() == 2:
        dim = draw(st.integers(0, 1))
        lines = draw(st.sets(st.integers(0, tensor.shape[dim] - 1), min_size=1))
        tensor.index_fill_(dim, torch.tensor(sorted(lines)), 0.0)
    return tensor


def full_curvatures(shape: Tuple[int, ...]) -> st.SearchStrategy[torch.Tensor]:
    """Full curvature tensors of ``shape`` with degenerate entries (:func:`degenerate_tensors`)."""
    return degenerate_tensors(shape, curvature_values)


@st.composite
def rank1_sums(draw, shape: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A rank-1 store's factors ``(r, c)`` for an ``m x n`` tensor, drawn independently (zeros, denormals, near
    float32's maximum; either factor may be all zero or hold zero entries: a zero row or column of ``v_hat``)."""
    return draw(degenerate_tensors((shape[0],))), draw(degenerate_tensors((shape[1],)))


def task_vectors(shape: Tuple[int, ...]) -> st.SearchStrategy[torch.Tensor]:
    """Task vectors ``tau`` of ``shape``: exactly zero, constant, or drawn entries (zeros, denormals, +-1e10)."""
    return degenerate_tensors(shape, tau_values)
