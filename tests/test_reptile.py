"""Reptile (Nichol et al. 2018) against its definition: hand-unrolled inner Adam / SGD and the
interpolation θ + ε·mean(φ − θ), the annealed ε, serial vs batched, and the seam (resume,
evaluate, learning on sine and Omniglot)."""

import numpy as np
import pytest
import torch

from tests.checks import resume_round_trip, cli_train_and_evaluate
from metarl import config
from metarl.algorithms.reptile import adam_step, minibatch_indices
from metarl.tasks.batch import TaskBatch
from metarl.training import load_track, make_track, train


def sine_cfg(**extra):
    data = {"track": "sine", "algorithm": "reptile", "iterations": 10, "meta_batch": 3, "checkpoint_every": 10,
            "log_every": 5, "model": {"hidden": [5, 4], "activation": "tanh"}, "baselines": [], "eval": {"tasks": 10}}
    return config.from_dict(config.merge(data, extra))


def tiny_batch(n_tasks, n_support=4, n_query=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.get_default_dtype())
    return TaskBatch(r(n_tasks, n_support, 1), r(n_tasks, n_support, 1), r(n_tasks, n_query, 1), r(n_tasks, n_query, 1))


def hand_forward(p, x):
    h = torch.tanh(x @ p["layers.0.weight"].T + p["layers.0.bias"])
    h = torch.tanh(h @ p["layers.1.weight"].T + p["layers.1.bias"])
    return h @ p["layers.2.weight"].T + p["layers.2.bias"]


def hand_inner(theta, x, y, steps, optimizer, lr, beta2=0.999, eps=1e-8):
    """k full-batch steps of SGD or Adam(β1 = 0) on one task, written out by hand."""
    p = {k: v.clone() for k, v in theta.items()}
    v_acc = {k: torch.zeros_like(t) for k, t in p.items()}
    for t in range(1, steps + 1):
        leaves = {k: q.clone().requires_grad_(True) for k, q in p.items()}
        loss = ((hand_forward(leaves, x) - y) ** 2).mean()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        for k in p:
            g = grads[k]
            if optimizer == "sgd":
                p[k] = p[k] - lr * g
            else:  # β1 = 0: the first moment is the gradient itself
                v_acc[k] = beta2 * v_acc[k] + (1 - beta2) * g * g
                p[k] = p[k] - lr * g / (torch.sqrt(v_acc[k] / (1 - beta2 ** t)) + eps)
    return p


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.05), ("sgd", 0.1)])
def test_update_equals_its_definition(float64, optimizer, lr):
    cfg = sine_cfg(reptile={"optimizer": optimizer, "lr": lr, "steps": 3, "batch_size": None, "meta_step": 1.0,
                            "meta_step_final": 0.0})
    method = make_track(cfg).method
    theta = {k: v.detach().clone() for k, v in method.model.named_parameters()}
    batch = tiny_batch(3)
    method.train_step(batch, iteration=4)  # ε = 1 − 4/10 = 0.6
    x = torch.cat([batch.x_support, batch.x_query], 1)
    y = torch.cat([batch.y_support, batch.y_query], 1)
    phis = [hand_inner(theta, x[i], y[i], 3, optimizer, lr) for i in range(3)]
    for k, p in method.model.named_parameters():
        want = theta[k] + 0.6 * (sum(phi[k] for phi in phis) / 3 - theta[k])
        assert torch.allclose(p, want, rtol=0, atol=1e-12), (k, (p - want).abs().max())
        assert not torch.allclose(p, theta[k])


def test_adam_step_matches_torch_adam(float64):
    """The functional Adam equals torch.optim.Adam over several steps (β1 = 0 and β1 = 0.9)."""
    for beta1 in (0.0, 0.9):
        w = torch.randn(4, 3)
        ref = w.clone().requires_grad_(True)
        opt = torch.optim.Adam([ref], lr=0.01, betas=(beta1, 0.99), eps=1e-6)
        p, state = {"w": w}, {"t": 0, "m": {}, "v": {}}
        for _ in range(4):
            g = torch.randn(4, 3)
            ref.grad = g.clone()
            opt.step()
            p, state = adam_step(p, {"w": g}, state, lr=0.01, beta1=beta1, beta2=0.99, eps=1e-6)
        assert torch.allclose(p["w"], ref.detach(), rtol=0, atol=1e-13)


def test_meta_step_is_annealed_linearly():
    method = make_track(sine_cfg(iterations=8, reptile={"meta_step": 1.0, "meta_step_final": 0.2})).method
    assert [method.meta_step_size(i) for i in (0, 2, 4, 8, 100)] == pytest.approx([1.0, 0.8, 0.6, 0.2, 0.2])
    pinned = make_track(sine_cfg(iterations=8, reptile={"meta_step": 0.1, "anneal_over": 100})).method
    assert pinned.meta_step_size(50) == pytest.approx(0.05)


def test_minibatches_cover_each_example_once_per_epoch():
    idx = minibatch_indices(3, 10, 5, 4, torch.Generator().manual_seed(0))  # 2 epochs of 2 batches
    assert idx.shape == (4, 3, 5)
    for t in range(3):
        assert sorted(idx[:2, t].flatten().tolist()) == list(range(10))
        assert sorted(idx[2:, t].flatten().tolist()) == list(range(10))
    assert not torch.equal(idx[:2, 0], idx[:2, 1])  # each task its own order
    assert minibatch_indices(3, 10, None, 4) is None and minibatch_indices(3, 10, 10, 4) is None


def _after_step(cfg, batch, seed=5):
    torch.manual_seed(seed)
    method = make_track(cfg).method
    torch.manual_seed(seed + 1)  # the minibatch order
    method.train_step(batch, 0)
    return {k: v.detach().clone() for k, v in method.model.named_parameters()}


def test_serial_and_batched(float64):
    """Meta-batch 1: serial (Algorithm 1) and batched (Algorithm 2) are the same update, bitwise.
    Meta-batch 3: serial equals three hand-chained one-task updates and differs from batched."""
    kw = {"reptile": {"steps": 4, "batch_size": 3, "meta_step": 0.5}}
    one = tiny_batch(1)
    a = _after_step(sine_cfg(meta_batch=1, **config.merge(kw, {"reptile": {"serial": True}})), one)
    b = _after_step(sine_cfg(meta_batch=1, **kw), one)
    assert all(torch.equal(a[k], b[k]) for k in a)

    three = tiny_batch(3, seed=1)
    serial = _after_step(sine_cfg(meta_batch=3, iterations=1, **config.merge(kw, {"reptile": {"serial": True, "batch_size": None}})), three)
    batched = _after_step(sine_cfg(meta_batch=3, iterations=1, **config.merge(kw, {"reptile": {"batch_size": None}})), three)
    torch.manual_seed(5)
    chain = make_track(sine_cfg(meta_batch=1, iterations=1, **config.merge(kw, {"reptile": {"batch_size": None}}))).method
    for i in range(3):
        chain.train_step(three.task(i), 0)  # ε at iteration 0 for every task of the serial meta-batch
    for k, p in chain.model.named_parameters():
        assert torch.allclose(serial[k], p, rtol=0, atol=1e-12), k
    assert any(not torch.allclose(serial[k], batched[k]) for k in serial)


def test_resume_is_bitwise_identical(tmp_path):
    extra = {"reptile": {"anneal_over": 12, "batch_size": 4}, "baselines": ["pretrain"], "checkpoint_every": 100}
    resume_round_trip(lambda n: sine_cfg(iterations=n, **extra), tmp_path, 12, 6)


@pytest.mark.slow
def test_a_few_hundred_iterations_beat_the_pretrain_baseline(tmp_path):
    """Reptile on sine (batched, meta-batch 25, the paper's 50 points per task in minibatches of 10)
    fits a new task with 32 SGD steps from 10 points clearly better than fine-tuning the
    pretrained regressor does."""
    cfg = config.load("experiments/reptile_sine.yaml", ["iterations=400", "meta_batch=10", "reptile.meta_step=1.0",
                                                        "checkpoint_every=400", "log_every=100", "sine_eval.validation_tasks=50"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 32, seed=7)
    rep, pre = res.curves["reptile"].mean(0), res.curves["pretrain"].mean(0)
    assert rep[32] < rep[0], "adaptation must improve Reptile's fit"
    assert rep[32] < 0.8 * pre[32], (rep[[0, 8, 32]], pre[[0, 8, 32]])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_short_omniglot_run_clearly_beats_chance(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/reptile_omniglot_5w1s.yaml", [
        "iterations=300", "meta_batch=5", "checkpoint_every=300", "log_every=20", "model.hidden=16", "baselines=[]"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path, ["episode.q_query=1"])
    res = track.evaluate(100, 30, seed=11)
    acc = res.curves["reptile"]
    assert acc.shape == (100, 31) and res.curve_axis == "inner optimizer steps"
    mean, sd = acc[:, -1].mean(), acc[:, -1].std(ddof=1)
    assert mean - 2 * sd / np.sqrt(100) > 0.2 + 0.15, acc.mean(0)
    assert acc[:, -1].mean() > acc[:, 0].mean() + 0.15  # the inner optimizer is what helps


def test_cli_evaluate_writes_reptile_curve(tmp_path):
    sets = ["iterations=4", "meta_batch=2", "model.hidden=[8,8]", "baselines=[oracle]", "checkpoint_every=4"]
    out = cli_train_and_evaluate("experiments/reptile_sine.yaml", tmp_path / "run", sets, ["--tasks", "5", "--steps", "3"])
    assert out["algorithm"] == "reptile" and out["steps"] == [0, 1, 2, 3]
    assert set(out["methods"]) == {"reptile", "oracle"} and len(out["methods"]["reptile"]["mean"]) == 4
    assert out["step_sizes"]["reptile"]["inner_optimizer"] == "sgd"


def test_config_errors_are_one_line():
    with pytest.raises(config.ConfigError, match="reptile.batch_size"):
        sine_cfg(reptile={"batch_size": 0})
    with pytest.raises(config.ConfigError, match="unknown config key 'reptile.lrr'"):
        sine_cfg(reptile={"lrr": 0.1})
