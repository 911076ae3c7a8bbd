"""Data-path timings that used to be clock assertions inside tests (tests check behaviour only).

- episode sampling: 32 episodes of 20-way 5-shot from an Omniglot-sized rotated pool (1,200
  characters x 4 rotations x 20 drawers), best of ``--repeats`` (was: < 50 ms in test_episodes);
- Omniglot: decoding the two zips into a fresh cache (was: < 60 s) and a cached load (was: < 1 s),
  when the shared copy is present (see ``metarl.tasks.episodes.find_dataset_dir``).
Run: .venv/bin/python benchmarks/data_speed.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from metarl.tasks.episodes import DataError, ClassPool, EpisodeSampler


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    data = np.random.default_rng(0).integers(0, 256, (1200 * 20, 28, 28), dtype=np.uint8)
    members = np.repeat(np.arange(1200), 4)[:, None] * 20 + np.arange(20)
    pool = ClassPool(data, members, [str(i) for i in range(4800)], rotations=np.tile(np.arange(4), 1200))
    sampler = EpisodeSampler(pool, n_way=20, k_shot=5, seed=0)
    sampler.sample(32)
    print(f"sample 32 x 20-way 5-shot episodes: {best(lambda: sampler.sample(32), args.repeats) * 1e3:.1f} ms (best of {args.repeats})")

    from metarl.tasks.omniglot import load_omniglot

    with tempfile.TemporaryDirectory() as cache:
        try:
            t = time.perf_counter()
            load_omniglot(cache_dir=cache)
        except DataError as e:
            print(f"omniglot: skipped ({e})")
            return
        print(f"omniglot decode into a fresh cache: {time.perf_counter() - t:.1f} s")
        print(f"omniglot cached load: {best(lambda: load_omniglot(cache_dir=cache), args.repeats):.3f} s (best of {args.repeats})")


if __name__ == "__main__":
    main()
