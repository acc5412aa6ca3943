"""The kernel regime's Monte Carlo error reaches the trained outputs. Where no closed form serves a
kernel (here relu of a fixed random offset, `relu(U @ x + s)` with s = 0.5 relu(A y) + b, whose
preactivations are not Gaussian), the kernels are averages over particles with standard errors,
and training in function space from them inherits their error: the loop is run again from every
replicate's kernels and the spread is reported. Before, a kernel-regime output from Monte Carlo
kernels printed no standard error at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import tpc

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "programs" / "train" / "named_values_mup.tp"


def _ntk() -> tpc.Network:
    source = PROGRAM.read_text().replace("parametrization mup", "parametrization ntk")
    return tpc.loads(source, base_dir=PROGRAM.parent)


def test_trained_outputs_carry_the_kernels_monte_carlo_error() -> None:
    """The reported error is the spread of the value over independent particle seeds: the values of
    six seeds scatter by about the reported standard error (within a factor of 3 either way, which
    six draws of a spread allow), and not by zero."""
    net = _ntk()
    runs = [tpc.limit(net, particles=4096, seed=s) for s in range(6)]  # independent replicates (tpc/seeds.py)
    for name in ("curve", "pred"):
        assert "monte-carlo" in runs[0][name].method
        values = np.stack([np.asarray(r[name].value) for r in runs])
        reported = np.mean([np.asarray(r[name].stderr) for r in runs], axis=0)
        seen = values.std(axis=0, ddof=1)
        assert np.all(reported > 0), name
        ratio = np.sqrt(np.mean(seen**2) / np.mean(reported**2))
        assert 1 / 3 < ratio < 3, (name, seen, reported)


def test_exact_kernels_give_exact_training() -> None:
    """With a closed form for every kernel (the arc-cosine recursion) nothing is estimated: no error."""
    lim = tpc.limit(tpc.load(ROOT / "programs" / "train" / "relu2_ntk_loop.tp"))
    for name, out in lim.items():
        if "monte-carlo" not in out.method:
            assert out.stderr is None, name


def test_sampled_initial_functions_add_both_errors() -> None:
    """A logistic loss: f_0 is sampled, and the error combines the samples' and the kernels'."""
    source = PROGRAM.read_text().replace("parametrization mup", "parametrization ntk")
    source = source.replace("mse(f(X), Y)", "logistic(f(X), Yb)").replace(
        'data Xt = load("data/test3x3.csv")', 'data Xt = load("data/test3x3.csv")\ndata Yb = [1, 0, 1, 0]')
    net = tpc.loads(source, base_dir=PROGRAM.parent)
    with_kernels = tpc.limit(net, particles=4096)
    from tpc.train.kernel import layer_kernels
    from tpc.train.kernel_loops import _train, affine_in_f0

    assert not affine_in_f0(net)
    K = layer_kernels(net, net.point_sets(), particles=4096, keep_replicates=True)  # noqa: N806
    assert K.replicas  # Monte Carlo kernels: one (theta, nngp) per replicate
    v = _train(net, K, [K.theta], [K.nngp], False, 2**14, 0)[0]["curve"]
    samples_only = v.std(0, ddof=1) / np.sqrt(v.shape[0])
    assert np.all(np.asarray(with_kernels["curve"].stderr) >= samples_only - 1e-15)


def test_replicates_trained_together_equal_each_trained_alone() -> None:
    """Several sets of kernels in one run (a group of f_0's samples each) give what each gives alone."""
    from tpc.train.kernel import layer_kernels
    from tpc.train.kernel_loops import _train

    net = _ntk()
    K = layer_kernels(net, net.point_sets(), particles=4096, keep_replicates=True)  # noqa: N806
    sets = K.replicas[:3]
    together = _train(net, K, [t for t, _ in sets], [n for _, n in sets], True, 1, 0)
    for (theta, nngp), out in zip(sets, together, strict=True):
        alone = _train(net, K, [theta], [nngp], True, 1, 0)[0]
        for name in ("curve", "pred"):
            np.testing.assert_allclose(out[name], alone[name], rtol=1e-12, atol=1e-14, err_msg=name)
        assert not np.allclose(out["pred"], together[0]["pred"]) or out is together[0]  # the sets differ


def test_replicates_are_kept_only_where_the_budget_allows() -> None:
    """Each replicate's kernels cost copies of every P x P kernel: tpc limit keeps them within its memory
    budget (the outputs then carry the kernels' error), and past it trains from their mean alone."""
    from tpc.train.kernel_loops import loops_kernel_limit
    from tpc.train.limit import kernel_regime_memory

    net = _ntk()
    assert tpc.limit(net, particles=4096)["pred"].stderr is not None  # 7 points: the copies are small
    need = kernel_regime_memory(net, None)[0]
    assert 3 * 8 * 8 * 7**2 * (len(net.layers) + 2) < need / 100
    mean_only = loops_kernel_limit(net, particles=4096, keep_replicates=False)
    assert mean_only["pred"].stderr is None and "monte-carlo" in mean_only["pred"].method
