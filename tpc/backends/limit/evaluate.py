"""The infinite-width limit of a forward (Netsor) program by Gaussian propagation.

Each vector is a coordinatewise function of Gaussian blocks (`Block`): initial vectors, and
the outputs of MatMul instructions. Blocks from the same matrix form one Gaussian family with
`Cov(Z^{Wx}, Z^{Wy}) = s_W^2 E[Z^x Z^y]` (Master Theorem); blocks of different families are
independent. Scalars are deterministic: a Moment is `E psi(Z...)`. One loop over the
instructions in order, an environment from node to limit value (as JAX's eval_jaxpr).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tpc import memory
from tpc.backends import device as on_device
from tpc.backends.limit.expect import Expectation, Result, TensorLeaf, Var, is_zero, psd_pinv
from tpc.backends.limit.symmetric import BlockKernel, all_finite, cut, row_blocks, splits, whole
from tpc.errors import NumericalError, TpcError
from tpc.ir import Node, Program, data_value, readout_weights, rows_gram
from tpc.ops import expr as ex
from tpc.ops.functions import FUNCTIONS, clear_kernel_cache
from tpc.ops.instructions import INSTRUCTIONS, multiplies_data
from tpc.ops.shapes import broadcast_shapes
from tpc.seeds import replicate_seed

Tensor = torch.Tensor
METHODS = ("auto", "exact", "closed-form", "quadrature", "monte-carlo")


@dataclass(frozen=True)
class Block:
    """A leaf of a vector's expression: a Gaussian block of the limit."""

    bid: int


@dataclass(frozen=True)
class ScalarRef:
    """A leaf of a vector's expression: a deterministic scalar (its limit)."""

    nid: int


@dataclass(eq=False)
class Coef:
    """A leaf of a vector's expression: a deterministic coefficient over its batch (Zdot)."""

    value: Tensor


class NeedsParticles(Exception):  # noqa: N818 - a signal, not an error
    """A Zdot that mixes batch elements: the particle evaluator handles it."""


@dataclass
class BlockInfo:
    family: object
    shape: tuple[int, ...]
    mean: Tensor  # broadcastable to shape
    source: int  # the node that created it
    scale: float = 1.0  # its family's covariances are stored divided by this (a hidden layer's s^2)


@dataclass
class LimitValue:
    value: Tensor | BlockKernel  # a block kernel only inside the evaluator
    methods: set[str]
    stderr: Tensor | None = None
    cov: Tensor | BlockKernel | None = None  # for readouts: Gaussian in the limit with this covariance


@dataclass
class LimitEvaluator:
    prog: Program
    method: str = "auto"
    dtype: torch.dtype = torch.float64
    particles: int = 2**16
    seed: int = 0
    blocks: list[BlockInfo] = field(default_factory=list)
    family_blocks: dict[object, list[int]] = field(default_factory=dict)
    cov: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    trees: dict[int, object] = field(default_factory=dict)  # vector node -> expression
    scalars: dict[int, LimitValue] = field(default_factory=dict)
    vec_methods: dict[int, set[str]] = field(default_factory=dict)
    block_data: dict[int, int] = field(default_factory=dict)  # input-layer block -> its data node
    data_grams: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # (data, data) -> A B^T
    block_tree: dict[int, tuple[object, int]] = field(default_factory=dict)  # MatMul block -> (Z^x, x)
    cache: dict[tuple, Result] = field(default_factory=dict)  # kernels asked for twice
    # a family's covariances estimated by Monte Carlo: their standard error relative to the variances
    # (its PSD check must allow for it: separately sampled entries need not form a PSD matrix)
    noise: dict[object, float] = field(default_factory=dict)
    mc_used: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TpcError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def run(self) -> dict[str, LimitValue]:
        outputs = interpret(self.prog, self, self.scalars, "gaussian")
        return {name: LimitValue(whole(out.value), out.methods, out.stderr, None if out.cov is None else whole(out.cov))
                for name, out in outputs.items()}  # what leaves the evaluator is whole

    # ------------------------------------------------------------------ Gaussian blocks
    def new_block(self, family: object, shape: tuple[int, ...], mean: Tensor, source: int,
                  scale: float = 1.0) -> int:
        bid = len(self.blocks)
        self.blocks.append(BlockInfo(family, shape, mean, source, scale))
        self.family_blocks.setdefault(family, []).append(bid)
        return bid

    def block_cov(self, a: int, b: int) -> Tensor:
        """Cov(block a, block b), shape a.shape + b.shape; zero across families."""
        c = whole(self.stored_cov(a, b))
        scale = self.blocks[a].scale  # the same for both blocks of a family
        return c if scale == 1.0 or c.dim() == 0 and float(c) == 0.0 else scale * c

    def stored_cov(self, a: int, b: int) -> Tensor | BlockKernel:
        """Cov(block a, block b) divided by the family's scale (a view, never a copy), or a symmetric
        kernel kept by blocks."""
        if (a, b) in self.cov:
            return self.cov[a, b]
        if (b, a) in self.cov:
            c = self.cov[b, a]
            if isinstance(c, BlockKernel):  # symmetric: its own transpose
                return c
            ra = len(self.blocks[b].shape)
            return c.permute(tuple(range(ra, c.dim())) + tuple(range(ra)))
        return torch.zeros((), dtype=self.dtype)  # independent families: broadcasts, costs nothing

    # ------------------------------------------------------------------ expectations
    def expect(self, parts: list[tuple[object, int | None]], combine: str | None,
               shape: tuple[int, ...], node: Node, method: str | None = None) -> Result:
        """E of the product (combine='mul') of vector expressions, each placed with its batch
        axis on the given output axis, or of a single expression (combine=None). Kernels are
        cached: gram(x, x) after W @ x, or a backward kernel the NTK needs twice, cost once."""
        key = (tuple(parts), combine, shape, method)  # trees compare by value
        if key in self.cache:
            cached = self.cache[key]
            return Result(cached.value, set(cached.methods), cached.stderr)
        result = self._expect(parts, combine, shape, node, method)
        self.cache[key] = result  # values are never modified in place once computed
        return result

    def _expect(self, parts: list[tuple[object, int | None]], combine: str | None,
                shape: tuple[int, ...], node: Node, method: str | None = None) -> Result:
        rank = len(shape)
        variables: list[tuple[int, int | None]] = []  # (block, output axis) -> Var(index)
        placed = [self.place(t, ax, variables, rank) for t, ax in parts]
        tree = placed[0] if combine is None else ex.Apply(combine, tuple(placed))
        means = []
        for bid, axis in variables:
            m = self.blocks[bid].mean
            means.append(_place_tensor(m, axis, rank) if m.dim() else m)
        where = f"instruction {node.name}" + (f" (line {node.span.line})" if node.span else "")
        scales = [self.blocks[bid].scale for bid, _ in variables]
        noise = max((self.noise.get(self.blocks[bid].family, 0.0) for bid, _ in variables), default=0.0)

        def expectation(block: tuple[int, ...], means: list[Tensor], covs: Sequence[Sequence[Tensor]],
                        zero: Callable[[int, int], bool] | None = None) -> Expectation:
            # quadrature or Monte Carlo is chosen by the size of the whole result, not of a block
            return Expectation(block, means, covs, self.dtype, where, method or self.method, self.particles,
                               self.generator, scales, zero, whole_shape=shape, noise=noise)

        symmetric = _symmetric(parts, combine, shape)
        result = None
        if symmetric and splits(shape[0]):
            covs = [[self.placed_cov(vi, vj, rank, upper=True) for vj in variables] for vi in variables]
            result = self.by_upper_blocks(tree, means, covs, shape[0], expectation)
        if result is None:
            lazy = PlacedCovs(self, variables, rank)
            result = expectation(shape, means, lazy, lazy.is_zero)(tree)
        if "monte-carlo" in result.methods:
            self.mc_used = True
            if symmetric:  # entries (i, j) and (j, i) are sampled apart: their mean, symmetric like the kernel
                result = _symmetrised(result)
        return result

    def by_upper_blocks(self, tree: object, means: list[Tensor], covs: list[list[Tensor | BlockKernel]], n: int,
                        expectation: Callable[..., Expectation]) -> Result | None:
        """A kernel of a batch against itself, E[T(Z_i) T(Z_j)], block by block of its upper part;
        None where sampling served any block: Monte Carlo's particles must be the same for every
        entry (a kernel estimated from different particles in different blocks need not be PSD),
        so the caller evaluates it whole, from the same random state."""
        state = self.generator.get_state()
        rows = row_blocks(n)
        blocks: list[Tensor] = []
        methods: set[str] = set()
        for r0, r1 in rows:
            block = expectation((r1 - r0, n - r0), [cut(m, r0, r1) for m in means],
                                [[cut(c, r0, r1) for c in row] for row in covs])(_cut_leaves(tree, r0, r1))
            if "monte-carlo" in block.methods:
                self.generator.set_state(state)
                return None
            blocks.append(block.value)
            methods |= block.methods
        return Result(BlockKernel(blocks, rows), methods)

    def place(self, tree: object, axis: int | None, variables: list[tuple[int, int | None]], rank: int) -> object:
        """A vector's expression with its batch on output axis `axis`: blocks become Vars
        (numbered in `variables`), scalars and coefficients tensors shaped for broadcasting.
        (A method, not a closure: a recursive closure is a reference cycle that would keep the
        evaluator and its kernels alive until the garbage collector runs.)"""
        if isinstance(tree, Block):
            info = self.blocks[tree.bid]
            key = (tree.bid, axis if info.shape else None)
            if key not in variables:
                variables.append(key)
            return Var(variables.index(key))
        if isinstance(tree, ScalarRef):
            val = whole(self.scalars[tree.nid].value)
            return TensorLeaf(_place_tensor(val, axis if val.dim() else None, rank))
        if isinstance(tree, Coef):
            return TensorLeaf(_place_tensor(tree.value, axis if tree.value.dim() else None, rank))
        if isinstance(tree, ex.Apply):
            return ex.Apply(tree.fn, tuple(self.place(a, axis, variables, rank) for a in tree.args))
        return tree

    def placed_cov(self, vi: tuple[int, int | None], vj: tuple[int, int | None], rank: int,
                   upper: bool = False) -> Tensor | BlockKernel:
        """Cov of two variables, viewed for broadcasting over the output axes. `upper`: the caller
        reads it by upper blocks only (`by_upper_blocks`), so a block kernel is handed over as it
        is; else it is made whole."""
        (bi, ai), (bj, aj) = vi, vj
        c = self.stored_cov(bi, bj)
        if isinstance(c, BlockKernel):
            if ai is not None and ai == aj:
                view = [1] * rank
                view[ai] = c.n
                return c.diagonal().reshape(view)
            if upper and ai is not None and aj is not None:
                return c  # symmetric: the same placed either way round
            c = c.whole()
        if (ai is None and aj is None) or c.dim() == 0:
            return c
        view = [1] * rank
        if ai is None or aj is None:
            axis = ai if ai is not None else aj
            view[axis] = c.shape[0]
            return c.reshape(view)
        if ai == aj:
            d = torch.diagonal(c)
            view[ai] = d.shape[0]
            return d.reshape(view)
        if ai > aj:
            c = c.T
            ai, aj = aj, ai
        view[ai], view[aj] = c.shape
        return c if c.dim() == rank else c.reshape(view)  # a transposed view stays a view

    def methods_of(self, nids: tuple[int, ...]) -> set[str]:
        out: set[str] = set()
        for i in nids:
            out |= self.vec_methods.get(i, set())
            if i in self.scalars:
                out |= self.scalars[i].methods
        return out

    def axis_for(self, nid: int, offset: int = 0) -> int | None:
        return offset if self.prog.node(nid).shape else None

    # ------------------------------------------------------------------ one rule per instruction
    # (`gaussian` in tpc/ops/instructions.py; a matrix has none: it enters through its MatMuls)
    def rule_data(self, node: Node) -> None:
        if node.params.get("gram"):  # the NTK's input-layer term: the covariance of U x shares it
            self.scalars[node.id] = LimitValue(self.data_gram(*node.inputs), {"exact"})
            return
        # a view of the program's own array (no copy in float64); nothing writes to data values
        # (np.ascontiguousarray makes a 0-d array 1-d: a named scalar keeps its shape ())
        array = np.ascontiguousarray(data_value(self.prog, node), dtype=np.float64).reshape(node.shape)
        value = torch.from_numpy(array).to(torch.get_default_device(), self.dtype)
        self.scalars[node.id] = LimitValue(value, {"exact"})

    def data_gram(self, a: int, b: int) -> Tensor:
        """A B^T for data nodes a, b (rows against rows), formed once per evaluation: the covariance
        of an input layer's U x and U y is s^2 X Y^T, and the NTK's term for U is the same product."""
        if (a, b) not in self.data_grams:
            x, y = self.scalars[a].value, self.scalars[b].value
            if a == b and x.dim() == 2 and splits(x.shape[0]):  # X X^T by upper blocks
                rows = row_blocks(x.shape[0])
                self.data_grams[a, b] = BlockKernel([rows_gram(x[r0:r1], x[r0:]) for r0, r1 in rows], rows)
            else:
                self.data_grams[a, b] = rows_gram(x, y)
        return self.data_grams[a, b]

    def rule_vector(self, node: Node) -> None:
        gi, group = self.prog.group_of(node.id)
        family = ("group", gi)
        k = group.members.index(node.id)
        bid = self.new_block(family, (), torch.tensor(group.mean[k], dtype=self.dtype), node.id)
        for other in self.family_blocks[family][:-1]:
            j = group.members.index(self.blocks[other].source)
            self.cov[other, bid] = torch.tensor(group.cov[j, k], dtype=self.dtype)
        self.cov[bid, bid] = torch.tensor(group.cov[k, k], dtype=self.dtype)
        self.trees[node.id] = Block(bid)
        self.vec_methods[node.id] = set()

    def rule_matmul(self, node: Node) -> None:
        mat = self.prog.node(node.inputs[0])
        x = node.inputs[1]
        s2 = mat.params["var"]
        transposed = bool(node.params.get("transposed"))
        family = ("matrix", mat.id, transposed)
        zero = torch.zeros((), dtype=self.dtype)
        methods = self.methods_of((x,))
        if multiplies_data(mat.params, transposed):
            # U x or V.T c for finite x, c: a combination of U's columns (V's rows), exact
            # Cov = s2 X Y^T: the Gram stored as it is (the NTK shares it), s2 kept as the block's scale
            bid = self.new_block(family, node.shape, zero, node.id, s2)
            self.block_data[bid] = x
            for other in self.family_blocks[family]:
                self.cov[other, bid] = self.data_gram(self.block_data[other], x)
            methods |= {"exact"}
        else:
            tree = self.trees[x]
            # Cov = s2 E[Z^x Z^y]: E stored as it is (often a cached kernel), s2 kept as the block's scale
            bid = self.new_block(family, node.shape, zero, node.id, s2)
            self.block_tree[bid] = (tree, x)
            stderr = 0.0
            for other in self.family_blocks[family]:
                otree, ox = self.block_tree[other]
                shape = self.blocks[other].shape + node.shape
                res = self.expect(
                    [(otree, self.axis_for(ox)), (tree, self.axis_for(x, len(self.blocks[other].shape)))],
                    "mul", shape, node,
                )
                self.cov[other, bid] = res.value
                methods |= res.methods | self.methods_of((ox,))
                if res.stderr is not None:
                    stderr = max(stderr, float(res.stderr.max()))
            if stderr > 0:  # relative to the new block's own variance E[x^2] (the loop's last entry)
                var = float(whole(res.value).abs().max())
                rel = stderr / var if var > 0 else float("inf")
                self.noise[family] = max(self.noise.get(family, 0.0), rel)
            zdot, zdot_methods = self.zdot(("matrix", mat.id, not transposed), tree, x, s2, node)
            methods |= zdot_methods
            if zdot is not None:
                self.trees[node.id] = ex.Apply("add", (Block(bid), zdot))
                self.vec_methods[node.id] = methods
                return
        self.trees[node.id] = Block(bid)
        self.vec_methods[node.id] = methods

    def zdot(self, other: tuple, tree: object, x: int, s2: float, node: Node) -> tuple[object | None, set[str]]:
        """The Master Theorem's correction for W x when W.T has been used (or W for W.T x):
        Zdot = s^2 sum_i Z^{y_i} E[dZ^x / dG_i] over the other family's Zhats G_i, with the
        expectation by Stein's lemma, E[grad_G Z^x] = C^+ E[G Z^x]: no derivative is taken,
        so functions with jumps are handled, and a Zdot that vanishes is computed as zero."""
        blocks = self.family_blocks.get(other, [])
        if not blocks:
            return None, set()
        xshape = self.prog.node(x).shape
        if any(self.blocks[b].shape for b in blocks):
            # Over a batch, Zdot mixes batch elements. It is often zero by structure (backprop
            # from an independent centred readout): check with Stein, else use particles.
            methods = set()
            for b in blocks:
                rb = len(self.blocks[b].shape)
                # "auto" whatever the user's method: this decides structure (is it exactly zero?)
                res = self.expect([(Block(b), 0 if rb else None), (tree, self.axis_for(x, rb))], "mul",
                                  self.blocks[b].shape + xshape, node, method="auto")
                if not _all_zero(res.value):
                    raise NeedsParticles()
                methods |= res.methods
            return None, methods
        methods: set[str] = set()
        grad = None
        partials = self.linear_partials(tree)
        if partials is not None:
            # Z^x is linear in the blocks: E[dZ^x / dG_i] is its coefficient, exactly, with no
            # covariance to invert (a long W.T W chain's family is too ill-conditioned for that)
            zero = torch.zeros(xshape, dtype=self.dtype)
            try:
                grad = torch.stack([torch.as_tensor(partials.get(b, zero), dtype=self.dtype).expand(xshape)
                                    for b in blocks])
                methods.add("exact")
            except RuntimeError:  # a coefficient over another batch than x's: Stein below places it
                grad = None
        if grad is None:
            cov = torch.stack([torch.stack([self.block_cov(i, j) for j in blocks]) for i in blocks])
            stein = []
            for b in blocks:
                res = self.expect([(Block(b), None), (tree, self.axis_for(x))], "mul", xshape, node)
                stein.append(res.value)
                methods |= res.methods
            eg = torch.stack(stein)  # (k, *batch)
            grad = torch.tensordot(psd_pinv(cov), eg, dims=1)  # drops only round-off-level directions
        terms = []
        for i, b in enumerate(blocks):
            ytree, y = self.block_tree[b]
            methods |= self.methods_of((y,))
            terms.append(ex.Apply("mul", (Coef(s2 * grad[i]), ytree)))
        total = terms[0]
        for t in terms[1:]:
            total = ex.Apply("add", (total, t))
        return total, methods

    def linear_partials(self, tree: object) -> dict[int, Tensor] | None:
        """d tree / d Block(b) for every block, where the tree is linear in its blocks (sums, and
        products or quotients with factors free of blocks); None otherwise."""
        if isinstance(tree, Block):
            return {tree.bid: torch.ones((), dtype=self.dtype)}
        if not _has_block(tree):
            return {}
        if not isinstance(tree, ex.Apply):  # pragma: no cover - leaves are blocks or free of them
            return None
        fn, args = tree.fn, tree.args
        if fn in ("add", "sub"):
            a, b = (self.linear_partials(t) for t in args)
            if a is None or b is None:
                return None
            sign = 1.0 if fn == "add" else -1.0
            out = dict(a)
            for k, v in b.items():
                out[k] = out[k] + sign * v if k in out else sign * v
            return out
        if fn in ("neg", "identity"):
            a = self.linear_partials(args[0])
            return None if a is None else {k: -v if fn == "neg" else v for k, v in a.items()}
        if fn == "mul" and not _has_block(args[0]) or fn in ("mul", "div") and not _has_block(args[1]):
            free, lin = (args[0], args[1]) if fn == "mul" and not _has_block(args[0]) else (args[1], args[0])
            a = self.linear_partials(lin)
            if a is None:
                return None
            c = self.free_value(free)
            return {k: v * c if fn == "mul" else v / c for k, v in a.items()}
        return None

    def free_value(self, tree: object) -> Tensor:
        """The value of a tree without Gaussian blocks (constants, coefficients and limit scalars)."""
        if isinstance(tree, ex.Const):
            return torch.tensor(tree.value, dtype=self.dtype)
        if isinstance(tree, Coef):
            return tree.value
        if isinstance(tree, ScalarRef):
            return whole(self.scalars[tree.nid].value)
        return FUNCTIONS[tree.fn].torch(*[self.free_value(a) for a in tree.args])

    def rule_nonlin(self, node: Node) -> None:
        if node.kind == "scalar":
            args = [self.scalars[i].value for i in node.inputs]
            value = self.scalar_tree(node.params["tree"], args)
            methods = self.methods_of(node.inputs) | {"exact"}
            if node.params.get("symmetric") and "monte-carlo" in methods and isinstance(value, Tensor) \
                    and value.dim():  # (a number, the kernel of one input, is its own transpose)
                # a tangent kernel: its terms' cross Grams are sampled entry by entry, so (i, j) and
                # (j, i) differ by their errors; their mean, symmetric like the kernel
                half = value.dim() // 2
                value = (value + value.permute(*range(half, 2 * half), *range(half))) / 2
            self.scalars[node.id] = LimitValue(value, methods)
            return
        mapping = {}
        for i, nid in enumerate(node.inputs):
            mapping[i] = self.trees[nid] if nid in self.trees else ScalarRef(nid)
        self.trees[node.id] = ex.substitute(node.params["tree"], mapping)
        self.vec_methods[node.id] = self.methods_of(node.inputs)

    def scalar_tree(self, tree: ex.Tree, args: list[Tensor | BlockKernel]) -> Tensor | BlockKernel:
        """A coordinatewise expression of scalars. Of block kernels (an NTK's sum of products) and
        numbers it is a symmetric kernel too, computed and kept by the same blocks."""
        kernels = [a for a in args if isinstance(a, BlockKernel)]
        if kernels and all(a.rows == kernels[0].rows if isinstance(a, BlockKernel) else a.dim() == 0 for a in args):
            rows = kernels[0].rows
            return BlockKernel([evaluate_tree(tree, [cut(a, r0, r1) for a in args]) for r0, r1 in rows], rows)
        return evaluate_tree(tree, [whole(a) for a in args])

    def rule_moment(self, node: Node) -> None:
        mapping = {}
        for i, nid in enumerate(node.inputs):
            mapping[i] = self.trees[nid] if nid in self.trees else ScalarRef(nid)
        tree = ex.substitute(node.params["tree"], mapping)
        res = self.expect([(tree, 0 if node.shape else None)], None, node.shape, node)
        self.scalars[node.id] = LimitValue(res.value, res.methods | self.methods_of(node.inputs),
                                           res.stderr)

    def rule_gram(self, node: Node) -> None:
        x, y = node.inputs
        rx = len(self.prog.node(x).shape)
        res = self.expect([(self.trees[x], self.axis_for(x)), (self.trees[y], self.axis_for(y, rx))],
                          "mul", node.shape, node)
        self.scalars[node.id] = LimitValue(res.value, res.methods | self.methods_of(node.inputs),
                                           res.stderr)

    def rule_readout(self, node: Node) -> None:
        # Gaussian with mean zero; its covariance is computed by rule_cov on demand
        cov = self.readout_cov(node, node, node)
        self.scalars[node.id] = LimitValue(torch.zeros(node.shape, dtype=self.dtype), cov.methods,
                                           None, cov.value)

    def rule_cov(self, node: Node) -> None:
        f, g = (self.prog.node(i) for i in node.inputs)
        if f.id == g.id and self.scalars[f.id].cov is not None:
            src = self.scalars[f.id]
            self.scalars[node.id] = LimitValue(src.cov, src.methods)
            return
        res = self.readout_cov(f, g, node)
        self.scalars[node.id] = LimitValue(res.value, res.methods)

    def readout_cov(self, f: Node, g: Node, node: Node) -> Result:
        """Cov(c_f v.x/sqrt n, c_g w.y/sqrt n) -> c_f c_g Cov(Z^v, Z^w) E[Z^x Z^y]."""
        x, y = f.inputs[1], g.inputs[1]
        weights = readout_weights(self.prog, f, g)
        if weights is None:
            return Result(torch.zeros(f.shape + g.shape, dtype=self.dtype), {"exact"})
        scale, rows = weights
        sx, sy = self.prog.node(x).shape, self.prog.node(y).shape
        res = self.expect([(self.trees[x], self.axis_for(x)), (self.trees[y], self.axis_for(y, len(sx)))],
                          "mul", sx + sy, node)
        value = res.value
        if scale != 1.0:
            value = value.scaled(scale) if isinstance(value, BlockKernel) else scale * value
        if rows is not None:
            value = whole(value)
            eye = torch.eye(rows, dtype=self.dtype)
            value = value.reshape(*sx, 1, *sy, 1) * eye.reshape([1] * len(sx) + [rows] + [1] * len(sy) + [rows])
        return Result(value, res.methods | self.methods_of((x, y)))



class PlacedCovs(Sequence[Sequence[Tensor]]):
    """The covariances of an expectation's variables as `cov[i][j]`, each placed (`placed_cov`) when
    first read. Deciding which variables are independent (`is_zero`) reads no kernel kept by upper
    blocks: a check of structure (is a Zdot zero?) costs nothing over a large batch."""

    def __init__(self, ev: LimitEvaluator, variables: list[tuple[int, int | None]], rank: int) -> None:
        self.ev, self.variables, self.rank = ev, variables, rank
        self.placed: dict[tuple[int, int], Tensor] = {}

    def __len__(self) -> int:
        return len(self.variables)

    def __getitem__(self, i: int) -> Sequence[Tensor]:  # type: ignore[override]
        if not 0 <= i < len(self.variables):
            raise IndexError(i)
        return _PlacedRow(self, i)

    def entry(self, i: int, j: int) -> Tensor:
        if (i, j) not in self.placed:
            self.placed[i, j] = self.ev.placed_cov(self.variables[i], self.variables[j], self.rank)
        return self.placed[i, j]

    def is_zero(self, i: int, j: int) -> bool:
        (bi, ai), (bj, aj) = self.variables[i], self.variables[j]
        c = self.ev.stored_cov(bi, bj)
        if isinstance(c, BlockKernel) and ai is not None and aj is not None and ai != aj:
            return all(is_zero(b) for b in c.blocks)  # decided without making it whole
        return is_zero(self.entry(i, j))


class _PlacedRow(Sequence[Tensor]):
    def __init__(self, covs: PlacedCovs, i: int) -> None:
        self.covs, self.i = covs, i

    def __len__(self) -> int:
        return len(self.covs)

    def __getitem__(self, j: int) -> Tensor:  # type: ignore[override]
        if not 0 <= j < len(self.covs):
            raise IndexError(j)
        return self.covs.entry(self.i, j)


def _has_block(tree: object) -> bool:
    if isinstance(tree, Block):
        return True
    return isinstance(tree, ex.Apply) and any(_has_block(a) for a in tree.args)


def _place_tensor(t: Tensor, axis: int | None, rank: int) -> Tensor:
    """A tensor over one batch, viewed along output axis `axis` of a rank-`rank` result."""
    if t.dim() == 0:
        return t
    if axis is None:  # a tensor over a batch that this side does not have
        raise AssertionError("batched leaf on an unbatched side")
    view = [1] * rank
    view[axis] = t.shape[0]
    return t.reshape(view)


def _symmetric(parts: list[tuple[object, int | None]], combine: str | None, shape: tuple[int, ...]) -> bool:
    """E[T(Z_i) T(Z_j)] over one batch against itself: the same expression on both axes."""
    return (combine == "mul" and len(parts) == 2 and len(shape) == 2 and shape[0] == shape[1]
            and parts[0][1] == 0 and parts[1][1] == 1 and parts[0][0] == parts[1][0])


def _symmetrised(result: Result) -> Result:
    """A kernel estimated by Monte Carlo as the mean of itself and its transpose (entry (i, j) draws its
    pair of Gaussians through another factor than (j, i)): still unbiased, and symmetric like the
    true kernel, so that a later kernel reading only its upper blocks reads all of it. The standard
    error of the mean is at most the mean of the two."""
    value = result.value  # a tensor: a kernel sampled by blocks is taken whole instead (by_upper_blocks)
    assert isinstance(value, Tensor)
    stderr = None if result.stderr is None else (result.stderr + result.stderr.T) / 2
    return Result((value + value.T) / 2, result.methods, stderr)


def _cut_leaves(tree: object, r0: int, r1: int) -> object:
    """The expression for the block [r0:r1, r0:] of the result: its tensor leaves cut likewise."""
    if isinstance(tree, TensorLeaf):
        return TensorLeaf(cut(tree.value, r0, r1))
    if isinstance(tree, ex.Apply):
        return ex.Apply(tree.fn, tuple(_cut_leaves(a, r0, r1) for a in tree.args))
    return tree


def _all_zero(t: Tensor | BlockKernel) -> bool:
    """Every entry is 0, looking only once at entries that a broadcast view repeats."""
    if isinstance(t, BlockKernel):
        return all(_all_zero(b) for b in t.blocks)
    return bool((t[tuple(0 if st == 0 else slice(None) for st in t.stride())] == 0).all())


_IN_PLACE = {"add": "add_", "sub": "sub_", "mul": "mul_", "div": "div_"}


def interpret(prog: Program, evaluator: object, scalars: dict[int, LimitValue],
              rules: str) -> dict[str, LimitValue]:
    """The loop both limit evaluators share: each instruction in order through its rule for this
    evaluator in the registry of instructions (`rules`: "gaussian" or "particles", the field of
    tpc.ops.instructions.Instruction); numerical trouble is reported at the instruction that caused it."""
    finite: set[int] = set()  # ids of values already checked (a kernel asked for twice is one tensor)
    for node in prog.needed():
        rule = getattr(INSTRUCTIONS[node.op], rules)
        try:
            if rule is not None:
                rule(evaluator, node)
        except NumericalError as err:
            if err.span is None:
                err.span = node.span
            raise err.locate(prog.filename, prog.source) from None
        value = scalars[node.id].value if node.id in scalars else None
        if value is None or id(value) in finite:  # scalars keeps every value alive: ids stay unique
            continue
        if not all_finite(value):
            raise NumericalError(f"the limit of '{node.name}' is not finite (NaN or overflow)",
                                 node.span).locate(prog.filename, prog.source)
        finite.add(id(value))
    return {name: scalars[nid] for name, nid in prog.outputs.items()}


def evaluate_tree(tree: ex.Tree, args: list[Tensor]) -> Tensor:
    """A coordinatewise expression on tensors (scalars, or particles of vectors)."""
    return _evaluate_owned(tree, args)[0]


def _evaluate_owned(tree: ex.Tree, args: list[Tensor]) -> tuple[Tensor, bool]:
    """Evaluate a scalar expression over (possibly large) kernels; (value, owned). Arithmetic
    writes into a temporary this evaluation made itself when shapes allow (the NTK is a sum of
    products of kernels: one temporary instead of one per operation). Inputs are never written."""
    if isinstance(tree, ex.Arg):
        return args[tree.index], False
    if isinstance(tree, ex.Const):
        return torch.tensor(tree.value, dtype=torch.float64), False
    if tree.fn in ("add", "sub") and (product := _scaled_product(tree.args[1])) is not None:
        # acc +- s x y (an NTK's sum of kernel products) in one pass, without a temporary product
        acc, own = _evaluate_owned(tree.args[0], args)
        scale, (x, y) = product[0], (args[i] for i in product[1])
        if own and acc.shape == broadcast_shapes(acc.shape, x.shape, y.shape) and acc.dtype == x.dtype == y.dtype:
            return acc.addcmul_(x, y, value=scale if tree.fn == "add" else -scale), True
        parts = [(acc, own), _evaluate_owned(tree.args[1], args)]  # leaves only: nothing is evaluated twice
    else:
        parts = [_evaluate_owned(a, args) for a in tree.args]
    if tree.fn in _IN_PLACE and len(parts) == 2:
        (a, own_a), (b, own_b) = parts
        shape = broadcast_shapes(a.shape, b.shape)
        if own_a and a.shape == shape and a.dtype == torch.promote_types(a.dtype, b.dtype):
            return getattr(a, _IN_PLACE[tree.fn])(b), True
        commutes = tree.fn in ("add", "mul")
        if own_b and commutes and b.shape == shape and b.dtype == torch.promote_types(a.dtype, b.dtype):
            return getattr(b, _IN_PLACE[tree.fn])(a), True
    inputs = [p[0] for p in parts]
    out = FUNCTIONS[tree.fn].torch(*inputs)
    return out, not any(out is x for x in inputs)  # identity returns its input: not ours to write


def _scaled_product(tree: ex.Tree) -> tuple[float, tuple[int, int]] | None:
    """tree as s * Arg(i) * Arg(j), with the constant s anywhere in nested products, or None."""
    scale, leaves, stack = 1.0, [], [tree]
    while stack:
        t = stack.pop()
        if isinstance(t, ex.Apply) and t.fn == "mul":
            stack += reversed(t.args)
        elif isinstance(t, ex.Const):
            scale *= float(t.value)
        elif isinstance(t, ex.Arg):
            leaves.append(t.index)
        else:
            return None
    return (scale, (leaves[0], leaves[1])) if len(leaves) == 2 else None


@dataclass
class LimitOutput:
    value: np.ndarray
    method: str
    stderr: np.ndarray | None = None
    cov: np.ndarray | None = None
    random: bool = False  # random in the limit (value is its mean): a Gaussian readout, a kernel-regime output
    samples: np.ndarray | None = None  # draws of a random output, where it was sampled (not in JSON)
    # the value of each Monte Carlo replicate (stacked on axis 0), where stderr is taken across them: what
    # a computation from this value uses to carry the Monte Carlo error on (not in JSON)
    replicates: np.ndarray | None = None

    def to_json(self) -> dict:
        out: dict = {"value": _tolist(self.value), "method": self.method}
        if self.random or self.cov is not None:
            out["random"] = True
        if self.stderr is not None:
            out["stderr"] = _tolist(self.stderr)
        if self.cov is not None:
            out["cov"] = _tolist(self.cov)
        return out


def _tolist(a: np.ndarray) -> object:
    return a.tolist() if a.ndim else float(a)


ORDER = ("exact", "closed-form", "quadrature", "monte-carlo")


def evaluate_limit(prog: Program, method: str = "auto", dtype: str = "float64",
                   particles: int = 2**16, replicates: int = 8, seed: int = 0,
                   memory_gb: float | None = None, force: bool = False, device: str = "cpu",
                   keep_replicates: bool = False) -> dict[str, LimitOutput]:
    """The limit of every output. Where Monte Carlo served any expectation, the whole evaluation
    is repeated with independent particles and the standard error is taken across replicates
    (`keep_replicates`: each output keeps every replicate's value too, for a computation from it
    to carry the error on; it costs that many copies of every output).
    Refuses (before allocating) what would need more than `memory_gb` (see tpc.memory; on CUDA, by
    default half of the device's memory). Runs on `device` (tpc.backends.device)."""
    on_device.check(device)
    memory_gb = on_device.memory_gb(device, memory_gb)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    itemsize = torch.finfo(tdtype).bits // 8
    try:
        memory.require(memory.gaussian_bytes(prog, itemsize), "the limit's kernels", memory_gb, force)
    except TpcError as err:
        raise err.locate(prog.filename, prog.source) from None
    def run_once(s: int) -> tuple[dict[str, LimitValue], bool]:
        clear_kernel_cache()  # a replicate's step kernels are of no use to the next one
        ev = LimitEvaluator(prog, method, tdtype, particles, s)
        try:
            return ev.run(), ev.mc_used
        except NeedsParticles:
            from tpc.backends.limit.particles import ParticleEvaluator, is_linear_program

            exact = is_linear_program(prog) and method in ("auto", "exact")
            if method in ("closed-form", "quadrature") or (method == "exact" and not exact):
                raise TpcError(
                    f"--method {method}: this program applies W.T to a batch, which tpc evaluates by "
                    "particles: exactly when linear, else by Monte Carlo; use --method auto or monte-carlo"
                ).locate(prog.filename, prog.source) from None
            need = memory.gaussian_bytes(prog, itemsize) + memory.particle_bytes(prog, itemsize, particles)
            try:
                memory.require(need, f"the limit by particles ({particles} per Gaussian)", memory_gb, force,
                               hint="fewer --particles")
            except TpcError as err:
                raise err.locate(prog.filename, prog.source) from None
            pev = ParticleEvaluator(prog, exact, tdtype, particles, s)
            return pev.run(), pev.mc_used

    with torch.no_grad(), on_device.on(device):
        try:
            result, mc_used = run_once(replicate_seed(seed, 0))
            runs = [result]
            if mc_used:
                for r in range(1, max(2, replicates)):
                    runs.append(run_once(replicate_seed(seed, r))[0])
        finally:
            clear_kernel_cache()
    out = {}
    for name in prog.outputs:
        vals = [r[name] for r in runs]
        methods = set().union(*[v.methods for v in vals]) or {"exact"}
        label = "+".join(m for m in ORDER if m in methods)
        # one run: its array as it is (a copy of a large kernel costs seconds); replicates: stacked
        stack = np.stack([on_device.to_host(v.value) for v in vals]) if len(vals) > 1 else \
            on_device.to_host(vals[0].value)[None]
        cov = None
        if vals[0].cov is not None:
            cov = np.mean([on_device.to_host(v.cov) for v in vals], axis=0)
        stderr = None
        if len(vals) > 1 and "monte-carlo" in methods:
            stderr = stack.std(axis=0, ddof=1) / np.sqrt(len(vals))
        out[name] = LimitOutput(stack.mean(axis=0) if len(vals) > 1 else stack[0], label, stderr, cov,
                                replicates=stack if keep_replicates and stderr is not None else None)
    return out
