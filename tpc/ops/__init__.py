"""The op registry of coordinatewise functions.

`functions` holds every coordinatewise function (relu, tanh, +, *, ...) with its rules side by
side: its torch implementation and source template (finite width), its closed-form Gaussian
expectations and smoothness (infinite width) and its derivative; `expr` is the expression tree
those functions build.

The Netsor instructions themselves (initial objects, MatMul, Nonlin, Moment, gram, readout,
cov) are not registered here yet: each backend holds one rule per instruction (`rule_<op>` in
`backends/limit/evaluate.py` and `particles.py`, the emitter in `backends/torch/codegen.py`,
`Backward.propagate` in `passes/autodiff.py`, shapes in `build.py`). Gathering them into one
table per instruction is open work.
"""
