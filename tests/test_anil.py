"""ANIL (Raghu et al. 2020): the fast path (features once, head-only inner loop) equals MAML with
``only=head`` on the full network, its meta-gradient matches central finite differences, the
inner loop touches only the head; plus the seam (resume, evaluate, learning)."""

import numpy as np
import pytest
import torch

from tests.checks import resume_round_trip, cli_train_and_evaluate
from metarl import config
from metarl.algorithms import anil as anil_mod
from metarl.algorithms.anil import head_query_predictions
from metarl.algorithms.maml import query_predictions
from metarl.functional import forward_tasks, params_of, stack
from metarl.objectives import cross_entropy, mse
from metarl.policies.conv4 import Conv4
from metarl.policies.mlp import MLP
from metarl.tasks.batch import TaskBatch
from metarl.training import load_track, train

CONV_HEAD = ["head.weight", "head.bias"]
MLP_HEAD = ["layers.2.weight", "layers.2.bias"]


def conv_problem(n_tasks=3, n_way=3, hidden=3, seed=0):
    torch.manual_seed(seed)
    model = Conv4(1, n_way, hidden=hidden, image_size=16)
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n_tasks, n, 1, 16, 16, generator=g, dtype=torch.get_default_dtype())
    y = lambda n: torch.arange(n_way).repeat(n // n_way).expand(n_tasks, -1).contiguous()
    return model, TaskBatch(x(n_way * 2), y(n_way * 2), x(n_way), y(n_way)), cross_entropy, CONV_HEAD


def mlp_problem(n_tasks=3, seed=0):
    torch.manual_seed(seed)
    model = MLP(1, 1, [4, 3], "tanh")
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(n_tasks, n, 1, generator=g, dtype=torch.get_default_dtype())
    return model, TaskBatch(r(5), r(5), r(4), r(4)), mse, MLP_HEAD


def meta_grad(predict, model, batch, loss, head, params=None, **inner):
    params = params or params_of(model)
    out = loss(predict(model, params, batch, loss, only=head, **inner), batch.y_query).mean()
    return out, dict(zip(params, torch.autograd.grad(out, list(params.values()), allow_unused=True)))


@pytest.mark.parametrize("make", [conv_problem, mlp_problem])
@pytest.mark.parametrize("first_order", [False, True])
def test_fast_path_equals_maml_with_only_head(float64, make, first_order):
    model, batch, loss, head = make()
    inner = {"steps": 2, "lr": 0.3, "first_order": first_order}
    la, ga = meta_grad(head_query_predictions, model, batch, loss, head, **inner)
    lb, gb = meta_grad(query_predictions, model, batch, loss, head, **inner)
    assert abs(la.item() - lb.item()) < 1e-12
    for k in ga:
        a = torch.zeros_like(params_of(model)[k]) if ga[k] is None else ga[k]
        b = torch.zeros_like(a) if gb[k] is None else gb[k]
        assert torch.allclose(a, b, rtol=0, atol=1e-10), (k, (a - b).abs().max())
    body = [k for k in ga if k not in head and ga[k] is not None]
    assert any(ga[k].abs().max() > 1e-6 for k in body), "the body must be learned by the outer loop"


def test_inner_loop_touches_only_the_head(float64, monkeypatch):
    """The fast path's inner steps see (and change) the head's tensors alone, on fixed features;
    the body's meta-gradient therefore comes only through the outer (query) loss: with 0 inner
    steps it is exactly the query loss's own gradient, and with a zero outer loss it is zero."""
    model, batch, loss, head = conv_problem()
    seen = []
    real = anil_mod.adapt

    def spy(loss_fn, params, **kw):
        seen.append(sorted(params))
        return real(loss_fn, params, **kw)

    monkeypatch.setattr(anil_mod, "adapt", spy)
    _, g = meta_grad(head_query_predictions, model, batch, loss, head, steps=2, lr=0.3)
    assert seen == [sorted(head)]
    _, g0 = meta_grad(head_query_predictions, model, batch, loss, head, steps=0, lr=0.3)
    direct = loss(forward_tasks(model, stack(params_of(model), batch.n_tasks), batch.x_query), batch.y_query).mean()
    gd = dict(zip(params_of(model), torch.autograd.grad(direct, list(params_of(model).values()), allow_unused=True)))
    for k in g0:
        if g0[k] is not None and gd[k] is not None:
            assert torch.allclose(g0[k], gd[k], rtol=0, atol=1e-12), k
    zero = lambda pred, y: 0.0 * loss(pred, y)
    params = params_of(model)
    out = zero(head_query_predictions(model, params, batch, loss, steps=2, lr=0.3, only=head), batch.y_query).mean()
    for t in torch.autograd.grad(out, list(params.values()), allow_unused=True):
        assert t is None or torch.count_nonzero(t) == 0


def _central_differences(f, params, names_idx, h=1e-6):
    out = []
    for name, idx in names_idx:
        p = params[name]
        with torch.no_grad():
            old = p[idx].item()
            p[idx] = old + h
            up = f().item()
            p[idx] = old - h
            down = f().item()
            p[idx] = old
        out.append((up - down) / (2 * h))
    return out


@pytest.mark.parametrize("make", [mlp_problem, conv_problem])
def test_meta_gradient_matches_finite_differences(float64, make):
    model, batch, loss, head = make()
    params = params_of(model)
    f = lambda: loss(head_query_predictions(model, params, batch, loss, steps=2, lr=0.4, only=head), batch.y_query).mean()
    grads = dict(zip(params, torch.autograd.grad(f(), list(params.values()), allow_unused=True)))
    gen = np.random.default_rng(0)
    coords = []
    for name, p in params.items():
        picks = range(p.numel()) if p.numel() <= 12 else gen.choice(p.numel(), 4, replace=False)
        coords += [(name, np.unravel_index(int(i), p.shape)) for i in picks]
    fd = _central_differences(f, params, coords)
    for (name, idx), want in zip(coords, fd):
        got = 0.0 if grads[name] is None else grads[name][idx].item()
        assert abs(got - want) < 1e-6 + 1e-5 * abs(want), (name, idx, got, want)
    assert any(abs(v) > 1e-4 for (n, _), v in zip(coords, fd) if n not in head)


def sine_cfg(**extra):
    data = {"track": "sine", "algorithm": "anil", "iterations": 10, "meta_batch": 4, "checkpoint_every": 100,
            "log_every": 5, "model": {"hidden": [8, 8]}, "eval": {"tasks": 10}}
    return config.from_dict(config.merge(data, extra))


def test_resume_is_bitwise_identical(tmp_path):
    resume_round_trip(lambda n: sine_cfg(iterations=n), tmp_path, 12, 6)


def test_predict_equals_full_network_head_adaptation(float64):
    """Evaluation on fixed features gives the same curve as adapting the head through the full net."""
    cfg = sine_cfg()
    from metarl.training import make_track
    fast = make_track(cfg).method
    slow = make_track(config.from_dict(config.merge(config.to_dict(cfg), {"anil": {"features_once": False}}))).method
    slow.model.load_state_dict(fast.model.state_dict())
    assert fast.fast and not slow.fast
    _, batch, _, _ = mlp_problem(n_tasks=4)
    for a, b in zip(fast.predict(batch, 3), slow.predict(batch, 3)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_cli_evaluate_writes_anil_curve(tmp_path):
    sets = ["algorithm=anil", "iterations=4", "meta_batch=2", "model.hidden=[8,8]", "baselines=[oracle]", "checkpoint_every=4"]
    out = cli_train_and_evaluate("experiments/anil_sine.yaml", tmp_path / "run", sets, ["--tasks", "5", "--steps", "3"])
    assert out["algorithm"] == "anil" and out["steps"] == [0, 1, 2, 3]
    assert set(out["methods"]) == {"anil", "oracle"} and len(out["methods"]["anil"]["mean"]) == 4


def test_only_other_than_head_is_refused():
    with pytest.raises(config.ConfigError, match="drop inner.only"):
        from metarl.training import make_track
        make_track(sine_cfg(inner={"only": ["layers.0.weight"]}))


@pytest.mark.slow
def test_a_few_hundred_iterations_beat_the_pretrain_baseline(tmp_path):
    cfg = config.load("experiments/anil_sine.yaml", ["iterations=1500", "checkpoint_every=1500", "log_every=100"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(200, 10, seed=7)
    anil, pre = res.curves["anil"].mean(0), res.curves["pretrain"].mean(0)
    assert anil[1] < anil[0]
    assert anil[10] < 0.8 * pre[10], (anil, pre)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_short_omniglot_run_clearly_beats_chance(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/anil_omniglot_5w1s.yaml", [
        "iterations=60", "meta_batch=8", "checkpoint_every=60", "log_every=20", "model.hidden=16", "baselines=[]"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    acc = track.evaluate(100, 3, seed=11).curves["anil"]
    mean, sd = acc[:, 1].mean(), acc[:, 1].std(ddof=1)
    assert mean - 2 * sd / np.sqrt(100) > 0.2 + 0.15, acc.mean(0)
    assert acc[:, 1].mean() > acc[:, 0].mean()
