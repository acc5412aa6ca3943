"""Seeds: the bounds of a user's seed, and the seeds of a Monte Carlo limit's independent replicates."""

from __future__ import annotations

from tpc.errors import TpcError

REPLICATE_STRIDE = 2**20  # more replicates than any run takes
MAX_SEED = 2**31 - 1
MAX_REPLICATES = REPLICATE_STRIDE


def replicate_seed(seed: int, replicate: int) -> int:
    """The particle seed of a Monte Carlo limit's replicate: seed 0's replicates are 0, 1, 2, ...,
    seed s's start at s * 2^20, so runs at different `--seed`s share no replicate (with s, s+1, ...
    seeds 0 and 1 shared all but one, and their difference understated the Monte Carlo error)."""
    if not 0 <= seed <= MAX_SEED:
        raise TpcError(f"a limit's seed is a whole number from 0 to {MAX_SEED}, got {seed}")
    if not 0 <= replicate < MAX_REPLICATES:
        raise TpcError(f"at most {MAX_REPLICATES} replicates")
    return seed * REPLICATE_STRIDE + replicate
