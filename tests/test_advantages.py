"""Returns, GAE and rllab's linear baseline on padded, early-terminated episode batches."""
import numpy as np
import pytest
import torch

from metarl.advantages import LinearFeatureBaseline, discounted_returns, gae, normalize_advantages


pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 default dtype, restored after


def _padded_batch(T=3, Tmax=6, B=4, obs_dim=2, seed=0):
    """Random episodes of lengths in [1, Tmax] (at least one full), garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, Tmax + 1, (T, B), generator=g)
    lengths[:, 0] = Tmax
    mask = (torch.arange(Tmax)[None, :, None] < lengths[:, None, :]).double()
    rewards = torch.randn(T, Tmax, B, generator=g)
    values = torch.randn(T, Tmax, B, generator=g)
    obs = 3 * torch.randn(T, Tmax, B, obs_dim, generator=g)
    pad = mask == 0
    rewards[pad], values[pad] = 123.0, -77.0  # must be ignored
    obs[pad] = 55.0
    return rewards, values, obs, mask, lengths


def _loop_returns(r, n, gamma):
    out, running = [0.0] * n, 0.0
    for t in reversed(range(n)):
        running = r[t] + gamma * running
        out[t] = running
    return out


def _loop_gae(r, v, n, gamma, lam):
    adv, running = [0.0] * n, 0.0
    for t in reversed(range(n)):
        next_v = v[t + 1] if t + 1 < n else 0.0  # terminal after the last valid step
        delta = r[t] + gamma * next_v - v[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])  # [Tmax=3, B=2]
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # episode 1 ends after 2 steps
    got = discounted_returns(rewards, mask, 0.5)
    expected = torch.tensor([[1 + 0.5 * 3 + 0.25 * 5, 2 + 0.5 * 4], [3 + 0.5 * 5, 4.0], [5.0, 0.0]])
    assert torch.allclose(got, expected)


def test_returns_and_gae_match_python_loops():
    rewards, values, _, mask, lengths = _padded_batch()
    gamma, lam = 0.99, 0.95
    ret = discounted_returns(rewards, mask, gamma)
    adv = gae(rewards, values, mask, gamma, lam)
    T, Tmax, B = rewards.shape
    for t in range(T):
        for b in range(B):
            n = int(lengths[t, b])
            r, v = rewards[t, :n, b].tolist(), values[t, :n, b].tolist()
            assert np.allclose(ret[t, :n, b], _loop_returns(r, n, gamma))
            assert np.allclose(adv[t, :n, b], _loop_gae(r, v, n, gamma, lam))
            assert torch.all(ret[t, n:, b] == 0) and torch.all(adv[t, n:, b] == 0)


def test_gae_limits():
    rewards, values, _, mask, _ = _padded_batch(seed=1)
    # λ = 1: Monte-Carlo return minus the baseline
    assert torch.allclose(gae(rewards, values, mask, 0.9, 1.0), (discounted_returns(rewards, mask, 0.9) - values) * mask)
    # λ = 0: one-step TD error
    v = values * mask
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)
    assert torch.allclose(gae(rewards, values, mask, 0.9, 0.0), (rewards + 0.9 * next_v - v) * mask)


def test_normalize_advantages_per_task():
    rewards, values, _, mask, _ = _padded_batch(seed=2)
    adv = gae(rewards, values, mask, 0.99, 0.97)
    norm = normalize_advantages(adv, mask, reduction="step")
    n = mask.sum((1, 2))
    mean = (norm * mask).sum((1, 2)) / n
    var = ((norm - mean[:, None, None]) ** 2 * mask).sum((1, 2)) / n
    assert torch.allclose(mean, torch.zeros(3), atol=1e-12)
    assert torch.allclose(var, torch.ones(3), atol=1e-6)
    assert torch.all(norm[mask == 0] == 0)
    # default convention (pytorch-maml-rl): statistics over per-episode means
    norm_ep = normalize_advantages(adv, mask)
    per_ep = (norm_ep * mask).sum(1) / mask.sum(1)
    assert torch.allclose(per_ep.mean(-1), torch.zeros(3), atol=1e-12)


def _numpy_features(obs, n):
    o = np.clip(obs[:n], -10, 10)
    t = (np.arange(n) / 100.0)[:, None]
    return np.concatenate([o, o ** 2, t, t ** 2, t ** 3, np.ones((n, 1))], axis=1)


def test_linear_baseline_matches_numpy_lstsq_per_task():
    rewards, _, obs, mask, lengths = _padded_batch(T=3, Tmax=12, B=5, obs_dim=2, seed=3)
    returns = discounted_returns(rewards, mask, 0.99)
    baseline = LinearFeatureBaseline(reg_coeff=1e-5).fit(obs, returns, mask)
    values = baseline.predict(obs, mask)
    assert values.shape == mask.shape and torch.all(values[mask == 0] == 0)
    for t in range(3):
        feats, rets = [], []
        for b in range(5):
            n = int(lengths[t, b])
            feats.append(_numpy_features(obs[t, :, b].numpy(), n))
            rets.append(returns[t, :n, b].numpy())
        X, y = np.concatenate(feats), np.concatenate(rets)
        coeffs = np.linalg.lstsq(X.T @ X + 1e-5 * np.eye(X.shape[1]), X.T @ y, rcond=None)[0]
        assert np.allclose(baseline.coeffs[t].numpy(), coeffs, rtol=1e-6, atol=1e-8)
        for b in range(5):
            n = int(lengths[t, b])
            pred = _numpy_features(obs[t, :, b].numpy(), n) @ coeffs
            assert np.allclose(values[t, :n, b].numpy(), pred, atol=1e-8)


def test_linear_baseline_vectorised_equals_per_task_and_unbatched():
    rewards, _, obs, mask, _ = _padded_batch(T=4, Tmax=8, B=3, obs_dim=3, seed=4)
    returns = discounted_returns(rewards, mask, 0.95)
    batched = LinearFeatureBaseline()(obs, returns, mask)
    for t in range(4):
        single = LinearFeatureBaseline()(obs[t], returns[t], mask[t])  # no task axis at all
        assert torch.allclose(batched[t], single, atol=1e-10)
    # float32 inputs give float32 values close to the float64 fit
    v32 = LinearFeatureBaseline()(obs.float(), returns.float(), mask.float())
    assert v32.dtype == torch.float32 and torch.allclose(v32.double(), batched, atol=1e-3)


def test_linear_baseline_regularisation_retry(monkeypatch):
    """A failed solve multiplies that task's reg coefficient by 10 and retries (rllab)."""
    rewards, _, obs, mask, _ = _padded_batch(T=3, Tmax=5, B=2, seed=5)
    returns = discounted_returns(rewards, mask, 0.99)
    real = torch.linalg.solve_ex
    calls = []

    def flaky(A, B):
        sol, info = real(A, B)
        calls.append(A.shape[0])
        if len(calls) <= 2:  # task 1 fails twice
            sol = sol.clone()
            sol[1] = float("nan")
        return sol, info

    monkeypatch.setattr(torch.linalg, "solve_ex", flaky)
    fitted = LinearFeatureBaseline(reg_coeff=1e-5).fit(obs, returns, mask)
    assert len(calls) == 3
    assert torch.allclose(fitted.reg_used, torch.tensor([1e-5, 1e-3, 1e-5]))
    assert torch.isfinite(fitted.coeffs).all()

    monkeypatch.setattr(torch.linalg, "solve_ex", lambda A, B: (torch.full_like(B, float("nan")), torch.zeros(A.shape[:-2], dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="NaN/inf"):
        LinearFeatureBaseline().fit(obs, returns, mask)


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="mask"):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, 3), 0.99, 0.95)
    with pytest.raises(RuntimeError, match="fit"):
        LinearFeatureBaseline().predict(torch.zeros(3, 2, 1), torch.ones(3, 2))
