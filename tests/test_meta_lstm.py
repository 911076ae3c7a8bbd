"""The LSTM meta-learner (Ravi & Larochelle 2017) against independent references: the paper's
equations by hand in numpy, SGD (metarl.adaptation.adapt) as the f = 1, constant-i special case,
central finite differences of the meta-gradient under the paper's simplification; then a short
Omniglot run above chance, bitwise resume and the `metarl evaluate` contract."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.checks import resume_round_trip, cli_train_and_evaluate
from metarl import config
from metarl.adaptation import adapt
from metarl.algorithms.base import Problem
from metarl.algorithms.meta_lstm import MetaLSTM, flatten, preprocess
from metarl.functional import forward_tasks, params_of, stack
from metarl.objectives import mse
from metarl.policies.mlp import MLP
from metarl.tasks.batch import TaskBatch
from metarl.training import load_track, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def linear_method(updates=2, **own):
    """The method on a tiny learner: a linear model y = w x + b (P = 2) with the MSE."""
    cfg = config.from_dict({"track": "sine", "algorithm": "meta_lstm", "baselines": [],
                            "meta_lstm": {"updates": updates, "hidden": 3, **own}})
    problem = Problem(track="sine", make_model=lambda: MLP(1, 1, hidden=[]), loss=mse, metric=mse, metric_name="mse",
                      higher_is_better=False, head=("layers.0.weight", "layers.0.bias"))
    return MetaLSTM(problem, cfg)


def linear_batch(n_tasks=2, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, 2 * k, 1, generator=g)
    y = 1.5 * torch.sin(x + torch.arange(n_tasks).view(-1, 1, 1))
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def np_preprocess(v, p=10.0):
    v = np.asarray(v, dtype=np.float64)
    big = np.abs(v) >= np.exp(-p)
    return np.stack([np.where(big, np.log(np.maximum(np.abs(v), 1e-300)) / p, -1.0),
                     np.where(big, np.sign(v), np.exp(p) * v)], -1)


def sig(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("feedback", ["value", "logit"])
def test_cell_update_equals_the_papers_equations_by_hand(float64, feedback):
    """Two updates on a linear learner, recomputed in numpy from eqs. 1-3: the learner's gradient of
    the mean squared error in closed form, Andrychowicz's preprocessing, a textbook LSTM layer
    (gates i, f, g, o), then c_t = f_t c_{t-1} - i_t grad_t with the gates on [h_t, c_{t-1}, gate_{t-1}]."""
    torch.manual_seed(0)
    m = linear_method(updates=2, gate_feedback=feedback, weight_init=0.5)
    batch = linear_batch()
    states = [{k: v.detach().numpy() for k, v in s.items()} for s in m.unroll(batch, 2)]

    lstm = {k: v.detach().numpy() for k, v in m.meta.lstm.named_parameters()}
    WF, WI, bF, bI = (t.detach().numpy() for t in (m.meta.WF, m.meta.WI, m.meta.bF, m.meta.bI))
    H = m.meta.lstm.hidden_size
    w0, b0 = m.model.layers[0].weight.item(), m.model.layers[0].bias.item()
    xs, ys = batch.x_support[..., 0].numpy(), batch.y_support[..., 0].numpy()
    T = xs.shape[0]
    c = np.tile([w0, b0], T)          # per task: (w, b), in the order of named_parameters
    h = np.zeros((2 * T, H)); cell = np.zeros((2 * T, H)); fprev = np.zeros(2 * T); iprev = np.zeros(2 * T)
    for t in range(2):
        w, b = c[0::2], c[1::2]
        r = w[:, None] * xs + b[:, None] - ys
        loss = (r ** 2).mean(1)
        grad = np.stack([2 * (r * xs).mean(1), 2 * r.mean(1)], 1).reshape(-1)
        inp = np.concatenate([np_preprocess(np.repeat(loss, 2)), np_preprocess(grad)], 1)
        z = inp @ lstm["weight_ih"].T + lstm["bias_ih"] + h @ lstm["weight_hh"].T + lstm["bias_hh"]
        gi, gf, gg, go = np.split(z, 4, axis=1)
        cell = sig(gf) * cell + sig(gi) * np.tanh(gg)
        h = sig(go) * np.tanh(cell)
        f_logit = h @ WF[:H] + WF[H] * c + WF[H + 1] * fprev + bF          # eq. 3
        i_logit = h @ WI[:H] + WI[H] * c + WI[H + 1] * iprev + bI          # eq. 2
        c = sig(f_logit) * c - sig(i_logit) * grad                           # eq. 1
        fprev, iprev = (sig(f_logit), sig(i_logit)) if feedback == "value" else (f_logit, i_logit)
        np.testing.assert_allclose(states[t + 1]["c"], c, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(states[t + 1]["h"], h, rtol=1e-12, atol=1e-14)
    assert not np.allclose(states[2]["c"], states[0]["c"])


def test_preprocessing_matches_andrychowicz():
    x = torch.tensor([3.0, -2e-3, 1e-6, -1e-5, 0.0], dtype=torch.float64)
    np.testing.assert_allclose(preprocess(x).numpy(), np_preprocess(x.numpy()), rtol=1e-12)
    assert preprocess(torch.tensor([1e-6]))[0, 0] == -1.0  # below e^-10: (-1, e^10 x)


def test_unit_forget_gate_and_constant_input_gate_is_sgd(float64):
    """f = 1 and i = α for every coordinate (zero gate weights, saturated forget bias) turn
    eq. 1 into θ_t = θ_{t-1} - α ∇L_t: exactly metarl.adaptation.adapt with lr α, for every step."""
    torch.manual_seed(1)
    m = linear_method(updates=3)
    m.model = MLP(1, 1, hidden=[8])  # a non-linear learner this time
    m.names = list(params_of(m.model))
    with torch.no_grad():
        m.meta.WF.zero_(); m.meta.WI.zero_()
        m.meta.bF.fill_(40.0)                 # σ(40) == 1.0 in float64
        m.meta.bI.fill_(math.log(0.3 / 0.7))  # σ(bI) = 0.3
    alpha = torch.sigmoid(m.meta.bI).item()
    assert torch.sigmoid(m.meta.bF).item() == 1.0
    batch = linear_batch(n_tasks=3)
    states = list(m.unroll(batch, 3))
    theta = stack(params_of(m.model), 3)
    for k in (1, 2, 3):
        phi = adapt(lambda p: mse(forward_tasks(m.model, p, batch.x_support), batch.y_support).sum(), theta, steps=k, lr=alpha)
        ref = flatten({n: v.detach() for n, v in phi.items()}, m.names).reshape(-1)
        torch.testing.assert_close(states[k]["c"].detach(), ref, rtol=1e-14, atol=1e-15)
    preds = m.predict(batch, 3)
    assert len(preds) == 4 and preds[0].shape == batch.y_query.shape


@pytest.mark.parametrize("updates", [1, 2])
def test_meta_gradient_matches_finite_differences(float64, updates):
    """d query-loss / d (every meta-parameter: LSTM weights, gate weights and biases, θ_0) for a
    one-update (and a two-update) episode, against central differences in which the learner's loss
    and gradient inputs are held at their values on the unperturbed trajectory (the paper's
    simplification, sec. 3.2: they are constants of the meta-learner)."""
    torch.manual_seed(2)
    m = linear_method(updates=updates, weight_init=0.3)
    batch = linear_batch(n_tasks=2)
    inputs = []  # (grad, loss) per update along the unperturbed trajectory
    with torch.no_grad():
        for state in m.unroll(batch, updates - 1):
            grad, loss = m._learner_inputs(state["c"].reshape(2, -1), batch)
            inputs.append((grad.reshape(-1), loss[:, None].expand_as(grad).reshape(-1)))

    def query_loss():
        state = m.meta.initial_state(flatten(stack(params_of(m.model), 2), m.names).reshape(-1))
        for grad, loss in inputs:
            state = m.meta(state, grad, loss)
        return m.problem.loss(m._query(state, batch), batch.y_query).mean()

    # the method's own meta-gradient (train_step's backward, before clipping and the Adam step)
    m.optimizers[m.name].zero_grad(set_to_none=True)
    *_, last = m.unroll(batch, updates)
    m.problem.loss(m._query(last, batch), batch.y_query).mean().backward()
    names = [f"theta0.{n}" for n, _ in m.model.named_parameters()] + [n for n, _ in m.meta.named_parameters()]
    tensors = [*m.model.parameters(), *m.meta.parameters()]
    analytic = [p.grad.clone() for p in tensors]
    eps = 1e-6
    for name, p, g in zip(names, tensors, analytic):
        fd = torch.zeros_like(p)
        for j in range(p.numel()):
            with torch.no_grad():
                old = p.view(-1)[j].item()
                p.view(-1)[j] = old + eps
                up = query_loss().item()
                p.view(-1)[j] = old - eps
                down = query_loss().item()
                p.view(-1)[j] = old
            fd.view(-1)[j] = (up - down) / (2 * eps)
        torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9, msg=name)
        # every meta-parameter receives a gradient, except the first layer's recurrent weights in
        # a one-update episode (they multiply h_0 = 0)
        assert (g.abs().sum() > 0) == (updates > 1 or name != "lstm.weight_hh"), name


def omniglot_overrides(iterations):
    return ["algorithm=meta_lstm", f"iterations={iterations}", "meta_batch=4", "model.hidden=8", "baselines=[]",
            "episode.q_query=2", "meta_lstm.updates=4", "outer.lr=0.005", f"checkpoint_every={iterations}",
            "log_every=10", "eval.steps=4"]


@pytest.mark.slow  # CI budget (15 min on 2 cores): run by `make test-slow` / .ci/slow
def test_short_omniglot_run_clearly_beats_chance(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/omniglot_5w1s.yaml", omniglot_overrides(60))
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 4, seed=11)
    curve = res.curves["meta_lstm"]
    assert curve.shape == (100, 5) and res.curve_axis == "meta-learner (LSTM) updates"
    mean, sd = curve[:, -1].mean(), curve[:, -1].std(ddof=1)
    assert mean - 2 * sd / np.sqrt(100) > 0.2 + 0.15, curve.mean(0)   # far above 20% after 4 updates
    assert curve[:, -1].mean() > curve[:, 0].mean() + 0.1, curve.mean(0)  # and the updates are what helps


def test_resume_is_bitwise_identical(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    sets = lambda n: ["algorithm=meta_lstm", f"iterations={n}", "meta_batch=3", "model.hidden=8", "episode.q_query=1",
                      "meta_lstm.updates=2", "meta_lstm.task_chunk=2", "pretrain.batch_size=8", "checkpoint_every=100"]
    full, _ = resume_round_trip(lambda n: config.load("experiments/omniglot_5w1s.yaml", sets(n)), tmp_path, 6, 3)
    assert set(full.modules) == {"meta_lstm", "meta_lstm.lstm"}  # the pretrain baseline trains after meta-training


def test_metarl_evaluate_writes_the_contract(tmp_path, cache):
    sets = ["iterations=2", "meta_batch=2", "model.hidden=8", "baselines=[]", "episode.q_query=1", "checkpoint_every=2",
            "meta_lstm.updates=2"]
    out = cli_train_and_evaluate("experiments/meta_lstm_omniglot_5w1s.yaml", tmp_path / "run", sets,
                                 ["--tasks", "6", "--steps", "3"], env={"METARL_CACHE": cache})
    assert out["algorithm"] == "meta_lstm" and out["curve_axis"] == "meta-learner (LSTM) updates"
    assert out["steps"] == [0, 1, 2, 3] and set(out["methods"]) == {"meta_lstm"} and out["n_tasks"] == 6
    assert len(out["methods"]["meta_lstm"]["mean"]) == 4
    assert out["step_sizes"]["meta_lstm"]["updates"] == 2


def test_config_errors_name_the_fix():
    with pytest.raises(config.ConfigError, match="meta_lstm: updates"):
        config.from_dict({"track": "sine", "algorithm": "meta_lstm", "meta_lstm": {"updates": 0}})
    with pytest.raises(config.ConfigError, match="forget_bias_init must be \\[low, high\\]"):
        config.from_dict({"track": "sine", "algorithm": "meta_lstm", "meta_lstm": {"forget_bias_init": [5, 4]}})


def test_short_sine_run_beats_the_pretrain_baseline(tmp_path):
    """60 meta-updates (Adam 0.01, a 1-20-20-1 learner, for speed) already give a learned update
    rule whose 10-update fit is clearly better than fine-tuning the pretrain baseline, and each
    update helps (the curve falls from θ_0)."""
    cfg = config.load("experiments/meta_lstm_sine.yaml", ["iterations=60", "meta_batch=10", "checkpoint_every=60",
                                                         "log_every=20", "outer.lr=0.01", "meta_lstm.task_chunk=10",
                                                         "model.hidden=[20,20]"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 10, seed=7)
    ours, pre = res.curves["meta_lstm"].mean(0), res.curves["pretrain"].mean(0)
    assert ours[10] < 0.75 * ours[0] and np.all(np.diff(ours) < 0), ours
    assert ours[10] < 0.85 * pre[10], (ours, pre)


def write_mini_imagenet_fixture(root, per_class=17):
    """MiniImageNet's pickle layout, 5 classes per split of random 84x84 images (enough for 5-way 1-shot, 16 query)."""
    import pickle

    rng = np.random.default_rng(0)
    root.mkdir()
    for s, split in enumerate(("train", "val", "test")):
        images = rng.integers(0, 256, (5 * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{s}{c:02d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(5)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f)


@pytest.mark.slow  # 84x84 images and 75 query images per episode: minutes on a loaded 2-core machine
def test_mini_imagenet_config_runs_on_the_fixture(tmp_path):
    """The paper's MiniImageNet setting (84x84 RGB, Conv4-32 with max-pooling, 15 query per class)
    trains and evaluates end to end; shortened to 2 episodes and 2 updates."""
    data = tmp_path / "mini-imagenet"
    write_mini_imagenet_fixture(data)
    monkey_env = {**os.environ, "METARL_CACHE": str(tmp_path / "cache")}
    rd = tmp_path / "run"
    sets = [a for s in ["iterations=2", "checkpoint_every=2", "meta_lstm.updates=2", "pretrain.batch_size=4",
                        "fewshot_eval.validation_episodes=2", "fewshot_eval.pretrain_lrs=[0.1]"] for a in ("--set", s)]
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/meta_lstm_mini_imagenet_5w1s.yaml",
                        "--run-dir", str(rd), "--data-dir", str(data), *sets], capture_output=True, text=True, timeout=600, env=monkey_env)
    assert p.returncode == 0, p.stderr
    cfg = config.load(rd / "config.yaml")
    assert (cfg.model.hidden, cfg.model.pooling, cfg.episode.q_query, cfg.meta_batch) == (32, "max", 15, 1)
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--tasks", "2", "--steps", "2",
                        "--data-dir", str(data)], capture_output=True, text=True, timeout=600, env=monkey_env)
    assert p.returncode == 0, p.stderr
    out = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert out["algorithm"] == "meta_lstm" and set(out["methods"]) == {"meta_lstm", "pretrain"} and out["steps"] == [0, 1, 2]
