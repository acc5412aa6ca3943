"""Regressions from the hardening issue that belong to no single stage: each input here once
ended in a traceback or a wrong number."""

from __future__ import annotations

import numpy as np
import pytest

import tpc
from tpc.errors import TpcError


def test_a_named_scalar_in_a_vector_expression() -> None:
    # the limit read the scalar's 0-d value as a batch of one (AssertionError in `tpc limit`)
    prog = tpc.loads("width n\nscalar c0 = 0.5\nvector g0 ~ N(0, 1)\nx = c0 * tanh(g0)\noutput m = mean(x * x)\n")
    x, w = np.polynomial.hermite_e.hermegauss(120)
    exact = 0.25 * float(np.sum(w * np.tanh(x) ** 2) / np.sqrt(2 * np.pi))
    assert tpc.limit(prog)["m"].value == pytest.approx(exact, rel=1e-9)
    finite = tpc.run(prog, width=4096, seeds=8)["m"]
    assert abs(finite.mean - exact) < 5 * finite.stderr + 1e-3


def test_autodiff_errors_name_the_instruction() -> None:
    with pytest.raises(TpcError) as exc:
        tpc.loads("width n\nvector y ~ N(0,1)\nvector v ~ N(0,1)\nx = y ^ y\nf = v @ x / sqrt(n)\n"
                  "output g = gram(grad(f, y))\n", "pow.tp")
    assert exc.value.span is not None and exc.value.span.line == 4
    assert "in 'x'" in exc.value.render() and exc.value.render().startswith("pow.tp:4:1: error:")
