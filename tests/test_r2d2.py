"""R2-D2's ridge head: the Woodbury (dual) solve vs the primal solve in numpy float64, and its
gradient wrt the features and λ vs central finite differences."""
import numpy as np
import pytest
import torch

from metarl.algorithms.r2d2 import ridge_fit, ridge_logits


@pytest.mark.parametrize("n,d", [(6, 10), (12, 5)])  # n < d takes the Woodbury form, n > d the primal
def test_ridge_head_matches_the_primal_solve(n, d):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(3, n, d))
    Y = rng.normal(size=(3, n, 4))
    lam = 0.7
    W = ridge_fit(torch.tensor(X), torch.tensor(Y), lam).numpy()
    for i in range(3):
        ref = np.linalg.solve(X[i].T @ X[i] + lam * np.eye(d), X[i].T @ Y[i])
        np.testing.assert_allclose(W[i], ref, atol=1e-10)


def test_dual_and_primal_paths_agree_through_logits():
    rng = np.random.default_rng(1)
    X, Xq = torch.tensor(rng.normal(size=(2, 8, 8))), torch.tensor(rng.normal(size=(2, 3, 8)))
    ys = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
    a = ridge_logits(X[:, :7], ys[:, :7], Xq, 4, 0.3)           # 7 < 8: dual
    b = ridge_logits(X[:, :7, :6], ys[:, :7], Xq[..., :6], 4, 0.3)  # 7 > 6: primal
    ref = [Xq[i, :, :6].numpy() @ np.linalg.solve(X[i, :7, :6].numpy().T @ X[i, :7, :6].numpy() + 0.3 * np.eye(6),
                                                  X[i, :7, :6].numpy().T @ np.eye(4)[ys[i, :7].numpy()]) for i in range(2)]
    np.testing.assert_allclose(b.numpy(), np.stack(ref), atol=1e-10)
    assert a.shape == (2, 3, 4)


def test_ridge_gradient_matches_central_differences(float64):
    g = torch.Generator().manual_seed(0)
    zs, zq = torch.randn(2, 6, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    ys = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    w = torch.randn(2, 4, 3, generator=g)
    f = lambda a, b, log_lam: (ridge_logits(a, ys, b, 3, log_lam.exp()) * w).sum()
    args = [zs.clone().requires_grad_(), zq.clone().requires_grad_(), torch.tensor(0.2, requires_grad=True)]
    grads = torch.autograd.grad(f(*args), args)
    eps = 1e-6
    for which, grad in enumerate(grads):
        base = [a.detach() for a in args]
        num = torch.zeros_like(base[which])
        for i in range(num.numel()):
            plus, minus = [b.clone() for b in base], [b.clone() for b in base]
            plus[which].reshape(-1)[i] += eps
            minus[which].reshape(-1)[i] -= eps
            num.reshape(-1)[i] = (f(*plus) - f(*minus)) / (2 * eps)
        torch.testing.assert_close(grad, num, atol=1e-7, rtol=1e-6)
