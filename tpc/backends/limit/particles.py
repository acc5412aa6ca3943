"""The limit of Netsor-transpose programs (those with `W.T @ x`) by particles.

Every vector's `Z` is an array over the last axis, in one of two spaces with the same
algebra:
- `exact`: coefficients over an orthonormal basis of independent standard Gaussians plus a
  constant; `E[Z Z'] = <Z, Z'>` exactly. Used when every Nonlin is linear.
- `monte-carlo`: M particles; `E[Z Z'] = mean(Z Z')`.

For each matrix W there are two Gaussian families, W and W.T. Each keeps the vectors it has
multiplied, the Cholesky factor L of their covariance `s^2 E[x x']`, and its own standard
normals; a new `Zhat` is the new row of L times those normals (one row per batch element).
The Master Theorem's correction is computed, never assumed:
    Zdot^{W x} = s^2 sum_i Z^{y_i} E[dZ^x / dZhat^{W.T y_i}],
with the expectation by Stein's lemma, `E[grad_G f] = C^+ E[G f]`, for the W.T family's
Zhats G with covariance C (Yang 2020, Tensor Programs III; DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tpc.backends import device
from tpc.backends.limit.evaluate import LimitValue, evaluate_tree, interpret
from tpc.backends.limit.expect import psd_pinv, psd_tolerance, standard_deviations
from tpc.errors import NumericalError, TpcError
from tpc.ir import Node, Program, data_value, readout_weights
from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS, LINEAR_FNS
from tpc.ops.instructions import multiplies_data

Tensor = torch.Tensor


def is_linear_program(prog: Program) -> bool:
    """Every vector Nonlin is linear in its vector inputs (scalars may multiply them)."""
    for node in prog.needed():
        if node.op == "nonlin" and node.kind == "vector" and not _linear(node.params["tree"], prog, node):
            return False
        if node.op == "moment" and not _degree_ok(node.params["tree"], prog, node):
            return False
    return True


def _is_vec(tree: ex.Tree, prog: Program, node: Node) -> bool:
    return bool(ex.args_used(tree) & {i for i, nid in enumerate(node.inputs) if prog.node(nid).kind == "vector"})


def _linear(tree: ex.Tree, prog: Program, node: Node) -> bool:
    if not isinstance(tree, ex.Apply):
        return True
    if tree.fn in LINEAR_FNS:
        return all(_linear(a, prog, node) for a in tree.args)
    if tree.fn in ("mul", "div"):
        a, b = tree.args
        if tree.fn == "div":
            return _linear(a, prog, node) and not _is_vec(b, prog, node)
        return (not _is_vec(a, prog, node) and _linear(b, prog, node)) or (
            not _is_vec(b, prog, node) and _linear(a, prog, node))
    return not _is_vec(tree, prog, node)


def _degree_ok(tree: ex.Tree, prog: Program, node: Node) -> bool:
    """A moment's psi: linear, or a product of two linear factors (E[ab] = <a, b>)."""
    if _linear(tree, prog, node):
        return True
    if isinstance(tree, ex.Apply) and tree.fn == "mul":
        return all(_linear(a, prog, node) for a in tree.args)
    if isinstance(tree, ex.Apply) and tree.fn == "square":
        return _linear(tree.args[0], prog, node)
    return False


@dataclass
class Family:
    """One side (W or W.T) of a matrix: the vectors multiplied so far and their Zhats."""

    inputs: list[Tensor] = field(default_factory=list)  # Z^x, each (space,)
    zhats: list[Tensor] = field(default_factory=list)  # Zhat^{Wx}, each (space,)
    generators: list[Tensor] = field(default_factory=list)  # its standard normals, (space,) each
    chol: Tensor | None = None  # (k, k): Zhat_i = sum_j chol[i, j] generators[j]
    # the inputs multiplied before the other side of the matrix had any Gaussians (their Z^{Wx} is their
    # Zhat, kept above), by a fingerprint: W x of such a vector x, met again, is that same random variable
    # (at finite width the same numbers), not a new estimate
    seen: dict[tuple[float, float], list[int]] = field(default_factory=dict)

    def find(self, rows: Tensor) -> list[int | None]:
        """For each row, the index of an earlier input equal to it bit for bit whose Z^{Wx} is its Zhat."""
        out: list[int | None] = []
        for row, key in zip(rows, _fingerprints(rows), strict=True):
            out.append(next((i for i in self.seen.get(key, ()) if torch.equal(self.inputs[i], row)), None))
        return out

    def remember(self, rows: Tensor, start: int) -> None:
        for j, key in enumerate(_fingerprints(rows)):
            self.seen.setdefault(key, []).append(start + j)


def _fingerprints(rows: Tensor) -> list[tuple[float, float]]:
    """A row's sum and sum of squares: equal rows have equal ones (one device sync for all rows)."""
    return list(zip(rows.sum(-1).tolist(), (rows * rows).sum(-1).tolist(), strict=True))


@dataclass
class GaussianSpace:
    """Random variables as arrays over the last axis (coefficients or particles), and the two
    Gaussian families (W and W.T) of each matrix with their Zhat and Zdot rules. Shared by the
    particle evaluator of programs and by the unrolled training loops (tpc.train.pooled)."""

    exact: bool
    size: int  # basis size (exact) or number of particles
    dtype: torch.dtype = torch.float64
    seed: int = 0
    families: dict[object, Family] = field(default_factory=dict)
    next_basis: int = 1  # exact space: index 0 is the constant

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.method = "exact" if self.exact else "monte-carlo"

    def normals(self, k: int) -> Tensor:
        """k new independent standard Gaussians, (k, space)."""
        if self.exact:
            if self.next_basis + k > self.size:
                raise TpcError(f"internal: the exact basis ({self.size}) is too small")  # pragma: no cover
            out = torch.zeros((k, self.size), dtype=self.dtype)
            out[torch.arange(k), torch.arange(self.next_basis, self.next_basis + k)] = 1.0
            self.next_basis += k
            return out
        return device.normals((k, self.size), self.generator, self.dtype)

    def constant(self, value: Tensor) -> Tensor:
        """A deterministic value as an element of the space, broadcast over its shape."""
        value = torch.as_tensor(value, dtype=self.dtype)
        if self.exact:
            out = torch.zeros((*value.shape, self.size), dtype=self.dtype)
            out[..., 0] = value
            return out
        return value[..., None].expand(*value.shape, self.size)

    def expect(self, z: Tensor) -> Tensor:
        return z[..., 0] if self.exact else z.mean(-1)

    def inner(self, a: Tensor, b: Tensor) -> Tensor:
        """E[a b] with broadcasting over leading axes."""
        return (a * b).sum(-1) if self.exact else (a * b).mean(-1)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """E[a_i b_j] for rows a (..., p, space) and b (..., q, space): (..., p, q)."""
        out = a @ b.transpose(-1, -2)
        return out if self.exact else out / self.size

    def matmul(self, key: object, rows: Tensor, s2: float, where: str) -> Tensor:
        """Z^{W x} = Zhat + Zdot for rows x (b, space) of the family `key` = (matrix, transposed)."""
        mat, transposed = key  # type: ignore[misc]
        fam = self.families.setdefault(key, Family())
        other = self.families.get((mat, not transposed))
        known = fam.find(rows) if fam.seen else [None]
        if all(i is not None for i in known):
            # vectors multiplied before any Gaussian of W.T existed, again (features below frozen layers,
            # recomputed at every step): their own Z^{Wx}, the Zhat they had. A new estimate would extend
            # the Cholesky factor by a zero column (round-off) and add the Zdot of W after W.T, exactly 0
            # for them but Monte Carlo noise as estimated, which biased a zero feature_change upwards. The
            # normals a new estimate draws are drawn still, so the particles of all else stay as they were.
            self.normals(rows.shape[0])
            return torch.stack([fam.zhats[i] for i in known])  # type: ignore[index]
        start = len(fam.inputs)
        zhat = self.new_zhat(fam, rows, s2, where)
        if other and other.zhats:
            return zhat + self.zdot(other, rows, s2)
        fam.remember(rows, start)  # no Zdot: Z^{Wx} is the Zhat the family keeps anyway
        return zhat

    def new_zhat(self, fam: Family, rows: Tensor, s2: float, where: str) -> Tensor:
        """Zhat for new inputs `rows` (b, space): extends the family's Cholesky factor."""
        b = rows.shape[0]
        if not torch.isfinite(rows).all():
            raise NumericalError(f"{where}: a vector this matrix multiplies is not finite (overflow or NaN)")
        c_new = s2 * self.gram(rows, rows)  # (b, b)
        if not torch.isfinite(c_new).all():
            raise NumericalError(f"{where}: the covariance of this MatMul's Gaussians overflows")
        if fam.inputs:
            prev = torch.stack(fam.inputs)
            c_cross = s2 * self.gram(rows, prev)  # (b, k)
            # l21 L11^T = C_cross; L11 has zero columns where a vector repeated: the pseudo-inverse,
            # cut at round-off relative to L11's own largest singular value (scale-free)
            rtol = psd_tolerance(len(fam.inputs), self.dtype)
            l21 = c_cross @ torch.linalg.pinv(fam.chol.T, rtol=rtol)
            schur = c_new - l21 @ l21.T
            # l21 = C21 L11^-T carries eps cond(L11) |C21| |L11^-1| <= eps cond(L11)^2 |l21| of round-off,
            # and so does the Schur complement C22 - l21 l21^T (the usual eps cond(C11) bound, C11 = L11 L11^T):
            # near-duplicate inputs (attention that is nearly uniform at initialisation) make it large
            _, inv = standard_deviations(torch.diagonal(fam.chol @ fam.chol.T))
            sv = torch.linalg.svdvals(fam.chol * inv[:, None])
            kept = sv[sv > rtol * sv.max()] if sv.numel() else sv
            cond = float(kept.max() / kept.min()) ** 2 if kept.numel() else 1.0
        else:
            l21 = torch.zeros((b, 0), dtype=self.dtype)
            schur = c_new
            cond = 1.0
        schur = (schur + schur.T) / 2
        # PSD-ness in each new Gaussian's own units: the Schur complement divided by the standard
        # deviations of c_new (round-off in it is relative to those), never by an absolute floor
        sd, inv = standard_deviations(torch.diagonal(c_new))
        # on the CPU: an eigenbasis is not unique (LAPACK and cuSOLVER choose differently), and the
        # factor l22 must be the same on every device for the same generators to give the same particles
        evals, evecs = (t.to(schur.device) for t in torch.linalg.eigh((schur * inv[:, None] * inv[None, :]).cpu()))
        tol = psd_tolerance(len(fam.inputs) + b, self.dtype)
        if evals.numel() and float(evals.min()) < -tol * cond:
            raise NumericalError(
                f"{where}: the covariance of this MatMul's Gaussians is not positive "
                f"semidefinite (smallest eigenvalue {float(evals.min()):.3g} in units of the variances)"
            )
        # eigenvalues at round-off level are 0: a vector that is a combination of earlier ones adds
        # no new direction (an exactly zero column, which the pseudo-inverses above then ignore)
        evals = torch.where(evals > tol, evals, 0.0)
        l22 = sd[:, None] * evecs * torch.sqrt(evals)
        new = self.normals(b)
        zhat = l22 @ new
        if fam.inputs:
            zhat = zhat + l21 @ torch.stack(fam.generators)
        k = len(fam.inputs)
        chol = torch.zeros((k + b, k + b), dtype=self.dtype)
        if k:
            chol[:k, :k] = fam.chol
        chol[k:, :k] = l21
        chol[k:, k:] = l22
        fam.chol = chol
        fam.generators += list(new)
        fam.inputs += list(rows)
        fam.zhats += list(zhat)
        return zhat

    def zdot(self, other: Family, rows: Tensor, s2: float) -> Tensor:
        """s^2 sum_i Z^{y_i} E[dZ^x/dG_i] with E[grad_G Z^x] = C^+ E[G Z^x] (Stein)."""
        g = torch.stack(other.zhats)  # (k, space): the other family's Zhats
        y = torch.stack(other.inputs)  # (k, space): the vectors they multiplied
        cov = s2 * self.gram(y, y)  # C = s^2 E[y y']
        eg = self.gram(g, rows)  # (k, b): E[G Z^x]
        grad = psd_pinv(cov) @ eg  # (k, b): only round-off-level directions dropped
        return s2 * grad.T @ y


@dataclass
class ParticleEvaluator:
    prog: Program
    exact: bool
    dtype: torch.dtype = torch.float64
    particles: int = 2**16
    seed: int = 0
    values: dict[int, Tensor] = field(default_factory=dict)  # vector node -> (*batch, space)
    scalars: dict[int, LimitValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.space = GaussianSpace(self.exact, self.basis_size() if self.exact else self.particles, self.dtype,
                                   self.seed)
        self.method = self.space.method
        self.mc_used = not self.exact
        self.families = self.space.families

    # ------------------------------------------------------------------ the space
    def basis_size(self) -> int:
        count = 1
        for node in self.prog.needed():
            if node.op == "matmul":
                mat = self.prog.node(node.inputs[0])
                count += mat.params["cols"] if mat.params["role"] == "input" else int(np.prod(node.shape or (1,)))
        count += sum(len(g.members) for g in self.prog.groups)
        return count

    def normals(self, k: int) -> Tensor:
        return self.space.normals(k)

    def constant(self, value: Tensor) -> Tensor:
        return self.space.constant(value)

    def expect(self, z: Tensor) -> Tensor:
        return self.space.expect(z)

    def inner(self, a: Tensor, b: Tensor) -> Tensor:
        return self.space.inner(a, b)

    def run(self) -> dict[str, LimitValue]:
        return interpret(self.prog, self, self.scalars, "particles")

    def where(self, node: Node) -> str:
        return f"instruction {node.name}" + (f" (line {node.span.line})" if node.span else "")

    # ------------------------------------------------------------------ one rule per instruction
    # (`particles` in tpc/ops/instructions.py; a matrix has none: it enters through its MatMuls)
    def rule_data(self, node: Node) -> None:
        value = torch.tensor(np.asarray(data_value(self.prog, node), dtype=np.float64), dtype=self.dtype)
        self.scalars[node.id] = LimitValue(value, {"exact"})

    def rule_vector(self, node: Node) -> None:
        gi, group = self.prog.group_of(node.id)
        key = ("group", gi)
        if key not in self.families:  # sample the whole group at once
            w, v = np.linalg.eigh(group.cov)
            factor = torch.tensor(v * np.sqrt(np.clip(w, 0, None)), dtype=self.dtype)
            z = factor @ self.normals(len(group.members)) + self.constant(torch.tensor(group.mean))
            self.families[key] = Family(inputs=list(z))
        k = group.members.index(node.id)
        self.values[node.id] = self.families[key].inputs[k]

    def rule_nonlin(self, node: Node) -> None:
        if node.kind == "scalar":
            args = [self.scalars[i].value for i in node.inputs]
            value = evaluate_tree(node.params["tree"], args)
            self.scalars[node.id] = LimitValue(value, {"exact"} | self.methods(node.inputs))
            return
        args = [self.lift(i) for i in node.inputs]
        if self.exact:
            self.values[node.id] = _evaluate_linear(node.params["tree"], args, self.vector_args(node), self)
        else:
            self.values[node.id] = evaluate_tree(node.params["tree"], args)

    def vector_args(self, node: Node) -> set[int]:
        return {i for i, nid in enumerate(node.inputs) if nid in self.values}

    def lift(self, nid: int) -> Tensor:
        """An input of a coordinatewise expression: vectors as they are, scalars broadcast."""
        if nid in self.values:
            return self.values[nid]
        value = self.scalars[nid].value
        return value[..., None] if not self.exact else value

    def rule_moment(self, node: Node) -> None:
        args = [self.lift(i) for i in node.inputs]
        tree = node.params["tree"]
        if self.exact:
            value = _expect_degree2(tree, args, self.vector_args(node), self)
        else:
            value = evaluate_tree(tree, args).mean(-1)
        self.scalars[node.id] = LimitValue(value, {self.method} | self.methods(node.inputs))

    def rule_gram(self, node: Node) -> None:
        # a vector can be one value for its whole batch (autodiff's `r * c` for a readout r):
        # it is expanded to the batch its node declares
        xs, ys = (self.batched(i) for i in node.inputs)
        value = self.inner(xs[:, None, :], ys[None, :, :]).reshape(node.shape)
        self.scalars[node.id] = LimitValue(value, {self.method} | self.methods(node.inputs))

    def batched(self, nid: int) -> Tensor:
        """A vector's values as (batch, samples or coefficients); one row when it has no batch."""
        v = self.values[nid]
        v = v if v.dim() == 2 else v[None]
        rows = int(np.prod(self.prog.node(nid).shape, dtype=np.int64))
        return v.expand(rows, -1) if v.shape[0] == 1 and rows > 1 else v

    def rule_readout(self, node: Node) -> None:
        cov = self.readout_cov(node, node, node)
        self.scalars[node.id] = LimitValue(torch.zeros(node.shape, dtype=self.dtype), cov.methods, None, cov.value)

    def rule_cov(self, node: Node) -> None:
        f, g = (self.prog.node(i) for i in node.inputs)
        res = self.readout_cov(f, g, node)
        self.scalars[node.id] = res

    def readout_cov(self, f: Node, g: Node, node: Node) -> LimitValue:
        weights = readout_weights(self.prog, f, g)
        if weights is None:
            return LimitValue(torch.zeros(f.shape + g.shape, dtype=self.dtype), {"exact"})
        scale, rows = weights
        x, y = self.values[f.inputs[1]], self.values[g.inputs[1]]
        xs = x if x.dim() == 2 else x[None]
        ys = y if y.dim() == 2 else y[None]
        sx, sy = self.prog.node(f.inputs[1]).shape, self.prog.node(g.inputs[1]).shape
        value = scale * self.inner(xs[:, None, :], ys[None, :, :]).reshape(sx + sy)
        if rows is not None:
            eye = torch.eye(rows, dtype=self.dtype)
            value = value.reshape(*sx, 1, *sy, 1) * eye.reshape([1] * len(sx) + [rows] + [1] * len(sy) + [rows])
        return LimitValue(value, {self.method} | self.methods((f.inputs[1], g.inputs[1])))

    def methods(self, nids: tuple[int, ...]) -> set[str]:
        out: set[str] = set()
        for i in nids:
            if i in self.scalars:
                out |= self.scalars[i].methods
            elif i in self.values:
                out.add(self.method)
        return out

    def rule_matmul(self, node: Node) -> None:
        mat = self.prog.node(node.inputs[0])
        s2 = mat.params["var"]
        if multiplies_data(mat.params, bool(node.params.get("transposed"))):
            data = self.scalars[node.inputs[1]].value  # (..., d)
            key = (mat.id, False)
            if key not in self.families:
                d = mat.params["cols"] if mat.params["role"] == "input" else mat.params["rows"]
                self.families[key] = Family(generators=list(self.normals(d)))
            cols = torch.stack(self.families[key].generators)  # (d, space): the columns of U
            self.values[node.id] = (data @ cols) * np.sqrt(s2)
            return
        transposed = bool(node.params.get("transposed"))
        x = self.values[node.inputs[1]]
        rows = x.reshape(-1, x.shape[-1])  # one row per batch element
        z = self.space.matmul((mat.id, transposed), rows, s2, self.where(node))
        self.values[node.id] = z.reshape(x.shape)


def _evaluate_linear(tree: ex.Tree, args: list[Tensor], vec: set[int], ev: ParticleEvaluator) -> Tensor:
    """A linear expression on coefficient vectors (the args in `vec`): scalars multiply,
    constants go to index 0."""
    kind, val = _lin(tree, args, vec, ev)
    return val if kind == "vec" else ev.constant(val)


def _lin(tree: ex.Tree, args: list[Tensor], vec: set[int], ev: ParticleEvaluator) -> tuple[str, Tensor]:
    if isinstance(tree, ex.Arg):
        return ("vec" if tree.index in vec else "sc"), args[tree.index]
    if isinstance(tree, ex.Const):
        return "sc", torch.tensor(tree.value, dtype=ev.dtype)
    parts = [_lin(a, args, vec, ev) for a in tree.args]
    fn = tree.fn
    if all(k == "sc" for k, _ in parts):
        return "sc", FUNCTIONS[fn].torch(*[v for _, v in parts])
    if fn == "identity":
        return parts[0]
    if fn == "neg":
        return "vec", -parts[0][1]
    if fn in ("add", "sub"):
        (ka, a), (kb, b) = parts
        a = a if ka == "vec" else ev.constant(a)
        b = b if kb == "vec" else ev.constant(b)
        return "vec", a + b if fn == "add" else a - b
    if fn == "mul":
        (ka, a), (kb, b) = parts
        vec, sc = (a, b) if ka == "vec" else (b, a)
        return "vec", vec * sc[..., None]
    if fn == "div":
        (ka, a), (kb, b) = parts
        return "vec", a / b[..., None]
    raise TpcError(f"'{fn}' is not linear")  # pragma: no cover - guarded by is_linear_program


def _expect_degree2(tree: ex.Tree, args: list[Tensor], vec: set[int], ev: ParticleEvaluator) -> Tensor:
    if isinstance(tree, ex.Apply) and tree.fn == "mul":
        a = _evaluate_linear(tree.args[0], args, vec, ev)
        b = _evaluate_linear(tree.args[1], args, vec, ev)
        return ev.inner(a, b)
    if isinstance(tree, ex.Apply) and tree.fn == "square":
        a = _evaluate_linear(tree.args[0], args, vec, ev)
        return ev.inner(a, a)
    return ev.expect(_evaluate_linear(tree, args, vec, ev))
