"""The LoRA curvature estimate (``mergekit_ota/math/lora.py``): exact where its assumptions hold, equal to the
float64 reference, equivariant as the adapter's symmetries demand, finite and >= 0 on degenerate inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import degenerate_tensors, seeds

from mergekit_ota.math.lora import lora_curvature, lora_scaling
from mergekit_ota.math.rank1 import Rank1Curvature
from mergekit_ota.math.reference import reference_lora

scalings = st.floats(min_value=0.05, max_value=20.0, allow_nan=False)


def _v_hat(result) -> torch.Tensor:
    return Rank1Curvature.from_sums(result.r, result.c).dense().double()


def _adapter(seed: int, m: int, n: int, k: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=g, dtype=torch.float64), torch.randn(m, k, generator=g, dtype=torch.float64)


def _moments_from_gradients(grads: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float):
    """Adam's ``v_A``, ``v_B`` as the mean over ``grads`` (t x m x n) of LoRA's squared gradients."""
    grad_b = s * grads @ a.T  # t x m x k
    grad_a = s * b.T @ grads  # t x k x n
    return (grad_a**2).mean(0), (grad_b**2).mean(0)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 3),
    n=st.integers(1, 3),
    k=st.integers(1, 3),
    seed=seeds,
    s=scalings,
    row=st.lists(st.floats(0.05, 20.0), min_size=3, max_size=3),
    col=st.lists(st.floats(0.05, 20.0), min_size=3, max_size=3),
)
def test_exact_when_the_assumptions_hold(m, n, k, seed, s, row, col):
    """``E[G**2] = R C^T`` exactly, and every cross-correlation of ``G`` exactly 0: the gradients are
    ``D * sqrt(R C^T)`` over all ``2**(m n)`` sign patterns ``D``, so each cross-term averages to 0. LoRA's
    squared gradients averaged over them give ``v_A``, ``v_B``; the estimate is ``R C^T`` itself, and the two
    scale estimates agree."""
    big_r, big_c = torch.tensor(row[:m], dtype=torch.float64), torch.tensor(col[:n], dtype=torch.float64)
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=m * n)), dtype=torch.float64).view(-1, m, n)
    grads = signs * torch.outer(big_r, big_c).sqrt()
    a, b = _adapter(seed, m, n, k)
    v_a, v_b = _moments_from_gradients(grads, a, b, s)
    result = lora_curvature(v_a, v_b, a, b, s)
    assert result.degenerate is None
    torch.testing.assert_close(_v_hat(result), torch.outer(big_r, big_c), rtol=2e-5, atol=0.0)
    assert result.agreement == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), k=st.integers(1, 4), seed=seeds, s=scalings)
def test_equals_the_float64_reference(m, n, k, seed, s):
    """Arbitrary states (no model behind them): the float32 sums are the float64 reference's row and column sums,
    its dense ``v_hat`` is the reference's, and so is the agreement."""
    g = torch.Generator().manual_seed(seed)
    a, b = _adapter(seed + 1, m, n, k)
    v_a = torch.rand(k, n, generator=g, dtype=torch.float64) * 1e-3
    v_b = torch.rand(m, k, generator=g, dtype=torch.float64) * 1e-5
    result = lora_curvature(v_a.float(), v_b.float(), a.float(), b.float(), s)
    expected, agreement = reference_lora(v_a.float(), v_b.float(), a.float(), b.float(), s)
    torch.testing.assert_close(result.r.double(), expected.sum(1), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(result.c.double(), expected.sum(0), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(_v_hat(result), expected, rtol=1e-5, atol=0.0)
    assert result.agreement == pytest.approx(agreement, rel=1e-12)
    assert 0.0 < result.agreement <= 1.0


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 5),
    n=st.integers(1, 5),
    k=st.integers(1, 4),
    seed=seeds,
    s=scalings,
    lam=st.floats(1e-6, 1e6),
    sigma=st.floats(0.01, 100.0),
    alpha=st.floats(0.01, 100.0),
)
def test_symmetries(m, n, k, seed, s, lam, sigma, alpha):
    """``lambda`` on both states scales the estimate by ``lambda``; ``sigma`` on ``s`` by ``1 / sigma**2``; the
    reparametrisation ``A -> alpha A``, ``B -> B / alpha`` (Adam's states moving as the gradients do) changes
    nothing; the agreement is invariant under all three."""
    g = torch.Generator().manual_seed(seed)
    a, b = _adapter(seed + 1, m, n, k)
    v_a, v_b = torch.rand(k, n, generator=g, dtype=torch.float64), torch.rand(m, k, generator=g, dtype=torch.float64)
    base = lora_curvature(v_a, v_b, a, b, s)
    scaled = lora_curvature(lam * v_a, lam * v_b, a, b, s)
    torch.testing.assert_close(_v_hat(scaled), lam * _v_hat(base), rtol=1e-5, atol=0.0)
    stretched = lora_curvature(v_a, v_b, a, b, sigma * s)
    torch.testing.assert_close(_v_hat(stretched), _v_hat(base) / sigma**2, rtol=1e-5, atol=0.0)
    moved = lora_curvature(v_a / alpha**2, alpha**2 * v_b, alpha * a, b / alpha, s)
    torch.testing.assert_close(_v_hat(moved), _v_hat(base), rtol=1e-5, atol=0.0)
    for other in (scaled, stretched, moved):
        assert other.agreement == pytest.approx(base.agreement, rel=1e-9)


weight_values = st.sampled_from((0.0, 1e-45, -1e-30, 1e-8, -1.0, 1.0, 1e10, -1e19, 1e19))


@st.composite
def weights(draw, shape):
    kind = draw(st.sampled_from(["zeros", "entries", "normal"]))
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "normal":
        return torch.randn(shape, generator=torch.Generator().manual_seed(draw(seeds)))
    numel = shape[0] * shape[1]
    return torch.tensor(draw(st.lists(weight_values, min_size=numel, max_size=numel)), dtype=torch.float32).view(shape)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), m=st.integers(1, 4), n=st.integers(1, 4), k=st.integers(1, 3), s=scalings)
def test_finite_and_non_negative_on_degenerate_inputs(data, m, n, k, s):
    """Zeros, denormals, float32's maximum, zero rows and columns, one element, zero or huge weights: the sums are
    finite and >= 0, the agreement in ``[0, 1]``; where ``P`` or ``Q`` is 0 everything is 0 and says why."""
    v_a = data.draw(degenerate_tensors((k, n)))
    v_b = data.draw(degenerate_tensors((m, k)))
    a, b = data.draw(weights((k, n))), data.draw(weights((m, k)))
    result = lora_curvature(v_a, v_b, a, b, s)
    for t in (result.r, result.c):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()) and bool((t >= 0).all())
    assert 0.0 <= result.agreement <= 1.0 and math.isfinite(result.agreement)
    dense = _v_hat(result)
    assert bool(torch.isfinite(dense).all()) and bool((dense >= 0).all())
    if result.degenerate is not None:
        assert not result.r.any() and not result.c.any() and result.agreement == 0.0
    else:
        assert result.p > 0.0 and result.q > 0.0


def test_lora_init_b_zero_gives_no_curvature():
    """LoRA starts with ``B = 0``: then ``grad_A = 0`` and the column profile of ``G`` is invisible; the result is
    zero (the task vector ``s B A`` is zero too), with the reason."""
    a = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    result = lora_curvature(torch.zeros(2, 3), torch.rand(4, 2), a, torch.zeros(4, 2), 2.0)
    assert result.degenerate is not None and "Q" in result.degenerate and "B or A zero" in result.degenerate
    assert not result.r.any() and not result.c.any() and result.agreement == 0.0
    assert result.r.shape == (4,) and result.c.shape == (3,)


def test_one_element():
    """m = n = k = 1: ``v_B = s**2 R C A**2``, ``v_A = s**2 R C B**2`` give back ``R C`` exactly."""
    s, rc, a, b = 3.0, 0.25, 2.0, -0.5
    v_b, v_a = torch.tensor([[s * s * rc * a * a]]), torch.tensor([[s * s * rc * b * b]])
    result = lora_curvature(v_a, v_b, torch.tensor([[a]]), torch.tensor([[b]]), s)
    assert float(_v_hat(result)) == pytest.approx(rc, rel=1e-6) and result.agreement == pytest.approx(1.0)


def test_scaling():
    """PEFT's ``s``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under rsLoRA."""
    assert lora_scaling(8, 4) == 2.0 and lora_scaling(6, 4, rslora=True) == 3.0 and lora_scaling(16, 16) == 1.0
    with pytest.raises(ValueError, match="rank"):
        lora_scaling(8, 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: {**t, "v_a": -t["v_a"] - 1.0}, "negative"),
        (lambda t: {**t, "v_b": t["v_b"] * float("nan")}, "NaN"),
        (lambda t: {**t, "a": t["a"] * float("inf")}, "NaN or Inf"),
        (lambda t: {**t, "a": t["a"].T.contiguous()}, "shapes disagree"),
        (lambda t: {**t, "b": t["b"].reshape(-1)}, "2-D"),
        (lambda t: {**t, "scaling": 0.0}, "finite positive"),
        (lambda t: {**t, "scaling": float("inf")}, "finite positive"),
    ],
)
def test_refuses_what_is_no_adapter_state(change, message):
    """Negative or non-finite moments, non-finite weights, mismatched shapes, a non-positive ``s``."""
    inputs = {"v_a": torch.rand(2, 3), "v_b": torch.rand(4, 2), "a": torch.rand(2, 3), "b": torch.rand(4, 2)}
    inputs["scaling"] = 1.0
    with pytest.raises(ValueError, match=message):
        lora_curvature(**change(inputs))
