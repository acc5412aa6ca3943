"""How long a user waits for the commands that compute nothing: `tpc --help` and `tpc check`.

    python benchmarks/startup.py [--repeats 5]

Each command runs in a fresh process (what a user's shell does), `--repeats` times; the table
gives the median and the range of wall times. For comparison, the same for `python -c "import
torch"`: what every command paid before tpc imported torch only where a backend runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TPC = [sys.executable, "-m", "tpc"]
COMMANDS = {
    "tpc --help": [*TPC, "--help"],
    "tpc check programs/kernels/relu_mlp.tp": [*TPC, "check", "programs/kernels/relu_mlp.tp"],
    "tpc check programs/train/relu2_mup.tp": [*TPC, "check", "programs/train/relu2_mup.tp"],
    "python -c 'import torch' (for comparison)": [sys.executable, "-c", "import torch"],
}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per command (default 5)")
    args = ap.parse_args()
    print(f"{'command':<48} {'median s':>9} {'range s':>14}")
    for label, cmd in COMMANDS.items():
        wall(cmd)  # one warm-up: the files in the page cache, as in a user's second call
        times = [wall(cmd) for _ in range(args.repeats)]
        print(f"{label:<48} {statistics.median(times):>9.3f} {min(times):>6.3f}-{max(times):<6.3f}")


if __name__ == "__main__":
    main()
