"""Prototypical networks: prototypes and logits against a hand computation (numpy loops)."""
import numpy as np
import torch

from metarl.algorithms.protonet import prototype_logits, prototypes


def test_prototypes_and_logits_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    t, n_way, shot, nq, d = 3, 4, 3, 7, 5
    zs = rng.normal(size=(t, n_way * shot, d))
    ys = np.stack([rng.permutation(np.repeat(np.arange(n_way), shot)) for _ in range(t)])  # labels in any order
    zq = rng.normal(size=(t, nq, d))
    c = prototypes(torch.tensor(zs), torch.tensor(ys), n_way).numpy()
    logits = prototype_logits(torch.tensor(zs), torch.tensor(ys), torch.tensor(zq), n_way).numpy()
    for i in range(t):
        for k in range(n_way):
            members = [zs[i, j] for j in range(len(ys[i])) if ys[i, j] == k]
            ck = sum(members) / len(members)
            np.testing.assert_allclose(c[i, k], ck, atol=1e-12)
            for q in range(nq):
                np.testing.assert_allclose(logits[i, q, k], -sum((zq[i, q] - ck) ** 2), atol=1e-10)
