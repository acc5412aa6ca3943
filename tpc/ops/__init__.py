"""The op registry.

`functions` holds every coordinatewise function (relu, tanh, +, *, ...) with its rules side
by side: its torch implementation and source template (finite width), its closed-form
Gaussian expectations (infinite width) and its derivative. `instructions` holds the Netsor
instructions (initial objects, MatMul, Nonlin, Moment, readouts, kernels) with their shape,
finite-width and limit rules.
"""
