"""Coordinatewise functions, each with all of its rules side by side.

For a function `f` the registry holds:
- `torch`: its implementation on tensors (used by both backends, and by quadrature);
- `code`: a template for the emitted PyTorch source (`{0}`, `{1}` are the arguments);
- `mean`: a closed form of `E f(u)`, `u ~ N(mu, var)`, when one is known;
- `pairs`: closed forms of `E f(u) g(v)` for centred `(u, v)` with `Var u = a`, `Var v = b`,
  `Cov(u, v) = c`, keyed by the name of `g`;
- `deriv`: the derivative `f'` as an expression tree in `Arg(0)` (for autodiff and for
  Stein's lemma: `E[u g(v)] = c E[g'(v)]`).

References for the kernels: Cho & Saul 2009 (arc-cosine kernels of ReLU and step),
Williams 1997 (arcsine kernel of erf).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpc.ops.expr import Apply, Arg, Const, Tree
from tpc.ops.shapes import broadcast_shapes

if TYPE_CHECKING:
    import torch
    from torch import Tensor


class _LazyTorch:
    """torch, imported on first use: checking a program needs the registry's names, arities and
    derivatives, not torch (whose import is most of a fresh `tpc check`'s time)."""

    def __getattr__(self, name: str) -> Any:
        import torch as real

        globals()["torch"] = real  # later lookups find the module itself
        return getattr(real, name)


torch = _LazyTorch()  # noqa: F811 - replaced by the real module on first use


def _lazy(path: str) -> Callable[..., Tensor]:
    """torch's function `path` (e.g. "nn.functional.softplus"), looked up when first called."""
    def call(*args: Tensor) -> Tensor:
        fn: Any = torch
        for part in path.split("."):
            fn = getattr(fn, part)
        return fn(*args)

    call.__name__ = path.rsplit(".", 1)[-1]
    return call
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


@dataclass
class Function:
    name: str
    arity: int
    torch: Callable[..., Tensor]
    code: str
    mean: Callable[[Tensor, Tensor], Tensor] | None = None
    pairs: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = field(default_factory=dict)
    deriv: Callable[[Tree], Tree] | None = None
    infix: str | None = None  # '+', '-', '*', '/', '^' for arithmetic
    linear: bool = False  # add, sub, neg: preserve Gaussianity
    user_visible: bool = True  # callable by name in a program
    jumps: bool = False  # discontinuous: its a.e. derivative is not its Stein derivative
    smooth: bool = True  # False for kinks, jumps and singularities: Gauss-Hermite is unreliable there
    # positive homogeneity degree p, f(t x) = t^p f(x) for t > 0: E f(u) g(v) over a covariance scaled
    # by s is s^((p+q)/2) times the unscaled one
    homogeneous: float | None = None


FUNCTIONS: dict[str, Function] = {}
# the functions that keep a linear combination of Gaussians linear (particles' exact path, plans)
LINEAR_FNS = frozenset({"add", "sub", "neg", "identity"})


def register(fn: Function) -> Function:
    FUNCTIONS[fn.name] = fn
    return fn


def _phi(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) / _SQRT2PI


def _Phi(x: Tensor) -> Tensor:  # noqa: N802 - the usual name of the normal cdf
    return 0.5 * (1.0 + torch.erf(x / _SQRT2))


def _sd(var: Tensor) -> Tensor:
    """sqrt(var), never 0: a zero variance (a Gaussian that is the constant 0) divides a zero covariance
    to 0, not 0/0. The floor is a normal number of the dtype (1e-300 underflows to 0 in float32)."""
    floor = 1e-300 if var.dtype == torch.float64 else torch.finfo(var.dtype).tiny
    return torch.sqrt(torch.clamp(var, min=floor))


class CorrelationError(ValueError):
    """|Cov(u, v)| > sd(u) sd(v): the covariance handed to a kernel is not PSD."""


_STRETCH: dict[Any, float] = {}  # dtype -> 1 + 4 eps, filled on first use


def _correlation(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """c / sqrt(ab) as a new tensor, checked to lie in [-1, 1] up to round-off, then clamped.

    A correlation within rounding of +-1 is +-1: the same Gaussian on both sides (a kernel's diagonal)
    must give arccos = 0 exactly, not sqrt(rounding) (1e-8 in float64, 3e-4 in float32). Stretching by
    4 ulps (folded into the small factor 1/sqrt(a)), then clamping, snaps those and moves every other
    angle by ~1e-15.
    """
    if c.dtype not in _STRETCH:
        _STRETCH[c.dtype] = 1 + 4 * torch.finfo(c.dtype).eps if c.dtype.is_floating_point else 1.0
    stretch = _STRETCH[c.dtype]
    cos = torch.div(c, _sd(a) / stretch)
    shape = broadcast_shapes(cos.shape, b.shape)
    if cos.shape != shape:
        cos = cos.expand(shape).clone()
    cos.div_(_sd(b))
    if cos.numel():
        lo, hi = torch.aminmax(cos)
        worst = max(-float(lo), float(hi)) / stretch
        if worst > 1 + 1e-6:
            raise CorrelationError(f"a correlation of {worst:.6g} (beyond 1)")
    return cos.clamp_(-1.0, 1.0)


# the step kernels J0 of the last few large covariances, with a, b, c themselves (holding them keeps
# their storage alive, so no other tensor can reuse the addresses in a key) and whether the J0 is
# private: an NTK asks for the relu and step kernels of each covariance, and J0 is part of both. A J0
# that only the relu kernel has used is handed over on the next request (its caller owns it and may
# form a product in place); one that a caller already has stays here, shared. Grouped by covariance
# (the storage of the variances a, which the blocks of a kernel kept by blocks share): one entry per
# block.
_STEP_KERNELS: dict[int, dict[tuple, tuple[Tensor, bool, tuple[Tensor, ...]]]] = {}
_KEPT_COVARIANCES = 3


def kernel_is_shared(t: Tensor) -> bool:
    """t is a step kernel that the cache holds (a caller may have it too): it must not be written."""
    return any(j0 is t for group in _STEP_KERNELS.values() for j0, _, _ in group.values())


def clear_kernel_cache() -> None:
    """Drop the shared step kernels (the limit evaluator calls this when it is done)."""
    _STEP_KERNELS.clear()


def _step_kernel(a: Tensor, b: Tensor, c: Tensor, cos: Tensor | None = None) -> Tensor:
    """J0 = (pi - t) / (2 pi), t = arccos(c / sqrt(ab)), formed in place over the angle. `cos` (kept
    intact) saves recomputing the correlation; only the relu kernel gives it, and it uses J0 itself
    and hands it to nobody. Keyed by storage, layout and version of a, b, c; callers must not modify
    a result that `kernel_is_shared` reports."""
    key = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t._version, t.dtype) for t in (a, b, c))
    storage = a.untyped_storage().data_ptr()
    group = _STEP_KERNELS.get(storage, {})
    if key in group:
        j0, private, _ = group[key]
        if private:
            del group[key]
            if not group:  # an empty group would count against the covariances kept
                del _STEP_KERNELS[storage]
        return j0
    # (pi - arccos x) / (2 pi) = 1/4 + arcsin(x) / (2 pi): float64 arcsin is about a quarter faster
    # than arccos in torch, and J0 is accurate to an ulp of 1/2 either way; clamped, as rounding at
    # x = -1 would leave -6e-18 where the kernel is 0
    angle = torch.asin_(_correlation(a, b, c)) if cos is None else torch.asin(cos)
    j0 = torch.add(torch.tensor(0.25, dtype=angle.dtype), angle, alpha=1 / (2 * math.pi), out=angle).clamp_(0.0, 0.5)
    if j0.numel() >= 2**14:  # only worth keeping for large kernels; keep those of the last three
        if storage not in _STEP_KERNELS:
            while len(_STEP_KERNELS) >= _KEPT_COVARIANCES:
                _STEP_KERNELS.pop(next(iter(_STEP_KERNELS)))
            _STEP_KERNELS[storage] = group
        group[key] = (j0, cos is not None, (a, b, c))
    return j0


def A(fn: str, *args: Tree) -> Apply:  # noqa: N802 - short, for derivative rules
    return Apply(fn, tuple(args))


X = Arg(0)

# ---------------------------------------------------------------------------- arithmetic

register(Function("add", 2, _lazy("add"), "{0} + {1}", infix="+", linear=True, user_visible=False))
register(Function("sub", 2, _lazy("sub"), "{0} - {1}", infix="-", linear=True, user_visible=False))
register(Function("mul", 2, _lazy("mul"), "{0} * {1}", infix="*", user_visible=False))
register(Function("div", 2, _lazy("div"), "{0} / {1}", infix="/", user_visible=False))
register(Function("pow", 2, _lazy("pow"), "{0} ** {1}", infix="^", user_visible=False))
register(
    Function(
        "neg", 1, _lazy("neg"), "-{0}", mean=lambda m, v: -m, linear=True, user_visible=False,
        deriv=lambda x: Const(-1.0),
    )
)

# ---------------------------------------------------------------------------- nonlinearities


def _relu_mean(m: Tensor, v: Tensor) -> Tensor:
    s = _sd(v)
    return m * _Phi(m / s) + s * _phi(m / s)


def _relu_relu(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    # sqrt(ab)/(2 pi) (sin t + (pi - t) cos t) = sqrt(ab) sin(t) / (2 pi) + J0 c, t = arccos(c / sqrt(ab)),
    # with sin t = sqrt(1 - cos^2 t) (one sqrt instead of a float64 sin; near cos = +-1, 1 - fl(cos^2)
    # is exact to a few ulps of sin^2), in place over the correlation: over a large batch this kernel
    # is bound by memory traffic, so every full-size pass and allocation counts.
    cos = _correlation(a, b, c)
    j0 = _step_kernel(a, b, c, cos)
    torch.addcmul(torch.tensor(1.0, dtype=cos.dtype), cos, cos, value=-1.0, out=cos)
    cos.sqrt_().mul_(_sd(a) / (2 * math.pi)).mul_(_sd(b))
    return cos.addcmul_(j0, c)


def _step_step(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return _step_kernel(a, b, c)


def _relu_step(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    # E[u 1(u>0) 1(v>0)] = sqrt(a) (1 + rho) / (2 sqrt(2 pi))
    return _sd(a) * (1.0 + _correlation(a, b, c)) / (2 * _SQRT2PI)


def _erf_erf(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return (2 / math.pi) * torch.arcsin(
        torch.clamp(2 * c / torch.sqrt((1 + 2 * a) * (1 + 2 * b)), -1.0, 1.0)
    )


def _derf_derf(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    # E[(2/sqrt pi) e^{-u^2} (2/sqrt pi) e^{-v^2}] = (4/pi) / sqrt((1+2a)(1+2b) - 4c^2)
    return (4 / math.pi) / torch.sqrt(torch.clamp((1 + 2 * a) * (1 + 2 * b) - 4 * c * c, 1e-300))


def _abs_abs(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    rho = _correlation(a, b, c)
    return (2 / math.pi) * torch.sqrt(a * b) * (torch.sqrt(1 - rho * rho) + rho * torch.arcsin(rho))


def _id_id(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return c


def _square_square(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return a * b + 2 * c * c


def _gelu(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x)


def _dgelu(x: Tensor) -> Tensor:
    return _Phi(x) + x * _phi(x)


def _gelu_mean(m: Tensor, v: Tensor) -> Tensor:
    # E[u Phi(u)] for u ~ N(m, v): m Phi(m/r) + v phi(m/r) / r with r = sqrt(1 + v)
    r = torch.sqrt(1 + v)
    return m * _Phi(m / r) + v * _phi(m / r) / r


def _abs_mean(m: Tensor, v: Tensor) -> Tensor:
    s = _sd(v)
    return m * (1 - 2 * _Phi(-m / s)) + 2 * s * _phi(m / s)


def _derf(x: Tensor) -> Tensor:
    return (2 / math.sqrt(math.pi)) * torch.exp(-x * x)


def _step(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


register(
    Function(
        "identity", 1, lambda x: x, "{0}", mean=lambda m, v: m,
        pairs={"identity": _id_id}, deriv=lambda x: Const(1.0), homogeneous=1.0,
    )
)
register(
    Function(
        "relu", 1, _lazy("relu"), "torch.relu({0})", mean=_relu_mean,
        pairs={"relu": _relu_relu, "step": _relu_step}, smooth=False, deriv=lambda x: A("step", x),
        homogeneous=1.0,
    )
)
register(
    Function(
        "step", 1, _step, "({0} > 0).to({0}.dtype)", mean=lambda m, v: _Phi(m / _sd(v)),
        pairs={"step": _step_step, "identity": lambda a, b, c: c / torch.sqrt(2 * math.pi * a)},
        smooth=False, deriv=lambda x: Const(0.0), jumps=True, homogeneous=0.0,
    )
)
register(
    Function(
        "sign", 1, _lazy("sign"), "torch.sign({0})",
        mean=lambda m, v: 2 * _Phi(m / _sd(v)) - 1, smooth=False, deriv=lambda x: Const(0.0), jumps=True,
        pairs={"identity": lambda a, b, c: 2 * c / torch.sqrt(2 * math.pi * a)},
    )
)
register(
    Function(
        "abs", 1, _lazy("abs"), "torch.abs({0})", mean=_abs_mean,
        pairs={"abs": _abs_abs}, smooth=False, deriv=lambda x: A("sign", x),
    )
)
register(
    Function(
        "tanh", 1, _lazy("tanh"), "torch.tanh({0})",
        deriv=lambda x: A("sub", Const(1.0), A("square", A("tanh", x))),
    )
)
register(
    Function(
        "erf", 1, _lazy("erf"), "torch.erf({0})",
        mean=lambda m, v: torch.erf(m / torch.sqrt(1 + 2 * v)),
        pairs={"erf": _erf_erf}, deriv=lambda x: A("derf", x),
    )
)
register(
    Function(
        "derf", 1, _derf, "(2 / math.sqrt(math.pi) * torch.exp(-{0} ** 2))",
        mean=lambda m, v: (2 / math.sqrt(math.pi)) * torch.exp(-m * m / (1 + 2 * v))
        / torch.sqrt(1 + 2 * v),
        pairs={"derf": _derf_derf},
        deriv=lambda x: A("mul", A("mul", Const(-2.0), x), A("derf", x)),
    )
)
register(
    Function(
        "sigmoid", 1, _lazy("sigmoid"), "torch.sigmoid({0})",
        deriv=lambda x: A("mul", A("sigmoid", x), A("sub", Const(1.0), A("sigmoid", x))),
    )
)
register(
    Function(
        "gelu", 1, _gelu, "torch.nn.functional.gelu({0})", mean=_gelu_mean,
        deriv=lambda x: A("dgelu", x),
    )
)
register(
    Function(
        "dgelu", 1, _dgelu,
        "(0.5 * (1 + torch.erf({0} / math.sqrt(2))) + {0} * torch.exp(-{0} ** 2 / 2) / math.sqrt(2 * math.pi))",
        deriv=lambda x: A("mul", A("sub", Const(2.0), A("square", x)),
                          A("div", A("exp", A("mul", Const(-0.5), A("square", x))), Const(_SQRT2PI))),
    )
)
register(
    Function(
        "softplus", 1, _lazy("nn.functional.softplus"), "torch.nn.functional.softplus({0})",
        deriv=lambda x: A("sigmoid", x),
    )
)
register(
    Function(
        "sin", 1, _lazy("sin"), "torch.sin({0})", mean=lambda m, v: torch.sin(m) * torch.exp(-v / 2),
        pairs={
            "sin": lambda a, b, c: torch.exp(-(a + b) / 2) * torch.sinh(c),
            "cos": lambda a, b, c: torch.zeros_like(c),
        },
        deriv=lambda x: A("cos", x),
    )
)
register(
    Function(
        "cos", 1, _lazy("cos"), "torch.cos({0})", mean=lambda m, v: torch.cos(m) * torch.exp(-v / 2),
        pairs={"cos": lambda a, b, c: torch.exp(-(a + b) / 2) * torch.cosh(c)},
        deriv=lambda x: A("neg", A("sin", x)),
    )
)
register(
    Function(
        "exp", 1, _lazy("exp"), "torch.exp({0})", mean=lambda m, v: torch.exp(m + v / 2),
        pairs={"exp": lambda a, b, c: torch.exp((a + b) / 2 + c)},
        deriv=lambda x: A("exp", x),
    )
)
register(
    Function(
        "square", 1, _lazy("square"), "{0} ** 2", mean=lambda m, v: m * m + v,
        pairs={"square": _square_square}, deriv=lambda x: A("mul", Const(2.0), x),
    )
)
register(
    Function(
        "sqrt", 1, _lazy("sqrt"), "torch.sqrt({0})",
        smooth=False, deriv=lambda x: A("div", Const(0.5), A("sqrt", x)),
    )
)
register(
    Function("log", 1, _lazy("log"), "torch.log({0})", smooth=False, deriv=lambda x: A("div", Const(1.0), x))
)

# `id` is accepted as a short name for identity in programs
ALIASES = {"id": "identity"}


def pair_degree(f: str, g: str) -> float | None:
    """The homogeneity degree (p + q) / 2 of E f(u) g(v) in the covariance, or None."""
    p, q = FUNCTIONS[f].homogeneous, FUNCTIONS[g].homogeneous
    return None if p is None or q is None else (p + q) / 2


def pair_rule(f: str, g: str) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """Closed form of E f(u) g(v) (centred), trying both orders, then Stein's lemma for identity."""
    if g in FUNCTIONS[f].pairs:
        return FUNCTIONS[f].pairs[g]
    if f in FUNCTIONS[g].pairs:
        rule = FUNCTIONS[g].pairs[f]
        return lambda a, b, c: rule(b, a, c)
    if f == "identity" or g == "identity":
        other = g if f == "identity" else f
        deriv = FUNCTIONS[other].deriv
        if deriv is None or FUNCTIONS[other].jumps:
            return None
        d = deriv(X)
        # Stein: E[u g(v)] = Cov(u, v) E[g'(v)]; closed when g' is a constant or a function
        # with a closed-form mean
        if isinstance(d, Const):
            value = d.value
            rule_c = lambda a, b, c: c * value  # noqa: E731
        elif isinstance(d, Apply) and d.args == (X,) and FUNCTIONS[d.fn].mean is not None:
            mean = FUNCTIONS[d.fn].mean
            rule_c = lambda a, b, c: c * mean(torch.zeros_like(b), b)  # noqa: E731
        else:
            return None
        if f == "identity":
            return rule_c
        return lambda a, b, c: rule_c(b, a, c)
    return None
