"""The steps of a network program's model (network.py's `Step`), each with all of its rules side
by side, as `instructions.py` holds the loop instructions' and `tpc/ops/instructions.py` the
Netsor ops'. A model is a list of steps; for an op the registry holds:
- `op`, `meaning`, and `makes`: the value it makes (its kind and whether it keeps positions:
  the shape rule, checked where `model_builder.ModelBuilder` adds the step);
- `finite`: its value at width n in torch, `(step, vals, weights, x, net) -> Tensor`
  (tpc/train/finite.py; weights are the W^l with a seeds axis);
- `forward` and `backward`: its value in the unrolled Netsor-transpose program, at width n or in
  the limit, and its backward rule, which adds `n dL/d(arg)` (or `dL/d(arg)` for a number per
  input) to each argument: methods of `pooled.PooledBackend`, `(backend, step, vals, params, x)`
  and `(backend, step, vals, params, g, add)`; None where nothing flows back;
- `lower`: its statements in the Netsor program that the kernels take (tpc/train/kernel.py),
  `(lowering, i, step) -> None`;
- `code`: its PyTorch expression in `tpc emit-torch`'s forward, `(step, values, names, owner, net,
  lines) -> str` (tpc/backends/torch/emit_network.py; `lines` takes any line it needs first);
- `listing` and `listing_backward`: its lines in `tpc graph --unrolled` (tpc/train/unrolled.py),
  `(lister, root, step, h) -> str` and `(lister, root, i, step, h, g, grads) -> None`;
- `text`: its line in `tpc graph` of a model over positions, `(step, args, net) -> str`
  (tpc/train/show.py).
The rules are named by "module:function" and imported on first use (`Rule`), so checking a
program imports no backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpc.ops.instructions import Rule


@dataclass(frozen=True)
class StepOp:
    op: str
    meaning: str
    makes: str
    finite: Rule
    forward: Rule
    backward: Rule | None
    lower: Rule
    code: Rule
    listing: Rule
    listing_backward: Rule | None
    text: Rule


def _op(op: str, *, meaning: str, makes: str, backward: bool = True) -> StepOp:
    return StepOp(op, meaning, makes,
                  finite=Rule(f"tpc.train.finite:_finite_{op}"),
                  forward=Rule(f"tpc.train.pooled:PooledBackend._forward_{op}"),
                  backward=Rule(f"tpc.train.pooled:PooledBackend._backward_{op}") if backward else None,
                  lower=Rule(f"tpc.train.kernel:_Lowering.lower_{op}"),
                  code=Rule(f"tpc.backends.torch.emit_network:_code_{op}"),
                  listing=Rule(f"tpc.train.unrolled:_listing_{op}"),
                  listing_backward=Rule(f"tpc.train.unrolled:_listing_backward_{op}") if backward else None,
                  text=Rule(f"tpc.train.show:_step_text_{op}"))


_TABLE = (
    _op("input", backward=False, makes="data: the model's input rows (P rows per input over positions)",
        meaning="the model's argument x"),
    _op("bias", backward=False, makes="a vector, the same for every input (and position)",
        meaning="a bias layer's vector, added where the model adds it"),
    _op("matmul", makes="a vector (the readout: the k outputs); keeps its argument's positions",
        meaning="a layer applied to a value: W @ h (the input layer to the data, the readout last), or an "
                "n x n layer transposed, W.T @ h (tied weights: `Step.transposed`)"),
    _op("fn", makes="a vector if any argument is one, else a number per input; keeps positions",
        meaning="a coordinatewise function of earlier values (a tree over them)"),
    _op("moment", makes="a number per input (and position): a norm's scale",
        meaning="mean(h): the average of a vector's n coordinates"),
    _op("pool", makes="a vector per input, without positions",
        meaning="pool(h): the mean over an input's positions"),
    _op("shift", makes="a vector at every position",
        meaning="shift(h, s) / shift(h, dy, dx): h at position p + s, zero beyond the edges (a convolution's tap)"),
    _op("window", makes="a vector at every position of a smaller grid",
        meaning="the mean over windows of positions, every stride-th: a strided or 'valid' convolution's "
                "kept positions (windows of one), avgpool(h, k)"),
    _op("attend", makes="a vector at every position",
        meaning="attend(q, k, v): sum_r softmax_r(q_p . k_r / n^e) v_r over an input's positions"),
)

STEPS: dict[str, StepOp] = {s.op: s for s in _TABLE}
