"""Bodies of the processes that race for a claim (tests/test_hostile_claims.py). A module of
their own that imports only the registry: a spawned child imports the module of its target,
and a test module would bring torch along (seconds of CPU per child)."""
from harness.registry import Registry, new_owner


def claim(url, barrier, out, i):
    reg = Registry(url)
    owner = new_owner()
    barrier.wait()
    out[i] = 1 if reg.claim_cell("simclr", "tiny", 10, 2, owner) else 0


def acquire(url, run_id, barrier, out, i):
    reg = Registry(url)
    barrier.wait()
    out[i] = 1 if reg.acquire_run(run_id, new_owner()) else 0
