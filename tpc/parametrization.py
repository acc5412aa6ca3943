"""abc-parametrizations and the Dynamical Dichotomy (Yang & Hu 2021, "Feature Learning in
Infinite-Width Neural Networks", Definition 3.1, Theorem 3.3 and Corollary 3.9).

An L-hidden-layer network has layers l = 1 (input), 2..L (hidden) and L+1 (readout), with
`W^l = n^-a_l w^l`, `w^l ~ N(0, n^-2b_l)` and learning rate `eta n^-c`.

Entrywise (adaptive) updates, Adam's `m / (sqrt(v) + eps)` or sign-SGD's `sign(g)`, have O(1)
entries whatever the gradient's size, so their learning rate has exponents of its own: layer l
moves by `eta n^-c'_l Q`, `W^l` by `eta n^-(a_l + c'_l) Q` (Yang & Littwin 2023, "Tensor Programs
IVb"; Yang et al. 2022, "Tensor Programs V", Table 3 for muP). With `f_l` the width exponent of
layer l's fan-in (0 for the input layer and biases, 1 for hidden layers and the readout), the
update moves the features of layer l <= L by `n^-r_l`, `r_l = a_l + c'_l - f_l`, and the output
through the readout by `n^-r_{L+1}`; the conditions mirror TP4's (`classify_adaptive`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tpc.errors import TpcError

PRESETS = ("sp", "ntk", "mup", "mf")
TOL = 1e-12


@dataclass(frozen=True)
class ABC:
    a: tuple[float, ...]  # a_1 .. a_{L+1}
    b: tuple[float, ...]
    c: float
    adaptive: tuple[float, ...] | None = None  # c'_1 .. c'_{L+1} of entrywise updates; None: c for each

    def adaptive_exponents(self) -> tuple[float, ...]:
        return self.adaptive if self.adaptive is not None else (self.c,) * len(self.a)

    @property
    def hidden_layers(self) -> int:
        return len(self.a) - 1


@dataclass
class Classification:
    abc: ABC
    r: float
    stable: bool
    nontrivial: bool
    regime: str  # "feature learning", "kernel", "trivial" or "unstable"
    failed: list[str] = field(default_factory=list)  # the stability conditions that fail
    entrywise: bool = False  # of entrywise updates (classify_adaptive), with the exponents c'
    trained: tuple[bool, ...] | None = None  # the abc entries a program trains (None: every one)

    def to_json(self) -> dict:
        # r is infinite where nothing below the readout trains (the features never move): JSON null
        out = {"a": list(self.abc.a), "b": list(self.abc.b), "c": self.abc.c,
               "r": self.r if math.isfinite(self.r) else None,
               "stable": self.stable, "nontrivial": self.nontrivial, "regime": self.regime,
               "failed": self.failed}
        if self.trained is not None:
            out["trained"] = list(self.trained)
        if self.entrywise:
            out["adaptive"] = list(self.abc.adaptive_exponents())
        return out


def limit_of_power(exponent: float) -> float | None:
    """n^exponent as n -> oo: 1 (exponent 0), 0 (negative), None where it grows."""
    if exponent > TOL:
        return None
    return 1.0 if exponent > -TOL else 0.0


def preset(name: str, hidden_layers: int) -> ABC:
    """The presets of TP4 (Table 1 and Section 3) for L hidden layers."""
    L = hidden_layers  # noqa: N806 - the paper's name
    if L < 1:
        raise TpcError("a network needs at least one hidden layer")
    if name == "sp":  # standard parametrization, learning rate ~ 1/n (the largest stable one)
        return ABC((0.0,) * (L + 1), (0.0,) + (0.5,) * L, 1.0)
    if name == "ntk":
        return ABC((0.0,) + (0.5,) * L, (0.0,) * (L + 1), 0.0)
    if name == "mup":  # and muP's exponents of entrywise updates, c'_l = f_l - a_l (TP5 Table 3)
        a = (-0.5,) + (0.0,) * (L - 1) + (0.5,)
        return ABC(a, (0.5,) * (L + 1), 0.0, tuple(fan_in_exponent(k, L) - a[k] for k in range(L + 1)))
    if name == "mf":
        if L != 1:
            raise TpcError("the mean-field parametrization is defined for one hidden layer")
        return ABC((0.0, 1.0), (0.0, 0.0), -1.0)
    raise TpcError(f"unknown parametrization '{name}'; choose one of {', '.join(PRESETS)} or abc(...)")


def fan_in_exponent(k: int, L: int) -> float:  # noqa: N803
    """The power of n in layer k's fan-in (k = 0 the input layer, L the readout)."""
    return 0.0 if k == 0 else 1.0


def classify_adaptive(p: ABC, trained: tuple[bool, ...] | None = None) -> Classification:
    """The Dynamical Dichotomy for entrywise updates: the features of layer l <= L move by n^-r_l,
    r_l = a_l + c'_l - f_l, r = min_l r_l; the readout's own update moves f by n^-r_{L+1}.
    Stable: TP4's initialisation conditions, r >= 0, r_{L+1} >= 0 and a_{L+1} + b_{L+1} + r >= 1
    (the features' move times the readout); nontrivial: f moves by O(1) (r_{L+1} = 0 or
    a_{L+1} + b_{L+1} + r = 1); feature learning: r = 0. `trained`: as for classify."""
    a, b, cp = p.a, p.b, p.adaptive_exponents()
    L = len(a) - 1  # noqa: N806
    on = trained or (True,) * (L + 1)
    init = [f for f in classify(p).failed if f.startswith("initialization")]
    rs = [a[k] + cp[k] - fan_in_exponent(k, L) for k in range(L + 1)]
    r, out_ab = min((rs[k] for k in range(L) if on[k]), default=math.inf), a[L] + b[L]
    failed = list(init)
    for k in range(L):
        if on[k] and rs[k] < -TOL:
            failed.append(f"training (entrywise updates): a_{k + 1} + c'_{k + 1} >= {fan_in_exponent(k, L):g} "
                          f"(here {a[k] + cp[k]:g})")
    if on[L] and rs[L] < -TOL:
        failed.append(f"training (entrywise updates): a_{L + 1} + c'_{L + 1} >= 1 (here {a[L] + cp[L]:g})")
    if not failed and out_ab + r < 1 - TOL:
        failed.append(f"training: a_{L + 1} + b_{L + 1} + r >= 1 (here {out_ab + r:g})")
    stable = not failed
    nontrivial = on[L] and abs(rs[L]) <= TOL or abs(out_ab + r - 1) <= TOL
    regime = ("unstable" if not stable else "trivial" if not nontrivial
              else "feature learning" if abs(r) <= TOL else "kernel")
    return Classification(p, r, stable, nontrivial, regime, failed, entrywise=True, trained=trained)


def classify(p: ABC, trained: tuple[bool, ...] | None = None) -> Classification:
    """TP4's classification (Yang & Hu 2021, Section 3): the features move by n^-r after a step,
    r = min(a_{L+1} + b_{L+1}, 2 a_{L+1} + c) + c - 1 + min_l (2 a_l + [l = 1]). `trained` (one flag
    per entry, None: all) restricts it to the layers a program trains: an untrained layer's update
    is no term of r, and an untrained readout's update none of the backward pass, so where nothing
    below the readout trains r is infinite (the features never move)."""
    a, b, c = p.a, p.b, p.c
    if len(a) != len(b) or len(a) < 2:
        raise TpcError("a and b need one entry per layer: input, hidden layers, readout (at least 2)")
    L = len(a) - 1  # noqa: N806
    on = trained or (True,) * (L + 1)
    out_ab = a[L] + b[L]
    movers = [2 * a[k] + (1 if k == 0 else 0) for k in range(L) if on[k]]
    back = min(out_ab, 2 * a[L] + c) if on[L] else out_ab
    r = back + c - 1 + min(movers) if movers else math.inf
    failed = []
    if abs(a[0] + b[0]) > TOL:
        failed.append(f"initialization: a_1 + b_1 = 0 (here {a[0] + b[0]:g})")
    for k in range(1, L):  # hidden layers 2..L
        if abs(a[k] + b[k] - 0.5) > TOL:
            failed.append(f"initialization: a_{k + 1} + b_{k + 1} = 1/2 (here {a[k] + b[k]:g})")
    if out_ab < 0.5 - TOL:
        failed.append(f"initialization: a_{L + 1} + b_{L + 1} >= 1/2 (here {out_ab:g})")
    if r < -TOL:
        failed.append(f"training: r >= 0 (here r = {r:g})")
    if out_ab + r < 1 - TOL:
        failed.append(f"training: a_{L + 1} + b_{L + 1} + r >= 1 (here {out_ab + r:g})")
    if on[L] and 2 * a[L] + c < 1 - TOL:
        failed.append(f"training: 2 a_{L + 1} + c >= 1 (here {2 * a[L] + c:g})")
    stable = not failed
    nontrivial = abs(out_ab + r - 1) <= TOL or on[L] and abs(2 * a[L] + c - 1) <= TOL
    if not stable:
        regime = "unstable"
    elif not nontrivial:
        regime = "trivial"
    else:
        regime = "feature learning" if abs(r) <= TOL else "kernel"
    return Classification(p, r, stable, nontrivial, regime, failed, trained=trained)
