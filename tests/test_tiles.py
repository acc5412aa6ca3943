"""Kernels by tiles on a Dask cluster (tpc/tiles.py): equal to the in-memory limit, unchanged when a
worker dies mid-run, refused with the figure beyond the memory budget. The tests start a local
cluster (two worker processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tpc
from tpc.cli import main
from tpc.errors import TpcError

pytest.importorskip("distributed")

PROGRAM = """\
width n
data X = load("X.npy")
matrix U  : n x 5 ~ N(0, 2/5)
matrix W2 : n x n ~ N(0, 2/n)
vector v ~ N(0, 1)
f = v @ relu(W2 @ erf(U @ X)) / sqrt(n)
output nngp = cov(f)
output ntk = tangent_kernel(f, X)
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiles")
    np.save(folder / "X.npy", np.random.default_rng(3).standard_normal((90, 5)))
    (folder / "k.tp").write_text(PROGRAM)
    return folder / "k.tp"


@pytest.fixture(scope="module")
def cluster():  # noqa: ANN201
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


def test_tiles_equal_the_in_memory_limit(program: Path, cluster, tmp_path: Path) -> None:  # noqa: ANN001
    prog = tpc.load(program)
    ref = tpc.limit(prog)
    paths = tpc_tiled(prog, tmp_path, tile=25, cluster=cluster.scheduler_address)
    for name, path in paths.items():
        got = np.load(path, mmap_mode="r")
        assert got.shape == (90, 90)
        np.testing.assert_allclose(got, ref[name].value, rtol=0, atol=1e-12 * np.abs(ref[name].value).max())


def test_a_worker_killed_mid_run_changes_nothing(program: Path, tmp_path: Path) -> None:
    """The engine reruns the lost worker's tasks: the kernels are the same as without the kill."""
    from dask.distributed import LocalCluster

    prog = tpc.load(program)
    ref = tpc.limit(prog)
    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        def kill_one(done: int, total: int) -> None:
            if done == 1 and not killed:
                nanny = next(iter(c.workers.values()))
                nanny.process.process.kill()  # the worker process, as a crash would; the nanny restarts it
                killed.append(done)

        paths = tpc_tiled(prog, tmp_path, tile=15, cluster=c.scheduler_address, progress=kill_one)
    assert killed
    for name, path in paths.items():
        np.testing.assert_allclose(np.load(path), ref[name].value, rtol=0, atol=1e-12 * np.abs(ref[name].value).max())


def test_tiles_refuse_beyond_the_budget_and_non_kernels(program: Path, tmp_path: Path) -> None:
    from tpc.tiles import plan, tiled_limit

    prog = tpc.load(program)
    p = plan(prog, 30)
    assert p.tasks == [(0, 1), (0, 2), (1, 2)] and p.blocks == [(0, 30), (30, 60), (60, 90)]
    with pytest.raises(TpcError, match="tile task"):
        tiled_limit(prog, tmp_path, tile=30, memory_gb=p.task_bytes / 2**30 / 4)
    moments = program.parent / "m.tp"
    moments.write_text(PROGRAM.replace("output nngp = cov(f)\noutput ntk = tangent_kernel(f, X)",
                                       "output m = mean(relu(U @ X) * relu(U @ X))"))
    with pytest.raises(TpcError, match="not an N x N kernel"):
        plan(tpc.load(moments))


def test_cli_out_writes_npy_files(program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["limit", str(program), "--out", str(tmp_path / "K"), "--tile", "45", "--workers", "1",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "by tiles of 45 rows: 1 tasks" in out and "nngp.npy" in out
    ref = tpc.limit(tpc.load(program))
    np.testing.assert_allclose(np.load(tmp_path / "K" / "ntk.npy"), ref["ntk"].value, rtol=0, atol=1e-10)
    net = str(Path(__file__).resolve().parent.parent / "programs" / "train" / "relu2_mup.tp")
    assert main(["limit", net, "--out", str(tmp_path / "N")]) == 2
    assert "raw program" in capsys.readouterr().err


def test_a_bad_out_or_cluster_is_an_error_not_a_traceback(program: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--out on a file, or a scheduler that does not answer: one line naming it, exit status 2 (both
    were tracebacks, FileExistsError and OSError, exit 1). Found by a reviewer."""
    import tpc.tiles

    (tmp_path / "afile").write_text("")
    assert main(["limit", str(program), "--out", str(tmp_path / "afile"), "--tile", "45", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "afile: cannot write the kernels there" in err and "Traceback" not in err
    monkeypatch.setattr(tpc.tiles, "CONNECT_SECONDS", 1)
    for args in (["limit", str(program), "--out", str(tmp_path / "K")],
                 ["run", str(Path(__file__).resolve().parent.parent / "programs" / "train" / "linear_mup.tp"),
                  "--width", "16", "--seeds", "2"]):
        assert main([*args, "--cluster", "tcp://127.0.0.1:1"]) == 2
        err = capsys.readouterr().err
        assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in err and "Traceback" not in err, err
    assert not (tmp_path / "K").exists()  # nothing half-written: not even the folder it made


def tpc_tiled(prog, out: Path, **kw) -> dict[str, Path]:  # noqa: ANN001
    from tpc.tiles import tiled_limit

    return tiled_limit(prog, out, **kw)


def test_the_engine_is_imported_only_where_it_is_used(program: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from tpc.cli import main; main(['check', sys.argv[1]]); "
            "print('dask' in sys.modules, 'distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(program)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


ASYMMETRIC = """\
width n
data X = load("X.npy")
matrix U : n x 5 ~ N(0, 1/5)
h = relu(U @ X)
output k = gram(h, h * h)
output s = gram(h, h)
"""


def test_an_asymmetric_kernel_is_tiled_by_both_blocks_and_a_failed_run_leaves_no_file(
        program: Path, cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """gram(h, h * h) is not its own transpose: block (J, I) is sent, not (I, J) transposed. Under
    --method auto its 2-variable expectation is taken by Monte Carlo, which tiles refuse: the run
    stops and leaves no .npy behind (the files are written as .npy.partial until every tile is in),
    nor the folder it made.
    On the module's cluster: a cluster of tiled_limit's own (--workers) is test_cli_out_writes_npy_files'."""
    from tpc.tiles import plan, tiled_limit

    path = program.parent / "asym.tp"
    path.write_text(ASYMMETRIC)
    prog = tpc.load(path)
    assert plan(prog, 25).symmetric == {"s"}
    ref = tpc.limit(prog, method="quadrature")
    assert np.abs(ref["k"].value - ref["k"].value.T).max() > 1e-3
    paths = tiled_limit(prog, tmp_path / "q", tile=25, cluster=cluster.scheduler_address, method="quadrature")
    for name, p in paths.items():
        np.testing.assert_allclose(np.load(p), ref[name].value, rtol=0, atol=1e-12)
    with pytest.raises(TpcError, match="output 'k' is taken by Monte Carlo") as err:  # the first task fails fast
        tiled_limit(prog, tmp_path / "mc", tile=2, cluster=cluster.scheduler_address)
    assert str(err.value).startswith(f"{path}:5:12: error:"), str(err.value)  # at the output it names
    assert not (tmp_path / "mc").exists()  # no file, and not the folder the run made


def test_cli_options_that_go_with_out(program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["limit", str(program), "--tile", "10"]) == 2
    assert "go with --out" in capsys.readouterr().err
    assert main(["limit", str(program), "--out", str(tmp_path), "--json"]) == 2
    assert "does not take --json" in capsys.readouterr().err


TRANSPOSED_INPUT = """\
width n
data X = load("X.npy")
matrix U : n x 5 ~ N(0, 1/5)
vector v ~ N(0, 1)
z = U.T @ relu(U @ X) / n
f = v @ tanh(U @ z) / sqrt(n)
output nngp = cov(f)
"""


def test_tpc_own_arrays_are_not_taken_for_a_second_batch(program: Path, cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """`U.T @ x / n` reads a d x d identity that tpc makes: the batch is still X alone, so it tiles."""
    from tpc.tiles import plan

    path = program.parent / "transposed_input.tp"
    path.write_text(TRANSPOSED_INPUT)
    prog = tpc.load(path)
    assert plan(prog, 25).rows == 90
    ref = tpc.limit(prog)["nngp"].value
    got = np.load(tpc_tiled(prog, tmp_path, tile=25, cluster=cluster.scheduler_address)["nngp"])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
