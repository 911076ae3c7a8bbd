"""MAML++ (metarl/algorithms/maml_pp.py), each fix against an independent reference: the MSL
schedule and the cosine schedule by hand, per-step batch norm by perturbation, the learned step
sizes' meta-gradient by central finite differences, derivative-order annealing against
FOMAML's and MAML's meta-gradients, bitwise resume across the switch, and short real runs."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from metarl import config
from metarl.algorithms.base import Problem
from metarl.algorithms.maml import meta_backward
from metarl.algorithms.maml_pp import MAMLPlusPlus, cosine_lr, msl_weights
from metarl.functional import params_of
from metarl.objectives import accuracy, cross_entropy, mse
from metarl.policies.conv4 import Conv4
from metarl.policies.mlp import MLP
from metarl.tasks.batch import TaskBatch
from metarl.training import load_track, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def sine_method(**own):
    cfg = config.from_dict({"track": "sine", "algorithm": "maml_pp", "maml_pp": own})
    problem = Problem(track="sine", make_model=lambda: MLP(1, 1, [8, 8]), loss=mse, metric=mse, metric_name="mse",
                      higher_is_better=False, head=("layers.2.weight", "layers.2.bias"))
    return MAMLPlusPlus(problem, cfg)


def conv_method(n_way=2, hidden=3, **own):
    cfg = config.from_dict({"track": "fewshot", "algorithm": "maml_pp", "episode": {"n_way": n_way}, "inner": {"task_workers": 1},
                            "maml_pp": own})
    problem = Problem(track="fewshot", make_model=lambda: Conv4(1, n_way, hidden=hidden, image_size=16), loss=cross_entropy,
                      metric=accuracy, metric_name="accuracy", higher_is_better=True, head=("head.weight", "head.bias"), n_way=n_way)
    return MAMLPlusPlus(problem, cfg)


def image_batch(n_tasks=2, n_way=2, shots=2, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.get_default_dtype()
    y_s = torch.arange(n_way).repeat_interleave(shots).expand(n_tasks, -1).contiguous()
    y_q = torch.arange(n_way).repeat_interleave(queries).expand(n_tasks, -1).contiguous()
    return TaskBatch(torch.rand(n_tasks, n_way * shots, 1, 16, 16, generator=g, dtype=dt), y_s,
                     torch.rand(n_tasks, n_way * queries, 1, 16, 16, generator=g, dtype=dt), y_q)


def sine_batch(n_tasks=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.get_default_dtype()
    amp, ph = 0.5 + 4 * torch.rand(n_tasks, 1, 1, generator=g, dtype=dt), 3 * torch.rand(n_tasks, 1, 1, generator=g, dtype=dt)
    xs, xq = 10 * torch.rand(n_tasks, k, 1, generator=g, dtype=dt) - 5, 10 * torch.rand(n_tasks, k, 1, generator=g, dtype=dt) - 5
    return TaskBatch(xs, amp * torch.sin(xs - ph), xq, amp * torch.sin(xq - ph))


# ---------------------------------------------------------------------------- schedules by hand

def test_multi_step_loss_weights_follow_the_papers_schedule():
    K, E = 5, 10  # decay per epoch 1/(K E) = 0.02; floor 0.03/K = 0.006
    assert msl_weights(0, K, E) == pytest.approx([0.2] * 5)
    assert msl_weights(3, K, E) == pytest.approx([0.14] * 4 + [0.44])          # 0.2 - 3*0.02, 0.2 + 3*4*0.02
    assert msl_weights(9, K, E) == pytest.approx([0.02] * 4 + [0.92])
    assert msl_weights(10, K, E) == [0.0, 0.0, 0.0, 0.0, 1.0]                  # from epoch E on: last step only
    assert msl_weights(99, K, 100) == pytest.approx([0.006] * 4 + [0.976])     # the floor: 0.2 - 99*0.002 < 0.006
    assert msl_weights(2, K, E, enabled=False) == [0.0, 0.0, 0.0, 0.0, 1.0]
    for e in range(0, 120):
        w = msl_weights(e, K, 100)
        assert sum(w) == pytest.approx(1.0, abs=1e-12) and min(w) >= 0
        assert all(a >= b for a, b in zip(w[:-1], msl_weights(e + 1, K, 100)[:-1]))  # non-final weights never grow
    m = sine_method(steps=5, epoch_length=7, msl_epochs=10)
    assert m.weights_at(20) == pytest.approx(msl_weights(2, 5, 10))           # iteration 20 is epoch 20 // 7 = 2
    assert m.weights_at(69) == pytest.approx([0.02] * 4 + [0.92]) and m.weights_at(70)[-1] == 1.0


def test_cosine_outer_step_size_by_hand_and_the_step_uses_it(float64):  # float64: a float32 weight of size ~4 quantises a 5e-4 move to 1e-3 relative
    m = sine_method(epochs=4, epoch_length=3, min_lr=1e-5, steps=2)
    base, lo = 1e-3, 1e-5
    hand = {0: base, 3: lo + (base - lo) * (1 + math.cos(math.pi / 4)) / 2, 6: lo + (base - lo) / 2,
            9: lo + (base - lo) * (1 + math.cos(3 * math.pi / 4)) / 2, 12: lo, 30: lo}
    for it, want in hand.items():
        assert m.outer_lr_at(it) == pytest.approx(want, rel=1e-12) and m.outer_lr_at(it + 2) == m.outer_lr_at(it)
    assert cosine_lr(6, base, lo, 4) == pytest.approx(lo)  # held at the minimum after the schedule's end
    assert sine_method(cosine=False).outer_lr_at(10_000) == base
    # Adam's first step moves each parameter by ≈ its step size (m/√v = ±1): the update at
    # iteration 7 (epoch 2) has size lr(2) = 0.000505, not outer.lr
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    metrics = m.train_step(sine_batch(), 7)
    assert metrics["outer_lr/maml_pp"] == pytest.approx(hand[6])
    moved = torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in m.model.named_parameters()])
    moved = moved[moved > 0]
    assert moved.numel() > 0 and torch.allclose(moved, torch.full_like(moved, hand[6]), rtol=1e-3)


def test_grad_clip_clamps_the_applied_meta_gradient_elementwise_and_is_the_sine_default():
    """The gradient Adam steps on is the unclipped meta-gradient clamped to ±c (same init, same
    batch); sine resolves grad_clip 10 from the method's defaults, few-shot keeps the paper's none."""
    grads = {}
    for clip in (None, 0.05):
        torch.manual_seed(0)
        m = sine_method(steps=2, grad_clip=clip)
        m.train_step(sine_batch(), 0)
        grads[clip] = {n: p.grad.clone() for n, p in m.model.named_parameters()}
    raw = torch.cat([g.flatten() for g in grads[None].values()])
    assert (raw.abs() > 0.05).any() and (raw.abs() < 0.05).any()  # some elements are clipped, some not
    for n, g in grads[None].items():
        assert torch.equal(grads[0.05][n], g.clamp(-0.05, 0.05))
    assert config.from_dict({"track": "sine", "algorithm": "maml_pp"}).maml_pp.grad_clip == 10.0
    assert config.from_dict({"track": "fewshot", "algorithm": "maml_pp"}).maml_pp.grad_clip is None


# ---------------------------------------------------------------------------- per-step batch norm

def test_each_inner_step_uses_its_own_batch_norm_parameters():
    torch.manual_seed(0)
    m = conv_method(steps=3, lr=0.3)
    with torch.no_grad():  # distinct per-step values, so each set matters
        for p in m.bn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = image_batch(n_tasks=2)
    base = m.predict(batch, 5)
    assert len(base) == 6
    for k in (2, 3):  # perturb step k's set (1-indexed): predictions after < k steps keep, after >= k move
        saved = {n: p.detach().clone() for n, p in m.bn.named_parameters()}
        with torch.no_grad():
            for p in m.bn.parameters():
                p[k - 1] += 0.5
        moved = m.predict(batch, 5)
        for j in range(6):
            same = torch.equal(moved[j], base[j])
            assert same == (j < k), (k, j)
        with torch.no_grad():
            for n, p in m.bn.named_parameters():
                p.copy_(saved[n])
    assert all(torch.equal(a, b) for a, b in zip(m.predict(batch, 5), base))
    # without BNWB the model's own batch-norm tensors serve every step and none is per step
    plain = conv_method(steps=3, bnwb=False)
    assert plain.bn is None and "maml_pp.bn" not in plain.modules
    assert all("norm" not in n for n in plain.adapted)


# ---------------------------------------------------------------------------- meta-gradients

def _meta_loss(m, batch, iteration):
    return m.objective(iteration)(batch)[1].sum() / batch.n_tasks


def test_learned_step_sizes_meta_gradient_matches_finite_differences(float64):
    torch.manual_seed(1)
    m = conv_method(steps=2, lr=0.2, derivative_annealing=False)  # second order, MSL weights [0.5, 0.5] at epoch 0
    m.model.double(), m.bn.double(), m.lslr.double()
    with torch.no_grad():
        for p in m.lslr.parameters():  # different sizes per step and layer
            p.mul_(1 + 0.5 * torch.rand_like(p))
    batch = image_batch(n_tasks=2, seed=3)
    opt = m.optimizers["maml_pp"]
    params = {f"p{i}": p for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    opt.zero_grad(set_to_none=True)
    meta_backward(m.model, params, batch, m.problem.loss, objective=m.objective(0))
    eps = 1e-6
    checked = 0
    for name, p in m.lslr.values.items():
        for k in range(p.shape[0]):
            with torch.no_grad():
                p[k] += eps
            up = _meta_loss(m, batch, 0).item()
            with torch.no_grad():
                p[k] -= 2 * eps
            down = _meta_loss(m, batch, 0).item()
            with torch.no_grad():
                p[k] += eps
            fd = (up - down) / (2 * eps)
            assert p.grad[k].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, k)
            checked += fd != 0
    assert checked >= 10  # conv biases cancel under batch norm (zero gradient); the other sizes are live
    # and a few per-step batch-norm entries the same way
    for name, p in list(m.bn.values.items())[:2]:
        idx = (1, 0)
        with torch.no_grad():
            p[idx] += eps
        up = _meta_loss(m, batch, 0).item()
        with torch.no_grad():
            p[idx] -= 2 * eps
        down = _meta_loss(m, batch, 0).item()
        with torch.no_grad():
            p[idx] += eps
        assert p.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9), name


def test_derivative_order_annealing_switches_from_fomaml_to_maml_at_the_configured_iteration(float64):
    torch.manual_seed(2)
    m = sine_method(steps=2, lr=0.05, msl=False, lslr=False, epoch_length=3, first_order_epochs=2)  # switch at iteration 6
    m.model.double()
    batch = sine_batch(seed=4)
    theta = params_of(m.model)

    def grads(objective=None, **inner):
        for p in theta.values():
            p.grad = None
        meta_backward(m.model, theta, batch, mse, objective=objective, **inner)
        return torch.cat([p.grad.flatten() for p in theta.values()])

    fomaml = grads(steps=2, lr=0.05, first_order=True)
    maml = grads(steps=2, lr=0.05, first_order=False)
    assert not torch.allclose(fomaml, maml, rtol=1e-3)
    for it in (0, 5):
        assert torch.allclose(grads(m.objective(it)), fomaml, rtol=1e-10, atol=1e-14), it
    for it in (6, 100):
        assert torch.allclose(grads(m.objective(it)), maml, rtol=1e-10, atol=1e-14), it
    assert [m.second_order_at(i) for i in (5, 6)] == [False, True]
    assert not sine_method(second_order=False).second_order_at(10**6)
    assert sine_method(derivative_annealing=False).second_order_at(0)


# ---------------------------------------------------------------------------- resume, runs, CLI

def _state(track):
    out = {f"{k}.{n}": t.detach().clone() for k, mod in track.modules.items() for n, t in mod.state_dict().items()}
    for k, opt in track.optimizers.items():
        sd = opt.state_dict()
        for i, s in sd["state"].items():
            for n, t in s.items():
                out[f"opt.{k}.{i}.{n}"] = torch.as_tensor(t).clone()
        for j, g in enumerate(sd["param_groups"]):
            out[f"opt.{k}.group{j}.lr"] = torch.tensor(g["lr"])
    return out


def test_resume_across_the_derivative_order_switch_is_bitwise_identical(tmp_path):
    own = {"steps": 2, "epoch_length": 3, "first_order_epochs": 2, "msl_epochs": 3, "epochs": 4}  # DA switch at iteration 6
    mk = lambda n: config.from_dict({"track": "sine", "algorithm": "maml_pp", "iterations": n, "meta_batch": 4, "checkpoint_every": 100,
                                     "log_every": 1, "maml_pp": own})
    full = train(mk(12), tmp_path / "full", tensorboard=False)
    train(mk(5), tmp_path / "split", tensorboard=False)
    resumed = train(mk(12), tmp_path / "split", resume=True, tensorboard=False)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("maml_pp.lslr") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("second_order/maml_pp")
    assert [float(r.split(",")[col]) for r in rows[1:]] == [0.0] * 6 + [1.0] * 6


@pytest.mark.slow  # ~1-4 min on the shared 2-core machine
def test_a_few_hundred_iterations_beat_the_pretrain_baseline(tmp_path):
    cfg = config.load("experiments/maml_pp_sine.yaml", [
        "iterations=400", "meta_batch=25", "checkpoint_every=400", "log_every=100",
        "maml_pp.epoch_length=10", "maml_pp.first_order_epochs=5", "maml_pp.msl_epochs=10"])  # cosine over 150 epochs: ~outer.lr here
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(200, 10, seed=7)
    ours, pre = res.curves["maml_pp"].mean(0), res.curves["pretrain"].mean(0)
    assert ours[5] < ours[0], ours
    # clearly better at the trained horizon K = 5 (measured: 2.04 vs 2.74); steps past K reuse step
    # K's sizes and still beat fine-tuning (2.02 vs 2.50)
    assert ours[5] < 0.8 * pre[5] and ours[10] < pre[10], (ours, pre)


@pytest.mark.slow  # ~4 min on the shared, loaded 2-core machine
def test_short_omniglot_run_clearly_beats_chance(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/maml_pp_omniglot_5w1s.yaml", [
        "iterations=40", "meta_batch=4", "checkpoint_every=40", "log_every=20", "model.hidden=8", "model.pooling=stride",
        "maml_pp.steps=3", "maml_pp.lr=0.4", "maml_pp.epoch_length=4", "maml_pp.first_order_epochs=5", "maml_pp.msl_epochs=3",
        "maml_pp.epochs=10", "outer.lr=0.003", "baselines=[]"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 3, seed=11)
    acc = res.curves["maml_pp"]
    assert acc.shape == (100, 4)
    mean, sd = acc[:, 3].mean(), acc[:, 3].std(ddof=1)
    assert mean - 2 * sd / np.sqrt(100) > 0.2 + 0.15, acc.mean(0)
    assert acc[:, 3].mean() > acc[:, 0].mean()


def test_metarl_evaluate_writes_the_maml_pp_curve(tmp_path):
    rd = tmp_path / "run"
    sets = ["iterations=6", "meta_batch=3", "checkpoint_every=6", "maml_pp.steps=2", "maml_pp.epoch_length=2", "eval.tasks=20",
            "baselines=[oracle]"]
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/maml_pp_sine.yaml", "--run-dir", str(rd),
                        *sum((["--set", s] for s in sets), [])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--tasks", "20", "--steps", "4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert out["algorithm"] == "maml_pp" and out["steps"] == [0, 1, 2, 3, 4]
    assert len(out["methods"]["maml_pp"]["mean"]) == 5 and "oracle" in out["methods"]
    sizes = out["step_sizes"]["maml_pp"]["lslr"]
    assert set(sizes) == {f"layers.{i}.{w}" for i in range(3) for w in ("weight", "bias")} and all(len(v) == 2 for v in sizes.values())


def test_config_errors_are_one_line():
    with pytest.raises(config.ConfigError, match="'maml_pp.steps' is 0: it must be >= 1"):
        config.from_dict({"track": "sine", "algorithm": "maml_pp", "maml_pp": {"steps": 0}})
    with pytest.raises(config.ConfigError, match="msl_floor"):
        config.from_dict({"track": "sine", "algorithm": "maml_pp", "maml_pp": {"msl_floor": 2}})
    c = config.load("experiments/omniglot_5w1s.yaml", ["algorithm=maml_pp"])  # a MAML config runs MAML++'s own steps and lr
    assert (c.maml_pp.steps, c.maml_pp.lr) == (5, 0.1)
