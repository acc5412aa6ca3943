"""The coordinate check (`tpc coordcheck`): how the size of each vector of a network scales with its
width during the first steps of training, at finite widths and in the infinite-width limit.

This is the check that the `mup` package draws by hand: for every vector of the model (the
pre-activations `h^l = W^l x^(l-1)`, the post-activations `x^l` that the next layer reads) and its
output f, the mean absolute coordinate `mean_i |h_i|`, averaged over the rows of a data set (by
default the first one the training loop applies the model to), before the first update (step 0)
and after each of the first K top-level iterations of the program's loops.
- At finite width: the dense backend (`train/dense.py`, real weights in torch), for several seeds:
  their mean and its standard error.
- In the limit: `E|Z^h|` by the unrolled Netsor-transpose program on particles (`train/pooled.py`
  on a `LimitSpace`), whose vectors are the O(1) coordinates themselves (natural scale: at width n
  the same program on the seeds' matrices gives the dense values to round-off), for independent
  replicates of the particles. In the kernel regime the features stay at initialisation (TP4's
  Dynamical Dichotomy), so their limit is their step-0 value at every step, taken on the same
  particles; f is then a Gaussian process (random) and gets no line. An unstable parametrization
  has no limit.
A vector whose mean |coordinate| at the last step has a log-log slope beyond +-0.2 against the
width, by more than its standard errors explain, grows or vanishes with the width: in muP none
does, in SP with a fixed learning rate the hidden vectors and f grow.

The parameters are observed through the interpreter's own hooks: the backend's `initial()` (step 0)
and the progress callback after each top-level iteration (`Interpreter.run(progress, steps=K)`), so
any loop (momentum, schedules, several phases) runs as it does for `tpc run` and `tpc limit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from tpc import memory
from tpc.compare import fit_slope, once
from tpc.errors import Span, TpcError

if TYPE_CHECKING:  # torch and the backends are imported where the runs are
    import torch

    from tpc.train.interp import Rows
    from tpc.train.network import Network

DEFAULT_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_STEPS = 3
SLOPE = 0.2  # |slope| of log mean|h| against log n beyond which a vector grows or vanishes
SIGNIFICANCE = 3.0  # ... provided the change between the extreme widths is this many standard errors
LABEL_WIDTH = 48  # a vector's definition is cut here in the tables


@dataclass(frozen=True)
class Probe:
    """A vector of the model (or its output) whose mean |coordinate| is tracked."""

    name: str  # h2 (a pre-activation), x1 (a post-activation), v7 (another vector, --all), f (the output)
    definition: str  # W @ x1
    kind: str  # pre-activation | post-activation | vector | output
    step: int  # the model step (Network.model.steps)
    span: Span | None = None

    @property
    def label(self) -> str:
        return f"{self.name} = {self.definition}"


@dataclass
class Trend:
    slope: float  # of log mean|h| against log width at the last step (nan: one width, or none finite)
    verdict: str | None  # "grows" | "vanishes" | "not finite" | None

    def describe(self, diverged: list[int]) -> str:
        """`diverged`: the widths where the value is not finite."""
        if self.verdict == "not finite":
            return f"is not finite (training diverged) at width{'s' if len(diverged) > 1 else ''} " + \
                ", ".join(map(str, diverged))
        return f"{self.verdict} like n^{self.slope:.2f}"


@dataclass
class CoordCheck:
    """Every number of a coordinate check. `values[w, s, t, p]`: probe p's mean |coordinate| at width
    widths[w], seed s, after t steps; `limit[r, t, p]`: replicate r's E|Z| (nan where there is none)."""

    file: str
    data: str  # the data set whose rows are averaged over
    rows: int
    widths: list[int]
    seeds: int
    steps: int  # K: steps 0..K
    probes: list[Probe]
    values: np.ndarray
    parametrization: str
    regime: str
    limit: np.ndarray | None = None
    limit_note: str = ""  # how the limit was taken, or why there is none
    particles: int = 0
    trends: list[Trend] = field(default_factory=list)

    def mean(self) -> np.ndarray:
        """(widths, steps + 1, probes): the mean over seeds."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self.values.mean(1)

    def stderr(self) -> np.ndarray:
        """The standard error of that mean (nan for one seed)."""
        if self.seeds < 2:
            return np.full(self.mean().shape, np.nan)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged run's values
            return self.values.std(1, ddof=1) / np.sqrt(self.seeds)

    def limit_mean(self) -> np.ndarray | None:
        return None if self.limit is None else self.limit.mean(0)

    def limit_stderr(self) -> np.ndarray | None:
        if self.limit is None:
            return None
        if self.limit.shape[0] < 2:
            return np.full(self.limit.shape[1:], np.nan)
        return self.limit.std(0, ddof=1) / np.sqrt(self.limit.shape[0])

    def flagged(self) -> list[tuple[Probe, Trend]]:
        return [(p, t) for p, t in zip(self.probes, self.trends, strict=True) if t.verdict]

    def to_json(self) -> dict[str, Any]:
        mean, se = self.mean(), self.stderr()
        lmean, lse = self.limit_mean(), self.limit_stderr()
        vectors = []
        for i, (p, tr) in enumerate(zip(self.probes, self.trends, strict=True)):
            has_limit = lmean is not None and bool(np.isfinite(lmean[:, i]).any())
            vectors.append({
                "name": p.name, "definition": p.definition, "kind": p.kind,
                "line": p.span.line if p.span else None, "column": p.span.column if p.span else None,
                "mean": mean[:, :, i].T.tolist(),  # [step][width]
                "stderr": se[:, :, i].T.tolist(),
                "values": self.values[:, :, :, i].transpose(2, 0, 1).tolist(),  # [step][width][seed]
                "limit": lmean[:, i].tolist() if has_limit else None,  # [step]
                "limit_stderr": lse[:, i].tolist() if has_limit else None,
                "slope": tr.slope, "trend": tr.verdict,
            })
        return {"file": self.file, "data": self.data, "rows": self.rows, "widths": self.widths,
                "seeds": self.seeds, "steps": list(range(self.steps + 1)),
                "parametrization": self.parametrization, "regime": self.regime,
                "limit": {"note": self.limit_note, "particles": self.particles or None,
                          "replicates": None if self.limit is None else int(self.limit.shape[0])},
                "vectors": vectors}


# ---------------------------------------------------------------------------- what is tracked


def probes(net: Network, every: bool = False) -> list[Probe]:
    """The model's pre-activations (each n-vector a layer makes, `h^l` for TP4's layer l), the
    post-activations that a layer reads (`x^l`, the input of layer l + 1: the readout's is the
    features), with `every` also each other coordinatewise step (`v<i>`: a residual sum, a norm's
    parts), and the output f."""
    from tpc.ops import expr as ex

    steps = net.model.steps
    readers: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        for a in s.args:
            readers.setdefault(a, []).append(i)
    names: dict[int, tuple[str, str]] = {}
    used: set[str] = set()

    def unique(base: str) -> str:
        name, k = base, 2
        while name in used:  # a layer applied twice (shared weights)
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    for i, s in enumerate(steps):
        if s.kind != "vector" or s.op in ("input", "bias"):
            continue
        if s.op == "matmul":  # h_l = W_l x_(l-1), TP4's numbers; a fixed matrix A (no number) gives h_A
            la = net.layers[s.layer]
            names[i] = (unique(f"h_{la.name}" if la.fixed else f"h{la.index + 1}"), "pre-activation")
            continue
        layers = [j for j in readers.get(i, []) if steps[j].op == "matmul"]
        made = [a for a in s.args if a in names and names[a][1] == "pre-activation"]
        if layers and len(made) == 1 and all(steps[a].kind != "vector" or a in made for a in s.args):
            # phi(h2) is x2 (and phi(h2_2) x2_2, where a layer is applied twice: shared or tied weights)
            names[i] = (unique("x" + names[made[0]][0][1:]), "post-activation")
        elif layers:
            la = net.layers[steps[layers[0]].layer]
            names[i] = (unique(f"x_{la.name}" if la.fixed else f"x{la.index}"), "post-activation")
        elif every:
            names[i] = (unique(f"v{i}"), "vector")

    def text(j: int, top: bool = False) -> str:
        """Step j's value over the named ones; coordinatewise steps without a name are inlined."""
        s = steps[j]
        if j in names and not top:
            return names[j][0]
        if s.op == "input":
            from tpc.train.positions import patches_text

            return patches_text(net.model.arg, s.patches)
        if s.op == "bias":
            return str(s.layer)
        if s.op == "moment":
            return f"mean({text(s.args[0])})"
        if s.op == "matmul":
            flat = net.layers[s.layer].flattens
            if flat:
                return f"{s.layer} @ flatten({text(s.args[0])})"
            return f"{s.layer}{'.T' if s.transposed else ''} @ {text(s.args[0])}"
        if s.tree is None:  # another operation of the model (attention, pooling): by its name
            return f"{s.op}({', '.join([text(a) for a in s.args] + [str(k) for k in s.offset])})"
        leaves: list[str] = []
        return ex.render(tree(j, leaves), leaves)

    def tree(j: int, leaves: list[str]) -> ex.Tree:
        s = steps[j]
        inner = {}
        for k, a in enumerate(s.args):
            if steps[a].op == "fn" and steps[a].tree is not None and a not in names:
                inner[k] = tree(a, leaves)
            else:
                leaves.append(text(a))
                inner[k] = ex.Arg(len(leaves) - 1)
        return ex.substitute(s.tree, inner)

    def definition(j: int) -> str:
        """The rendered expression; where it is long (a norm written out), the program's own text."""
        out = text(j, True)
        span = steps[j].span
        if len(out) <= LABEL_WIDTH or span is None:
            return out
        lines = net.source.split("\n")[span.line - 1: span.end_line]
        if len(lines) == 1:
            lines[0] = lines[0][span.column - 1: span.end_column - 1]
        else:
            lines[0], lines[-1] = lines[0][span.column - 1:], lines[-1][: span.end_column - 1]
        own = " ".join(" ".join(lines).split())
        own = own if len(own) <= LABEL_WIDTH else own[: LABEL_WIDTH - 3] + "..."
        return f"{own} (line {span.line})"

    out = [Probe(name, definition(i), kind, i, steps[i].span) for i, (name, kind) in sorted(names.items())]
    return out + [Probe(net.model.name, definition(len(steps) - 1), "output", len(steps) - 1, steps[-1].span)]


def _statistics(vals: list[torch.Tensor], tracked: list[Probe], lead: int) -> torch.Tensor:
    """(*lead, probes): each probe's mean |coordinate| (in the limit, E|Z| over the particles),
    averaged over the rows; the output's mean |f| over rows and outputs. Vectors are (*lead, B, n)
    at finite width and (B, particles) in the limit, f is (*lead, B, k): a mean over every axis
    after the `lead` (seed) axes."""
    import torch

    return torch.stack([vals[p.step].detach().abs().flatten(lead).mean(-1) for p in tracked], -1)


class _Observed:
    """A backend that evaluates the model on `rows` at its initial parameters (step 0); the
    interpreter's progress callback does so after each top-level iteration (`observe`). Everything
    else is the wrapped backend's."""

    def __init__(self, inner: Any, rows: Rows, tracked: list[Probe]) -> None:
        self.inner, self.rows, self.tracked = inner, rows, tracked
        self.seen: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def initial(self) -> dict[str, Any]:
        params = self.inner.initial()
        self.observe(params)
        return params

    def observe(self, params: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            self.seen.append(_statistics(self.inner.apply(params, self.rows).vals, self.tracked, self.inner.lead))


def observe(net: Network, backend: Any, rows: Rows, tracked: list[Probe], steps: int,
            checks: bool = True) -> torch.Tensor:
    """(*lead, steps + 1, probes): the statistics at initialisation and after each of the first
    `steps` top-level iterations of the program's loops, on any backend. `checks=False` lets a
    diverging run go on (its values become inf or nan) instead of stopping it."""
    import torch

    from tpc.train.interp import Interpreter

    quiet = replace(net, outputs=[])  # only the training: no output is evaluated
    seen = _Observed(backend, rows, tracked)
    it = Interpreter(quiet, seen)
    it.checks = checks
    root = net.model.name
    with torch.enable_grad():  # the pooled backend differentiates losses with respect to f
        it.run(lambda done, total: seen.observe(it.params[root]), steps=steps)
    return torch.stack(seen.seen, dim=-2)


# ---------------------------------------------------------------------------- checks and plans


def top_steps(net: Network) -> int:
    prog = net.program
    return sum(prog.instrs[i].attrs["trip"] for i in prog.top if prog.instrs[i].op == "loop")


def check(net: object, steps: int | None, data: str | None) -> tuple[int, str]:
    """Refuse what a coordinate check cannot follow; the number of steps and the data set."""
    from tpc.train.network import Network

    if not isinstance(net, Network):
        raise TpcError("coordcheck follows the training of a network program (layers, a model and a loop); "
                       "this is a Netsor program without training")
    where = net.filename, net.source
    if net.has_tables:
        raise TpcError("coordcheck follows dense layers; a cbow program's word vectors are tables updated by "
                       "index (use tpc compare)", net.train.span if net.train else net.model.span).locate(*where)
    prog = net.program
    if prog is None or not any(prog.instrs[i].op == "loop" for i in prog.top):
        raise TpcError("coordcheck follows training, and this program has no training loop (a `train` statement "
                       "or a `for` loop)", net.model.span).locate(*where)
    total = top_steps(net)
    if steps is None:
        steps = min(DEFAULT_STEPS, total)
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise TpcError(f"steps must be a whole number of at least 0, got {steps!r}")
    if steps > total:
        loop = next(prog.instrs[i] for i in prog.top if prog.instrs[i].op == "loop")
        raise TpcError(f"--steps {steps}: the program's loops run {total} top-level iteration"
                       f"{'s' if total != 1 else ''}, so at most --steps {total}", loop.span).locate(*where)
    sets = net.point_sets()
    first = prog.applied_sets() or sets
    if data is None:
        if not first:
            raise TpcError("the model is applied to no data set: nothing to average over", net.model.span
                           ).locate(*where)
        data = first[0]
    elif data not in sets:
        raise TpcError(f"--data {data}: not a data set the model is applied to (those are {', '.join(sets)})")
    return steps, data


def finite_bytes(net: Network, width: int, dtype: str) -> int:
    return memory.finite_bytes_per_seed(net, width, 4 if dtype == "float32" else 8)


def limit_plan(net: Network, steps: int, particles: int, replicates: int, rows: int) -> tuple[str, int]:
    """What the limit will do, in words, and the memory it needs (0: none is taken)."""
    from tpc.train.limit import limit_refusal

    cls = net.classification()
    if not cls.stable:
        return f"no limit: the parametrization is unstable ({'; '.join(cls.failed)})", 0
    refusal = limit_refusal(net)
    if refusal is not None:
        return f"no limit: {refusal.message}", 0
    from tpc.train.pooled import Count, count, grids

    hidden = sum(1 for s in net.model.steps if s.op == "matmul" and net.layers[s.layer].role == "hidden")
    vectors = rows * len(net.model.steps)
    how = f"{particles} particles x {replicates} replicates"
    if cls.regime == "feature learning":
        c = count(net)  # the whole loop's plan (generous for K steps), and the observations on top
        c = Count(c.gaussians + (steps + 1) * rows * hidden, c.stored_rows, max(c.peak_rows, vectors))
        g = grids(net)  # entrywise updates of n x n layers: P x P grids (pooled.py)
        how += f", with up to {g} grids of {particles} x {particles}" if g else ""
        return f"limit: the unrolled training program on {how}", c.memory_bytes(particles) + 8 * g * particles**2
    finite_side = sum(int(la.cols if la.role == "input" else 1) for la in net.layers.values()
                      if la.role in ("input", "bias"))
    need = Count(finite_side + rows * hidden, 0, vectors).memory_bytes(particles)
    return (f"limit: {cls.regime} regime, where the features stay at initialisation: each vector's step-0 value "
            f"at every step, on {how}; f is random in the limit and gets none", need)


# ---------------------------------------------------------------------------- the runs


def finite_values(net: Network, tracked: list[Probe], rows: Rows, width: int, seeds: int, steps: int,
                  dtype: str = "float64", device: str = "cpu", memory_gb: float | None = None,
                  force: bool = False, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(seeds, steps + 1, probes) at one width, as many seeds at once as fit in the budget."""
    import torch

    from tpc.backends.torch.run import DTYPES
    from tpc.train.dense import DenseBackend

    chunk = memory.seeds_at_once(finite_bytes(net, width, dtype), seeds, f"one seed at width {width}", memory_gb,
                                 force, net.filename, net.source)
    parts = []
    for start in range(0, seeds, chunk):
        ids = list(range(start, min(seeds, start + chunk)))
        backend = DenseBackend(net, width, ids, DTYPES[dtype], device)
        parts.append(observe(net, backend, rows, tracked, steps, checks=False).to("cpu", torch.float64).numpy())
        if progress:
            progress(len(ids))
    return np.concatenate(parts)


def limit_values(net: Network, tracked: list[Probe], rows: Rows, steps: int, particles: int, replicates: int,
                 seed: int = 0, device: str = "cpu",
                 progress: Callable[[int], None] | None = None) -> np.ndarray | None:
    """(replicates, steps + 1, probes): E|Z| on independent particle sets; None where there is no
    limit (an unstable parametrization). In the kernel regime, the step-0 features at every step."""
    import torch

    from tpc.backends import device as on_device
    from tpc.seeds import replicate_seed
    from tpc.train.limit import limit_refusal
    from tpc.train.pooled import PooledBackend
    from tpc.train.spaces import LimitSpace

    cls = net.classification()
    if not cls.stable or limit_refusal(net) is not None:
        return None
    out = []
    with on_device.on(device):
        for r in range(replicates):
            if cls.regime == "feature learning":
                space = LimitSpace(net, False, particles, replicate_seed(seed, r))
                values = observe(net, PooledBackend(net, space), rows, tracked, steps)
            else:
                backend = PooledBackend(net, _features_at_init(net, particles, replicate_seed(seed, r)))
                with torch.no_grad():
                    first = _statistics(backend.apply(backend.initial(), rows).vals, tracked, 0)
                values = first[None].expand(steps + 1, -1).clone()
                values[:, [p.kind == "output" for p in tracked]] = float("nan")
            out.append(values.to("cpu", torch.float64).numpy())
            if progress:
                progress(1)
    return np.stack(out)


def _features_at_init(net: Network, particles: int, seed: int) -> Any:
    """A `LimitSpace` for the kernel regime's features at initialisation: the readout's natural-scale
    vector `v = n W` grows with n there (f_0 is a Gaussian process), so it is left at zero and f is
    not read."""
    import torch

    from tpc.train.spaces import LimitSpace

    class FeaturesAtInit(LimitSpace):
        def initial(self, layer: Any) -> torch.Tensor:
            if layer.role == "readout":
                return torch.zeros((int(layer.weight_rows), self.space.size), dtype=self.dtype)
            return super().initial(layer)

    return FeaturesAtInit(net, False, particles, seed)


def trend(widths: list[int], mean: np.ndarray, stderr: np.ndarray, limit: np.ndarray | None = None) -> Trend:
    """A vector's scaling at one step from its means (and standard errors) at each width; `limit`: the
    limit's replicates of E|Z| there, if any. A mean that falls towards a positive limit (from
    above, or within the errors at the largest width) approaches it and does not vanish: the
    n^-1/2 part of a vector whose limit is small, such as f after a few muP steps."""
    mean, stderr = np.asarray(mean, dtype=float), np.asarray(stderr, dtype=float)
    if not np.isfinite(mean).all():
        return Trend(float("nan"), "not finite")
    if len(widths) < 2 or (mean <= 0).any():  # (a vector that is 0 at some width: no power of n)
        return Trend(float("nan"), None)
    slope = fit_slope(widths, list(mean))
    lo, hi = int(np.argmin(widths)), int(np.argmax(widths))
    # the change of log mean|h| between the extreme widths, against its standard error (delta method)
    err = np.hypot(stderr[lo] / mean[lo], stderr[hi] / mean[hi])
    change = abs(np.log(mean[hi] / mean[lo]))
    beyond = not np.isfinite(err) or change > SIGNIFICANCE * err
    if abs(slope) > SLOPE and beyond:
        if slope < 0 and limit is not None and np.isfinite(limit).all() and limit.size and limit.mean() > 0:
            lim = float(limit.mean())
            lim_se = float(limit.std(ddof=1) / np.sqrt(limit.size)) if limit.size > 1 else 0.0
            if mean[hi] >= lim - SIGNIFICANCE * float(np.hypot(np.nan_to_num(stderr[hi]), lim_se)):
                return Trend(slope, None)
        return Trend(slope, "grows" if slope > 0 else "vanishes")
    return Trend(slope, None)


def coordcheck(net: Network, widths: list[int] | tuple[int, ...] = DEFAULT_WIDTHS, seeds: int = 4,
               steps: int | None = None, data: str | None = None, every: bool = False, particles: int | None = None,
               replicates: int = 4, seed: int = 0, dtype: str = "float64", device: str = "cpu",
               memory_gb: float | None = None, force: bool = False,
               progress: Callable[[int], None] | None = None) -> CoordCheck:
    """The coordinate check of a network program with loops (see the module's docstring). `progress`
    counts finished runs: each seed at each width, then each replicate of the limit."""
    from tpc import _count, _options
    from tpc.backends import device as on_device
    from tpc.train.interp import Rows

    widths = list(widths)
    if not widths:
        raise TpcError("coordcheck needs at least one width")
    for w in widths:
        _count(w, "a width")
    once(widths)
    _count(seeds, "seeds")
    _options({"dtype": dtype, "device": device, "particles": particles, "replicates": replicates, "seed": seed})
    from tpc.train.pooled import particles_for

    particles = particles_for(net, particles)  # fewer by default where entrywise updates need P x P grids
    steps, data = check(net, steps, data)
    on_device.check(device)
    memory_gb = on_device.memory_gb(device, memory_gb)
    tracked = probes(net, every)
    arr = net.data[data]
    rows = Rows(arr, data, np.arange(len(arr)))
    note, need = limit_plan(net, steps, particles, replicates, len(arr))
    if need:
        try:
            memory.require(need, f"the limit ({particles} particles)", memory_gb, force, hint="fewer --particles")
        except TpcError as err:
            raise err.locate(net.filename, net.source) from None
    for w in sorted(set(widths)):  # every width's budget before the first run
        memory.seeds_at_once(finite_bytes(net, w, dtype), seeds, f"one seed at width {w}", memory_gb, force,
                             net.filename, net.source)
    cls = net.classification()
    limit = limit_values(net, tracked, rows, steps, particles, replicates, seed, device, progress)
    values = np.stack([finite_values(net, tracked, rows, w, seeds, steps, dtype, device, memory_gb, force, progress)
                       for w in widths])
    res = CoordCheck(net.filename, data, len(arr), widths, seeds, steps, tracked, values, net.param_name,
                     cls.regime, limit, note, particles if limit is not None else 0)
    mean, se = res.mean(), res.stderr()
    res.trends = [trend(widths, mean[:, -1, i], se[:, -1, i], None if limit is None else limit[:, -1, i])
                  for i in range(len(tracked))]
    return res


# ---------------------------------------------------------------------------- text and plot


def _num(x: float) -> str:
    if not np.isfinite(x):
        return "-" if np.isnan(x) else "inf"
    return f"{x:.4g}"


def _relative(se: np.ndarray, mean: np.ndarray) -> str | None:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rel = se / np.where(mean != 0, np.abs(mean), np.nan)
    rel = rel[np.isfinite(rel)]
    return f"up to {100 * float(rel.max()):.2g}% of the value" if rel.size else None


def text(res: CoordCheck) -> str:
    """A table per step (rows: the vectors; columns: the widths, then the limit), then the scaling
    of each vector at the last step and the ones that grow or vanish."""
    mean, se = res.mean(), res.stderr()
    lmean, lse = res.limit_mean(), res.limit_stderr()
    labels = [p.label for p in res.probes]
    lw = max(len(s) for s in labels)
    cols = [str(w) for w in res.widths] + ["limit"]
    cells = [[_num(float(mean[w, t, i])) for w in range(len(res.widths))]
             + [_num(float(lmean[t, i])) if lmean is not None else "-"]
             for t in range(res.steps + 1) for i in range(len(labels))]
    cw = max(9, *(len(c) for c in cols + [c for row in cells for c in row]))
    lines = [f"mean |coordinate| over the {res.rows} rows of {res.data} (mean over {res.seeds} seed"
             f"{'s' if res.seeds != 1 else ''}; the output: mean |f|)"]
    for t in range(res.steps + 1):
        when = "at initialisation" if t == 0 else f"after {t} step{'s' if t != 1 else ''}"
        lines += ["", f"step {t} ({when})", "  " + " " * lw + "".join(f"  {c:>{cw}}" for c in cols)]
        for i, label in enumerate(labels):
            lines.append(f"  {label:<{lw}}" + "".join(f"  {c:>{cw}}" for c in cells[t * len(labels) + i]))
    vec = [p.kind != "output" for p in res.probes]  # (f may be zero in the limit: its errors are not relative)
    notes = []
    rel = _relative(se[:, :, vec], mean[:, :, vec])
    if rel is not None:
        notes.append(f"finite widths {rel}")
    if lmean is not None and lse is not None:
        rel = _relative(lse[:, vec], lmean[:, vec])
        if rel is not None:
            notes.append(f"the limit {rel} ({res.limit.shape[0]} replicates of {res.particles} particles)")
    lines.append("")
    if notes:
        lines.append("standard errors of the vectors' values: " + "; ".join(notes))
    lines.append(res.limit_note)
    if len(res.widths) < 2:
        lines.append("(a scaling with the width needs two widths or more)")
        return "\n".join(lines)
    lines += ["", f"at step {res.steps}, slope of log mean |h| against log n (|slope| > {SLOPE:g}, beyond the "
              "standard errors: grows or vanishes with the width)"]
    for p, tr in zip(res.probes, res.trends, strict=True):
        slope = f"{tr.slope:+.2f}" if np.isfinite(tr.slope) else "-"
        lines.append(f"  {p.label:<{lw}}  {slope:>6}" + (f"  {tr.verdict}" if tr.verdict else ""))
    flagged = res.flagged()
    if not flagged:
        lines.append("no vector grows or vanishes with the width")
    for p, tr in flagged:
        bad = [w for w, m in zip(res.widths, mean[:, -1, res.probes.index(p)], strict=True) if not np.isfinite(m)]
        lines.append(f"{p.label} {tr.describe(bad)}")
    return "\n".join(lines)


def plot(res: CoordCheck, path: str, title: str) -> None:
    """One panel per step: mean |h| against the width (log-log), a line per vector with its standard
    errors, its limit a dashed horizontal line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = res.steps + 1
    ncols = min(panels, 4)
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows + 0.8), squeeze=False, sharey=True)
    mean, se = res.mean(), res.stderr()
    lmean = res.limit_mean()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    w = np.asarray(res.widths, dtype=float)
    for t in range(panels):
        ax = axes[t // ncols][t % ncols]
        for i, p in enumerate(res.probes):
            colour = colours[i % len(colours)]
            m = mean[:, t, i]
            ok = np.isfinite(m) & (m > 0)
            if ok.any():
                err = se[:, t, i]
                ax.errorbar(w[ok], m[ok], yerr=np.where(np.isfinite(err), err, 0.0)[ok], fmt="o-", ms=3, color=colour,
                            label=p.label)
            if lmean is not None and np.isfinite(lmean[t, i]) and lmean[t, i] > 0:
                ax.axhline(lmean[t, i], ls="--", lw=1, color=colour)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title("initialisation" if t == 0 else f"after {t} step{'s' if t != 1 else ''}", fontsize=9)
        ax.set_xlabel("width n")
        ax.grid(True, which="both", alpha=0.3)
    for t in range(panels, nrows * ncols):
        axes[t // ncols][t % ncols].axis("off")
    for row in axes:
        row[0].set_ylabel("mean |coordinate|")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.suptitle(f"{title}\n(dashed: the infinite-width limit)" if lmean is not None else title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
