"""The op registries: the coordinatewise functions and the Netsor instructions.

`functions` holds every coordinatewise function (relu, tanh, +, *, ...) with its rules side by
side: its torch implementation and source template (finite width), its closed-form Gaussian
expectations and smoothness (infinite width) and its derivative; `expr` is the expression tree
those functions build.

`instructions` holds every Netsor instruction (initial data, matrices and vectors, MatMul, Nonlin,
Moment, gram, readout, cov) with its rules side by side: its kind and shape rule, its printer, its
torch rule, its rules in the two limit evaluators and its derivative; the builder, the printers,
the backends and autodiff dispatch through it.
"""
