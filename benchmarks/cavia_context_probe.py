"""How much CAVIA's context moves the network (Zintgraf et al. 2019; RESULTS.md session 11): on the
first test episodes, ‖∇_φ L_support‖ at φ = 0, then the support and query loss / accuracy after
each context step of size ``--lr``, and the logits' spread over classes. A probe, not a benchmark
of speed: it tells an inert context (tiny gradient, flat logits) from one that cannot fit the
support set in many steps (a capacity limit).

Usage (a freshly initialised model from a config, or a trained run):
    python benchmarks/cavia_context_probe.py --config experiments/cavia_omniglot_5w1s.yaml --set episode.n_way=20
    python benchmarks/cavia_context_probe.py --run RUN_DIR --lr 1 --steps 100 --every 50
"""
import argparse

import torch

from metarl import config
from metarl.adaptation import trajectory
from metarl.functional import forward_tasks, stack
from metarl.objectives import accuracy, cross_entropy
from metarl.policies.context import CONTEXT
from metarl.training import load_track, make_track, seed_everything


def probe(track, n_tasks: int, seed: int, steps: int, lr: float, every: int):
    m = track.method
    batch = next(iter(track.eval_batches(n_tasks, seed)))
    p = stack({k: v.detach() for k, v in m.params().items()}, batch.n_tasks)
    support = lambda q: cross_entropy(forward_tasks(m.model, q, batch.x_support), batch.y_support).sum()
    ctx = p[CONTEXT].clone().requires_grad_(True)
    grad = torch.autograd.grad(support({**p, CONTEXT: ctx}), ctx)[0]
    print(f"{batch.n_tasks} episodes, {int(batch.y_support.max()) + 1}-way, lr {lr}: "
          f"|grad_phi L_support| at phi=0 {grad.norm(dim=1).mean():.4g}")
    with torch.no_grad():
        for s, phi in enumerate(trajectory(support, p, steps, lr=lr, only=[CONTEXT])):
            if s % every and s != steps:
                continue
            fs, fq = forward_tasks(m.model, phi, batch.x_support), forward_tasks(m.model, phi, batch.x_query)
            print(f"  step {s:3d}  |phi| {phi[CONTEXT].norm(dim=1).mean():.4g}  "
                  f"support loss {cross_entropy(fs, batch.y_support).mean():.4f} acc {accuracy(fs, batch.y_support).mean():.3f}  "
                  f"query loss {cross_entropy(fq, batch.y_query).mean():.4f} acc {accuracy(fq, batch.y_query).mean():.3f}  "
                  f"logit std {fq.std(-1).mean():.3g}")


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a CAVIA config: probe its freshly initialised model (seeded by the config)")
    src.add_argument("--run", help="a trained CAVIA run directory: probe its latest checkpoint")
    ap.add_argument("--set", action="append", default=[], help="config override, as for metarl train")
    ap.add_argument("--lr", type=float, default=None, help="context step size (default: the run's cavia.lr)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--every", type=int, default=1, help="print every this many steps (and the last)")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--seed", type=int, default=3, help="seed of the test episodes")
    a = ap.parse_args()
    cfg = config.load(a.config, ["baselines=[]"] + a.set) if a.config else None
    if cfg is not None and cfg.algorithm != "cavia":
        raise SystemExit(f"cavia_context_probe: the config's algorithm is '{cfg.algorithm}': use a CAVIA config or --set algorithm=cavia")
    if a.run:
        track, cfg, _ = load_track(a.run, a.set)
        if cfg.algorithm != "cavia":
            raise SystemExit(f"cavia_context_probe: {a.run} is a '{cfg.algorithm}' run: give a CAVIA run")
    else:
        seed_everything(cfg.seed)
        track = make_track(cfg)
    probe(track, a.episodes, a.seed, a.steps, cfg.cavia.lr if a.lr is None else a.lr, a.every)


if __name__ == "__main__":
    main()
