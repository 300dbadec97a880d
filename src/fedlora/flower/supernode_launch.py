"""``flower-supernode`` with a shorter idle wait: ``python -m fedlora.flower.supernode_launch POLL_S ARGS...``.

Flower 1.41's SuperNode sleeps a fixed 3 s whenever it asks the SuperLink for work and finds none,
0.5 s at a time while it waits for a reply to push, and 1, 2, 4 ... s while the content of a message
it was offered has not reached the SuperLink yet. The next round's message therefore waits seconds on
every node, every round: more than a whole round of a small job. ``fedlora node --poll-interval``
caps all three waits (each idle node then asks the SuperLink every ``POLL_S`` seconds, so keep it
≥ 1 s for federations of hundreds of nodes). Only the SuperNode loop's own module is touched; on another
Flower than 1.41 nothing is patched and a warning says so.
"""

from __future__ import annotations

import functools
import sys
import time
import types

PATCHED_FLOWER = "1.41."  # the release whose SuperNode loop this was read from


LOCAL_WAIT = 0.02  # the loop's sub-second sleeps poll its own in-memory state (a reply to push): cheap


def capped_time(cap: float) -> types.SimpleNamespace:
    """The ``time`` module, except that ``sleep`` never waits longer than ``cap`` seconds (its idle wait for
    the SuperLink) or, for a sub-second sleep (a wait on local state), ``LOCAL_WAIT``."""
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = lambda seconds: time.sleep(min(seconds, cap if seconds >= 1 else min(cap, LOCAL_WAIT)))
    return clock


def quicker_pulls(module: types.ModuleType, cap: float) -> bool:
    """Make ``module``'s object pulls retry an object that is not there yet after 0.05 s, doubling up to ``cap``
    seconds (Flower: 1 s doubling up to 10 s). A message is visible before its content has arrived, so its
    receiver's first try often misses. False (nothing patched) on another Flower or a module patched already."""
    import flwr
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if not flwr.__version__.startswith(PATCHED_FLOWER) or getattr(module, "pull_objects", None) is not pull_objects:
        return False
    module.pull_objects = functools.partial(pull_objects, initial_backoff=min(0.05, cap), backoff_cap=cap,
                                            max_tries_per_object=None)  # PULL_MAX_TIME (2 h) still bounds it
    return True


def patch(cap: float) -> bool:
    """Cap the SuperNode loop's waits at ``cap`` seconds; False (nothing patched) on another Flower."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time or not quicker_pulls(loop, cap):
        return False
    loop.time = capped_time(cap)
    return True


def main(argv: list[str]) -> None:
    cap = float(argv[0])
    if not patch(cap):
        print(f"fedlora node: this Flower's SuperNode is not {PATCHED_FLOWER}x: its own poll interval (3 s) applies",
              file=sys.stderr, flush=True)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
