"""Alpha MAML (Behl et al. 2019): the inner step size's hypergradient against finite differences of
the post-update query loss, the α and β updates against the hypergradient-descent formulas by
hand, zero hyper-learning-rates = MAML bitwise, bitwise resume with α and β, learning, CLI."""
import csv

import numpy as np
import pytest
import torch
from torch.func import functional_call

from tests.checks import resume_round_trip, cli_train_and_evaluate
from metarl import config
from metarl.algorithms.alpha_maml import AlphaMAML
from metarl.algorithms.base import Problem
from metarl.config import ConfigError
from metarl.objectives import mse
from metarl.policies.mlp import MLP
from metarl.tasks.batch import TaskBatch
from metarl.training import load_track, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def sine_cfg(**extra):
    data = {"track": "sine", "algorithm": "alpha_maml", "iterations": 40, "checkpoint_every": 10, "log_every": 5,
            "meta_batch": 5, "eval": {"tasks": 20}}
    data.update(extra)
    return config.from_dict(data)


def tiny_method(steps=1, **own):
    cfg = sine_cfg(model={"hidden": [5]}, inner={"steps": steps, "lr": 0.05}, baselines=[], alpha_maml=own)
    problem = Problem(track="sine", make_model=lambda: MLP(1, 1, [5]), loss=mse, metric=mse,
                      metric_name="mse", higher_is_better=False, head=("layers.1.weight", "layers.1.bias"))
    return AlphaMAML(problem, cfg)


def tiny_batch(n_tasks=2, k=4, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_s, x_q = torch.randn(n_tasks, k, 1, generator=g), torch.randn(n_tasks, q, 1, generator=g)
    amp = torch.rand(n_tasks, 1, 1, generator=g) + 0.5
    return TaskBatch(x_s, amp * torch.sin(x_s), x_q, amp * torch.sin(x_q + 0.3))


def task_loss(model, params, x, y):
    return ((functional_call(model, params, (x,)) - y) ** 2).mean()


def post_update_query_loss(model, theta, alpha, batch, steps=1):
    """Mean query MSE after `steps` SGD steps of size alpha, task by task (no engine code)."""
    total = 0.0
    for i in range(batch.n_tasks):
        phi = {n: p.detach().clone().requires_grad_(True) for n, p in theta.items()}
        for _ in range(steps):
            g = torch.autograd.grad(task_loss(model, phi, batch.x_support[i], batch.y_support[i]), list(phi.values()), create_graph=True)
            phi = {n: p - alpha * gi for (n, p), gi in zip(phi.items(), g)}
        total += task_loss(model, phi, batch.x_query[i], batch.y_query[i]).item()
    return total / batch.n_tasks


@pytest.mark.parametrize("steps", [1, 2])
def test_inner_hypergradient_equals_finite_difference_of_post_update_query_loss(float64, steps):
    torch.manual_seed(0)
    m = tiny_method(steps=steps)
    batch = tiny_batch()
    _, h = m.inner_hypergradient(batch)
    theta = dict(m.model.named_parameters())
    eps = 1e-6
    fd = (post_update_query_loss(m.model, theta, m.inner_lr + eps, batch, steps)
          - post_update_query_loss(m.model, theta, m.inner_lr - eps, batch, steps)) / (2 * eps)
    assert abs(fd) > 1e-3
    assert h.item() == pytest.approx(fd, rel=1e-6)


def test_alpha_update_is_the_hypergradient_descent_formula(float64):
    """α_1 = α_0 − η_α ∂L/∂α with ∂L/∂α = −mean_i ∇_φ L_query,i(φ_i) · ∇_θ L_support,i(θ) (one step)."""
    torch.manual_seed(0)
    eta = 1e-2
    m = tiny_method(inner_hyper_lr=eta, outer_hyper_lr=0.0)
    batch = tiny_batch()
    a0 = m.inner_lr
    theta = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    h = 0.0
    for i in range(batch.n_tasks):
        th = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
        gs = torch.autograd.grad(task_loss(m.model, th, batch.x_support[i], batch.y_support[i]), list(th.values()))
        phi = {n: (p - a0 * g).detach().requires_grad_(True) for (n, p), g in zip(th.items(), gs)}
        gq = torch.autograd.grad(task_loss(m.model, phi, batch.x_query[i], batch.y_query[i]), list(phi.values()))
        h -= sum((a * b).sum() for a, b in zip(gq, gs)).item() / batch.n_tasks
    metrics = m.train_step(batch, 0)
    assert metrics["step/inner_lr"] == a0 and metrics["hypergrad/inner"] == pytest.approx(h, rel=1e-10)
    assert m.inner_lr == pytest.approx(a0 - eta * h, rel=1e-12, abs=1e-15)
    assert m.inner_lr != a0


@pytest.mark.parametrize("rule", ["adam_hd", "sgd_hd"])
def test_outer_step_size_update_is_the_hypergradient_descent_formula(float64, rule):
    """Second iteration: Adam-HD β_2 = β_1 + η_β g_2 · m̂_1/(√v̂_1 + ε) (m̂_1 = g_1, v̂_1 = g_1²);
    SGD-HD β_2 = β_1 + η_β g_2 · g_1 and θ_2 = θ_1 − β_2 g_2."""
    torch.manual_seed(0)
    eta = 1e-3
    m = tiny_method(inner_hyper_lr=0.0, outer_hyper_lr=eta, outer_rule=rule)
    flat_grad = lambda: torch.cat([p.grad.reshape(-1) for p in m.model.parameters()]).clone()
    b0 = m.outer_lr
    m.train_step(tiny_batch(seed=1), 0)
    g1 = flat_grad()
    assert m.outer_lr == b0  # no previous update yet: the hypergradient is 0
    theta1 = torch.cat([p.detach().reshape(-1) for p in m.model.parameters()]).clone()
    metrics = m.train_step(tiny_batch(seed=2), 1)
    g2 = flat_grad()
    if rule == "adam_hd":
        want = b0 + eta * torch.dot(g2, g1 / (g1.abs() + 1e-8)).item()
    else:
        want = b0 + eta * torch.dot(g2, g1).item()
        theta2 = torch.cat([p.detach().reshape(-1) for p in m.model.parameters()])
        assert torch.allclose(theta2, theta1 - want * g2, rtol=0, atol=1e-14)
    assert m.outer_lr == pytest.approx(want, rel=1e-10) and metrics["step/outer_lr"] == m.outer_lr
    assert m.outer_lr != b0
    assert all(g["lr"] == m.outer_lr for g in m.optimizers["alpha_maml"].param_groups)


def params(track):
    return {f"{k}.{n}": p.detach().clone() for k, m in track.modules.items() for n, p in m.named_parameters()}


def test_zero_hyper_learning_rates_are_maml_bitwise(tmp_path):
    a = train(sine_cfg(iterations=15, alpha_maml={"inner_hyper_lr": 0.0, "outer_hyper_lr": 0.0}), tmp_path / "a", tensorboard=False)
    b = train(sine_cfg(iterations=15, algorithm="maml"), tmp_path / "b", tensorboard=False)
    pa, pb = params(a), params(b)
    assert {k.replace("alpha_maml.", "maml.") for k in pa} == set(pb)
    for k, v in pa.items():
        assert torch.equal(v, pb[k.replace("alpha_maml.", "maml.")]), k
    assert a.method.inner_lr == 0.01 and a.method.outer_lr == 0.001


@pytest.mark.parametrize("rule", ["adam_hd", "sgd_hd"])
def test_resume_is_bitwise_identical_with_step_sizes_restored(tmp_path, rule):
    own = {"outer_rule": rule, "inner_hyper_lr": 1e-4, "outer_hyper_lr": 1e-7 if rule == "adam_hd" else 1e-4}
    extra = {"outer": {"lr": 0.01}} if rule == "sgd_hd" else {}
    full, resumed = resume_round_trip(lambda n: sine_cfg(iterations=n, alpha_maml=own, **extra), tmp_path,
                                      sine_cfg().iterations, 20)
    fm, rm = full.method, resumed.method
    assert fm.inner_lr == rm.inner_lr and fm.outer_lr == rm.outer_lr
    assert fm.inner_lr != 0.01 and fm.outer_lr != full.cfg.outer.lr  # they did move
    if rule == "sgd_hd":
        assert torch.equal(fm.prev_grad, rm.prev_grad)
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert {"step/inner_lr", "step/outer_lr"} <= set(rows[0]) and len({r["step/inner_lr"] for r in rows}) > 1


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="inner_hyper_lr"):
        sine_cfg(alpha_maml={"inner_hyper_lr": -1})
    with pytest.raises(ConfigError, match="outer_rule"):
        sine_cfg(alpha_maml={"outer_rule": "rmsprop_hd"})


def test_a_few_hundred_iterations_beat_the_pretrain_baseline(tmp_path):
    cfg = sine_cfg(iterations=600, meta_batch=25, checkpoint_every=600, log_every=100, baselines=["pretrain"],
                   alpha_maml={"inner_hyper_lr": 1e-5})
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(200, 10, seed=7)
    am, pre = res.curves["alpha_maml"].mean(0), res.curves["pretrain"].mean(0)
    assert am[1] < am[0]
    assert am[1] < 0.8 * pre[1] and am[10] < 0.8 * pre[10], (am, pre)


def test_short_omniglot_run_clearly_beats_chance(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/alpha_maml_omniglot_5w1s.yaml", [
        "iterations=60", "meta_batch=8", "checkpoint_every=60", "log_every=20", "model.hidden=16", "baselines=[]",
        "snapshot_every=0"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 1, seed=11)
    acc = res.curves["alpha_maml"]
    mean, sd = acc[:, 1].mean(), acc[:, 1].std(ddof=1)
    assert mean - 2 * sd / np.sqrt(100) > 0.2 + 0.15, acc.mean(0)
    assert acc[:, 1].mean() > acc[:, 0].mean()
    assert track.method.inner_lr != 0.4


def test_cli_evaluate_writes_the_alpha_maml_curve(tmp_path):
    rd = tmp_path / "run"
    out = cli_train_and_evaluate("experiments/alpha_maml_sine.yaml", rd, ["iterations=4", "checkpoint_every=4", "baselines=[oracle]"],
                                 ["--tasks", "10", "--steps", "2"])
    assert out["algorithm"] == "alpha_maml" and set(out["methods"]) == {"alpha_maml", "oracle"}
    assert len(out["methods"]["alpha_maml"]["mean"]) == 3
    track, _, _ = load_track(rd)
    assert out["step_sizes"]["alpha_maml"]["inner_lr"] == track.method.inner_lr != 0.01
