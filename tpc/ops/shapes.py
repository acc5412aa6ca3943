"""Broadcasting of tensor shapes, without torch's `broadcast_shapes`: its first call imports
sympy (about 0.5 s, most of a fresh process's first small limit)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """The shape that tensors of these shapes broadcast to (numpy's rule, which is torch's)."""
    return tuple(int(d) for d in np.broadcast_shapes(*(tuple(s) for s in shapes)))
