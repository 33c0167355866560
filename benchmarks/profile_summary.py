"""Where a process's CPU went, from py-spy's collapsed stacks (``py-spy record --format raw``).

    python benchmarks/profile_summary.py bench-out/service-profile/server-on-w1-PORT.txt [--top 30]

Prints, per function, the share of samples in which it is on the stack (inclusive) and on top of it (self), for the
functions with the largest inclusive share; idle samples (the event loop waiting in select/epoll) are counted apart.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

IDLE = ("select (selectors.py", "epoll", "_run_once (asyncio", "wait (threading.py", "_worker (concurrent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in args.profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        if any(frames[-1].startswith(i) for i in IDLE):
            idle += n
            continue
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    busy = total - idle
    print(f"{total} samples, {busy} busy ({100 * busy / max(total, 1):.0f} %); shares below are of the busy samples")
    print("| inclusive | self | function |")
    print("|---|---|---|")
    for f, n in inclusive.most_common(args.top):
        print(f"| {100 * n / max(busy, 1):.1f} % | {100 * own[f] / max(busy, 1):.1f} % | `{f[:110]}` |")


if __name__ == "__main__":
    main()
