"""Fixtures the test modules share: a two-expert synthetic family (a module that needs another defines its own)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base, 2 experts and their full curvature stores (:func:`mergekit_ota.testing.make_family`)."""
    from mergekit_ota.testing import make_family

    return make_family(str(tmp_path_factory.mktemp("family")), n_experts=2)
