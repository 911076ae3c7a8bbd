"""SNAIL (Mishra et al. 2018) against hand computations: causal attention and dense blocks by
explicit loops, causality of the whole learner (no position sees a later one, no query sees another),
the shot-major support curve, learning on Omniglot, bitwise resume and the `metarl evaluate` contract."""

import numpy as np
import pytest
import torch

from tests.checks import resume_round_trip, cli_train_and_evaluate
from metarl import config
from metarl.algorithms.blackbox import shot_major_order, take
from metarl.algorithms.snail import AttentionBlock, DenseBlock, SNAILNet, TCBlock
from metarl.policies.embedding import ImageEmbedding
from metarl.training import load_track, train

TINY = ["algorithm=snail", "snail.hidden=8", "snail.embedding=16", "snail.key_sizes=[8,16]", "snail.value_sizes=[8,16]",
        "snail.tc_filters=16", "baselines=[]"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_attention_matches_a_hand_computation(float64):
    torch.manual_seed(0)
    block = AttentionBlock(3, key_size=2, value_size=2)
    x = torch.randn(2, 4, 3)
    out = block(x)
    q, k, v = block.query(x), block.key(x), block.value(x)
    for b in range(2):
        for t in range(4):
            scores = torch.stack([q[b, t] @ k[b, j] / np.sqrt(2) for j in range(t + 1)])
            p = torch.exp(scores - scores.max())
            p = p / p.sum()
            read = sum(p[j] * v[b, j] for j in range(t + 1))
            assert torch.allclose(out[b, t, 3:], read, atol=1e-12), (b, t)
            assert torch.equal(out[b, t, :3], x[b, t])  # the block concatenates its input


def test_dense_block_matches_a_hand_computation(float64):
    torch.manual_seed(1)
    block = DenseBlock(3, dilation=2, filters=2)
    x = torch.randn(1, 5, 3)
    out = block(x)
    w, bias = block.conv.weight, block.conv.bias  # [2F, C, 2]: tap 0 reads t - dilation, tap 1 reads t
    for t in range(5):
        past = x[0, t - 2] if t >= 2 else torch.zeros(3)
        z = w[:, :, 0] @ past + w[:, :, 1] @ x[0, t] + bias
        want = torch.tanh(z[:2]) * torch.sigmoid(z[2:])
        assert torch.allclose(out[0, t, 3:], want, atol=1e-12), t


def test_tc_block_dilations_cover_the_sequence():
    tc = TCBlock(4, seq_len=6, filters=3)
    assert [b.dilation for b in tc.blocks] == [2, 4, 8] and tc.out_channels == 4 + 3 * 3
    assert [b.dilation for b in TCBlock(4, seq_len=21, filters=3).blocks] == [2, 4, 8, 16, 32]


def tiny_net(n_way=3, k=2):
    torch.manual_seed(0)
    emb = ImageEmbedding(1, 16, hidden=4, out_dim=6)
    return SNAILNet(n_way, n_way * k + 1, emb, [4, 8], [3, 5], 4).eval()  # evaluation mode: running batch-norm statistics


def test_snail_is_causal(float64):
    """Changing a later element of the sequence never changes an earlier output; changing one
    query never changes another query's logits; changing a support example does change them."""
    net = tiny_net()
    tokens = torch.randn(2, 7, 6 + 3)
    out = net.sequence(tokens)
    for t in range(6):
        later = tokens.clone()
        later[:, t + 1:] = torch.randn_like(later[:, t + 1:])
        assert torch.allclose(net.sequence(later)[:, :t + 1], out[:, :t + 1], atol=1e-12, rtol=0), t
        assert not torch.allclose(net.sequence(later)[:, t + 1:], out[:, t + 1:])
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.rand(2, 6, 1, 16, 16, generator=g), torch.rand(2, 4, 1, 16, 16, generator=g)
    ys = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    logits, _ = net(xs, ys, xq)
    other = xq.clone()
    other[:, 1:] = torch.rand_like(other[:, 1:])
    assert torch.allclose(net(xs, ys, other)[0][:, 0], logits[:, 0], atol=1e-12, rtol=0)
    support = xs.clone()
    support[:, 0] = torch.rand_like(support[:, 0])
    assert not torch.allclose(net(support, ys, xq)[0], logits)


def per_query_logits(net, xs, ys, xq):
    """The definition the forward reformulates: every query its own sequence (the S support
    tokens, then that query's), all Q·T sequences through the stack; logits at the last position."""
    support, queries = net.tokens(xs, ys, xq)
    t, s, q = xs.shape[0], xs.shape[1], xq.shape[1]
    seq = torch.cat([support.unsqueeze(1).expand(t, q, s, support.shape[-1]), queries.unsqueeze(2)], dim=2)
    return net.sequence(seq.reshape(t * q, s + 1, -1))[:, -1].reshape(t, q, -1)


@pytest.mark.parametrize("n_way,k,s,q", [(3, 2, 6, 4),   # S below the widest dilation (8): zero padding there
                                         (2, 1, 2, 3),   # S = the first dilation
                                         (3, 2, 0, 2),   # empty prefix (predict's stage 0)
                                         (4, 3, 12, 1),  # one query; dilations 2..16
                                         (3, 2, 3, 5)])  # a shot-major prefix shorter than the episode
def test_shared_prefix_equals_per_query_sequences(float64, n_way, k, s, q):
    """The forward (the support prefix once, then each query's last position) equals the Q full
    sequences run through the stack: logits, and gradients w.r.t. every parameter and both image
    sets, in training (batch statistics) and evaluation mode."""
    torch.manual_seed(0)
    emb = ImageEmbedding(1, 16, hidden=4, out_dim=6)
    net = SNAILNet(n_way, n_way * k + 1, emb, [4, 8], [3, 5], 4)
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.rand(2, s, 1, 16, 16, generator=g), torch.rand(2, q, 1, 16, 16, generator=g)
    ys = torch.randint(n_way, (2, s), generator=g)
    w = torch.randn(2, q, n_way, generator=g)  # a random linear functional of the logits: distinct gradients per output
    params = list(net.parameters())
    for train in (True, False):
        net.train(train)
        grads = []
        for f in (lambda *a: net(*a)[0], lambda *a: per_query_logits(net, *a)):
            a, b = xs.clone().requires_grad_(), xq.clone().requires_grad_()
            logits = f(a, ys, b)
            grads.append((logits, *torch.autograd.grad((logits * w).sum(), params + [a, b])))
        assert grads[0][0].shape == (2, q, n_way)
        for name, new, ref in zip(["logits"] + [n for n, _ in net.named_parameters()] + ["x_support", "x_query"], *grads):
            assert torch.allclose(new, ref, atol=1e-12, rtol=1e-10), (train, name)
        assert grads[0][0].abs().max() > 0 and grads[0][-2].numel() == 2 * s * 256


def test_shot_major_order_reveals_whole_shots():
    y = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    order = shot_major_order(y, 3)
    assert take(y, order).tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]]
    assert order[0].tolist() == [0, 2, 4, 1, 3, 5]


def omniglot(extra):
    return config.load("experiments/snail_omniglot_5w1s.yaml", TINY + extra)


def test_predict_curve_is_over_support_examples_seen(monkeypatch, cache):
    """predict(batch, steps) gives min(steps, K) + 1 stages; stage 0 is the query alone, the last
    the whole support set in shot-major order."""
    monkeypatch.setenv("METARL_CACHE", cache)
    from metarl.registry import build_track
    track = build_track(omniglot(["episode.k_shot=2", "episode.q_query=1"]))
    m = track.method
    assert m.curve_axis == "support examples per class seen"
    batch = track.train_tasks.sample(2, np.random.default_rng(0))
    preds = m.predict(batch, 20)
    assert len(preds) == 3 and len(m.predict(batch, 1)) == 2
    assert m.model.training  # predict evaluates in eval mode (running batch-norm statistics) and restores the mode
    m.model.eval()
    empty = batch.x_support[:, :0]
    assert torch.allclose(preds[0], m.model(empty, batch.y_support[:, :0], batch.x_query)[0])
    order = shot_major_order(batch.y_support, 5)
    full = m.model(take(batch.x_support, order), take(batch.y_support, order), batch.x_query)[0]
    assert torch.allclose(preds[2], full)


@pytest.mark.slow
def test_short_omniglot_run_beats_chance(tmp_path, monkeypatch, cache):
    """400 iterations of 8 episodes (about 3 minutes on a loaded 2-core machine, hence slow): black
    boxes sit at chance while the embedding and the label binding form (SNAIL, tiny settings, left
    the plateau after ~200-250 iterations: 45% training accuracy at 300)."""
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = omniglot(["iterations=400", "meta_batch=8", "checkpoint_every=400", "log_every=50", "snail.lr=0.003"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 1, seed=11)
    acc = res.curves["snail"]
    assert acc.shape == (100, 2)
    mean, se = acc[:, 1].mean(), acc[:, 1].std(ddof=1) / np.sqrt(100)
    assert mean - 2 * se > 0.2 + 0.1, acc.mean(0)           # well above 5-way chance with the support set
    assert acc[:, 0].mean() < 0.2 + 0.1                     # the query alone carries no label information


def test_resume_is_bitwise_identical(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    extra = ["meta_batch=2", "checkpoint_every=100", "log_every=2"]
    resume_round_trip(lambda n: omniglot(extra + [f"iterations={n}"]), tmp_path, 4, 2)


def test_evaluate_writes_the_contract(tmp_path, cache):
    rd = tmp_path / "run"
    out = cli_train_and_evaluate("experiments/snail_omniglot_5w1s.yaml", rd, TINY + ["iterations=2", "meta_batch=2", "checkpoint_every=2"],
                                 ["--tasks", "6"], env={"METARL_CACHE": cache})
    assert out["algorithm"] == "snail" and "snail" in out["methods"] and out["steps"] == [0, 1]
    assert out["curve_axis"] == "support examples per class seen" and len(out["methods"]["snail"]["mean"]) == 2
    assert (rd / "eval" / "adaptation.png").exists()


def test_sine_is_refused_with_a_one_line_fix():
    from metarl.config import ConfigError
    from metarl.registry import build_track
    for alg in ("snail", "mann"):
        with pytest.raises(ConfigError, match="use track fewshot"):
            build_track(config.load("experiments/sine.yaml", [f"algorithm={alg}"]))
