"""Conv4: the four-block convolutional network of few-shot image classification, with a fast,
exact per-task forward for MAML meta-batches.

Architecture (Vinyals et al. 2016; Finn et al. 2017 sec. 5.2): four blocks of
3×3 convolution (padding 1) → batch norm → ReLU → downsampling, then flatten and a linear head to
``n_way`` logits. Downsampling is a stride-2 convolution for Omniglot (``pooling="stride"``, 64
filters, as in Finn et al.'s code: 28 → 14 → 7 → 4 → 2) or 2×2 max pooling for MiniImageNet
(``pooling="max"``, 32 filters: 84 → 42 → 21 → 10 → 5). Parameter names are stable::

    blocks.{0..3}.conv.weight, blocks.{i}.conv.bias, blocks.{i}.norm.weight, blocks.{i}.norm.bias,
    head.weight, head.bias

Batch norm is *transductive*: it always normalises with the statistics of the batch it is given
(``track_running_stats=False``, so there are no running buffers and train/eval modes compute the
same thing), with a learnable affine scale and shift. This is what Finn et al. 2017's code does
(TensorFlow ``batch_norm`` left in training mode at meta-test time too), what later MAML
reimplementations copy, and what the reported few-shot accuracies assume: a task's support set
and, separately, its query set are normalised with their own statistics. Running averages would
mix statistics across tasks that share nothing, and would make the inner loop's forward depend on
meta-training history. Consequence worth knowing: each conv bias is followed by a mean
subtraction, so it cancels exactly and its (meta-)gradient is zero; it is kept so the parameter set
matches the reference code (tests/test_conv_meta_gradient.py checks the zero). Differences from
Finn et al.'s TensorFlow code: their Omniglot head averages the final 2×2 map instead of
flattening it, their batch norm has a shift but no scale and ε = 1e-3 (here: scale and shift,
PyTorch's ε = 1e-5), and their batch-norm variables are not adapted in the inner loop (here every
parameter is, unless ``only=`` says otherwise).

Per-task forward (``forward_tasks``), how and why
-------------------------------------------------
The MAML engine adapts a whole meta-batch at once: every parameter is stacked with a leading task
axis [T, ...] and ``forward_tasks(params, x)`` must run x [T, N, C, H, W] → logits [T, N, n_way],
each task through its own weights, with exact second-order gradients. What shaped it:

* No ``vmap``. ``vmap`` over tasks of ``torch.func.grad`` through batch norm gives a wrong
  meta-gradient on torch 2.13 (float64: conv biases get ~6e-3 instead of 0, 2e-3..5e-3 relative
  error overall; batch norm's backward batching rule, pytorch/functorch#534; an xfail test in
  tests/test_conv_meta_gradient.py records it). The engine's own fallback (``vmap`` over the
  forward only, ordinary autograd outside) was exact in every case tried, but is 2x slower than
  a per-task loop at Q=15.
* Not one huge batch either. At 15 query images per class one layer's activations for 32 tasks are
  ~120 MB, so batch norm and ReLU (memory-bound) stream from DRAM while a per-task loop works in
  cache: batching all 32 tasks was slower than the loop at Q=15.

So, per chunk of c tasks:

1. tasks become convolution groups: the input is laid out [N, c·C, H, W] and the c tasks' weights
   [c·out, C, 3, 3] run as ONE grouped convolution (``groups=c``; c=1 is a plain convolution), in
   channels-last memory format (oneDNN: 2x faster than NCHW for groups=32 at N=75);
2. in channels-last memory the activation *is* a matrix [N·H·W, c·out] (a free view), and
   per-task batch norm is ordinary 2-D ``F.batch_norm`` on that matrix: each column is one
   (task, channel) reduced over (N, H, W), exactly that task's statistics; the native kernel's
   double backward is exact without vmap (it beat batch norm written by hand: 0.31 vs 0.34 s at
   Q=1, 1.07 vs 1.35 s at Q=15);
3. chunks are split/concatenated with ``torch.split``/``torch.cat`` (one backward node each).
   ``task_chunk=None`` (default) picks about ``images_per_chunk=64`` images per chunk: 11 tasks
   for 5 support images, 1 task for 75 query images (measured optima: Q=1 support+query chunk 8:
   0.266 s, 4: 0.278, 16: 0.278, 32: 0.342, loop 0.376; Q=15 chunk 1: 0.93, 2: 0.86, 4: 0.91,
   8: 0.91, loop 1.04).

Measured (AMD EPYC, 1 thread, torch 2.13 CPU, seconds per meta-iteration: 5-way 1-shot,
meta-batch 32, 1 inner step, second order, full backward to θ; medians of interleaved repeats on a
shared, noisy machine, so ranges are across runs). Prototypes of the same math, explored first:

=========================================  =========  =========
variant                                    Q=1        Q=15
=========================================  =========  =========
per-task loop (reference)                  0.38-0.42  1.08-1.15
vmap over functional_call                  0.32-0.43  2.6-2.8
grouped conv, NCHW, all 32 tasks           0.30-0.46  1.6-1.8
grouped conv, channels-last, all 32 tasks  0.40       1.34
  same, chunks of 4-8 tasks                0.31-0.33  0.89-0.90
im2col (``unfold`` + ``bmm``)              0.40-0.59  4.1-6.9
=========================================  =========  =========

Two fixes measured later (2026-11, idle machine, ``benchmarks/omniglot_speed.py --no-memory
--variants engine,loop``, medians of 9 interleaved repeats): (1) with one task per chunk (Q=15:
75 query images) the input has one channel, for which ``.contiguous(memory_format=channels_last)``
keeps NCHW strides; oneDNN then computed the first layer in NCHW and every query forward paid
two full-activation copies (16% of the profile). The input is now written into channels-last
memory explicitly. (2) The conv bias is left out of the convolution (batch norm cancels it) and
joins the logits as 0·b. Result, loop/engine:

===================  ===========  ===================================
threads              Q=1          Q=15
===================  ===========  ===================================
2 (the default run)  1.57-2.09x   1.43-1.60x (median of 9 runs 1.53x)
1                    1.53x        1.29x
===================  ===========  ===================================

Before the two fixes the same command gave 1.83-1.85x / 1.47-1.50x on 2 threads. The earlier
single-thread tables above and below are kept for the record of what was tried. Training now also
cuts the meta-batch across task-worker threads, each calling ``forward_tasks`` on its own shard
with one torch thread (``metarl.algorithms.maml.meta_backward``): 1.9-2.8x / 1.79-2.14x
(experiments/RESULTS.md, session 6).

Earlier final table (single thread, 7 repeats; peak RSS growth over two iterations):

===========================  ================================  ================================
variant                      Q=1: s, loop/variant, peak RSS    Q=15: s, loop/variant, peak RSS
===========================  ================================  ================================
engine (this forward_tasks)  0.28-0.29, 1.40-1.49x, +211 MB    0.84-0.94, 1.20-1.26x, +555 MB
per-task loop                0.40-0.42, 1x, +112 MB            1.06-1.13, 1x, +493 MB
engine with vmap fallback    0.33-0.38, 1.10-1.21x, +290 MB    1.79-2.37, 0.47-0.59x, +1132 MB
vmap(grad): wrong gradient   0.29-0.35, 1.20-1.37x, +387 MB    1.76-2.59, 0.44-0.60x, +1268 MB
===========================  ================================  ================================

At Q=15 the convolutions are most of the loop's time and both paths do the same convolution
FLOPs; what is left is memory-bound elementwise work that both do. The allocator matters on a
loaded machine: glibc hands the engine's large freed tensors back to the OS and page-faults them
in again every iteration; the benchmark's ``--tune-malloc`` (keep freed memory) cut its system
time from 28 s to 16 s. ``torch.compile`` was rejected: compiling a one-layer conv+BN
function took 31 s and its double backward raises "torch.compile with aot_autograd does not
currently support double backward". Two threads on a loaded 2-core machine slow every
variant 5-30x (oversubscription); on an idle one they help, as the first table shows.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLINGS = ("stride", "max")
Film = Mapping[int, tuple[Tensor, Tensor]]  # block index -> per-task (gamma, beta), each [T, hidden]


class ConvBlock(nn.Module):
    """3×3 conv (padding 1) → transductive batch norm → ReLU → stride-2 conv or 2×2 max pool."""

    def __init__(self, in_channels: int, out_channels: int, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2 if pooling == "stride" else 1, padding=1)
        # batch statistics always, learnable affine (see the module docstring for why)
        self.norm = nn.BatchNorm2d(out_channels, affine=True, track_running_stats=False)
        nn.init.xavier_uniform_(self.conv.weight)  # Finn et al.'s code: Xavier conv weights, zero biases
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pooling == "max" else x


def _downsampled(size: int, pooling: str) -> int:
    return (size - 1) // 2 + 1 if pooling == "stride" else size // 2


class Conv4(nn.Module):
    """Four conv blocks and a linear head (Vinyals et al. 2016; Finn et al. 2017).

    Omniglot (Finn et al.): ``Conv4(1, n_way, hidden=64, image_size=28, pooling="stride")``.
    MiniImageNet (Finn et al.): ``Conv4(3, n_way, hidden=32, image_size=84, pooling="max")``.
    ``forward`` takes one task's images [N, C, H, W]; ``forward_tasks`` a meta-batch with stacked
    per-task weights (used by :func:`metarl.functional.forward_tasks`). ``task_chunk`` (attribute,
    default None: about ``images_per_chunk`` images per chunk) is how many tasks share one grouped
    convolution; it changes speed and memory, not results.
    """

    def __init__(self, in_channels: int = 1, n_way: int = 5, hidden: int = 64, image_size: int = 28,
                 pooling: str = "stride"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}': choose one of {POOLINGS} (Omniglot: 'stride', MiniImageNet: 'max')")
        if min(in_channels, n_way, hidden) < 1:
            raise ValueError(f"in_channels, n_way and hidden must be >= 1 (got {in_channels}, {n_way}, {hidden})")
        size = image_size
        for _ in range(4):
            size = _downsampled(size, pooling)
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four '{pooling}' downsamplings: use at least 16 pixels")
        self.in_channels, self.n_way, self.hidden, self.image_size, self.pooling = in_channels, n_way, hidden, image_size, pooling
        self.feature_size = size  # side of the last feature map
        self.task_chunk: int | None = None  # tasks per grouped convolution; None: chosen from the batch size
        self.images_per_chunk = 64  # the automatic choice's target (measured optimum; see the module docstring)
        self.blocks = nn.ModuleList(ConvBlock(in_channels if i == 0 else hidden, hidden, pooling) for i in range(4))
        self.head = nn.Linear(hidden * size * size, n_way)

    def _check_input(self, x: Tensor, leading: int):
        want = leading + 3
        if x.dim() != want or x.shape[-3] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            axes = "[T, N, C, H, W]" if leading == 2 else "[N, C, H, W]"
            raise ValueError(f"Conv4 expects images {axes} with C={self.in_channels}, H=W={self.image_size}; got {tuple(x.shape)} "
                             f"(add a channel axis with x.unsqueeze({leading}) or build Conv4 with matching in_channels/image_size)")

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, n_way] for images [N, C, H, W] (batch-norm statistics from these N images)."""
        return self.head(self.features(x))

    def features(self, x: Tensor) -> Tensor:
        """Embeddings [N, feature_dim] of one task's images (before the head)."""
        self._check_input(x, 1)
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)

    def forward_tasks(self, params: Mapping[str, Tensor], x: Tensor, film: Optional[Film] = None) -> Tensor:
        """Logits [T, N, n_way] for x [T, N, C, H, W], task t through its own weights ``params[k][t]``.

        ``params`` holds every parameter name with a leading task axis (``metarl.functional.stack``).
        Each task's batch-norm statistics come from its own N images, exactly as ``forward`` per task.
        ``film`` (optional, default off): per-task FiLM conditioning ``{block: (gamma, beta)}``, each
        [T, hidden]; block i's batch-norm output becomes gamma·h + beta before its ReLU (Perez et al.
        2018; CAVIA's conditioned conv net, Zintgraf et al. 2019 sec. 5.2: ``policies/context.py``).
        """
        return self._per_task(params, x, head=True, film=film)

    def features_tasks(self, params: Mapping[str, Tensor], x: Tensor, film: Optional[Film] = None) -> Tensor:
        """Embeddings [T, N, feature_dim] (the flattened last feature map, before the head) for
        x [T, N, C, H, W]: what metric and closed-form heads (prototypes, R2-D2, MetaOptNet) and
        black-box learners work on. ``params`` need not hold the head's tensors. ``film`` as in
        :meth:`forward_tasks`."""
        return self._per_task(params, x, head=False, film=film)

    @property
    def feature_dim(self) -> int:
        return self.hidden * self.feature_size * self.feature_size

    def _per_task(self, params: Mapping[str, Tensor], x: Tensor, head: bool, film: Optional[Film] = None) -> Tensor:
        self._check_input(x, 2)
        n_tasks = x.shape[0]
        own = dict(self.named_parameters())
        names = [n for n in own if head or not n.startswith("head.")]
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"forward_tasks: no tensor for parameters {missing}; pass every parameter, stacked with metarl.functional.stack(params, T)")
        for n in names:
            p = params[n]
            if p.dim() != own[n].dim() + 1 or p.shape[0] != n_tasks:
                raise ValueError(f"forward_tasks: '{n}' has shape {tuple(p.shape)}, expected a leading task axis of {n_tasks}: "
                                 f"stack θ with metarl.functional.stack(params, {n_tasks})")
        for i, gb in (film or {}).items():
            if not 0 <= i < len(self.blocks) or any(t.shape != (n_tasks, self.hidden) for t in gb):
                raise ValueError(f"forward_tasks: film[{i}] must be (gamma, beta), each [{n_tasks}, {self.hidden}], for a block "
                                 f"0..{len(self.blocks) - 1}; got {[tuple(t.shape) for t in gb]}")
        chunk = self._chunk_size(n_tasks, x.shape[1])
        if chunk >= n_tasks:
            return self._forward_group({n: params[n] for n in names}, x, head, film)
        pieces = {n: torch.split(params[n], chunk) for n in names}
        film_pieces = {i: (torch.split(g, chunk), torch.split(b, chunk)) for i, (g, b) in (film or {}).items()}
        xs = torch.split(x, chunk)
        return torch.cat([self._forward_group({n: pieces[n][j] for n in names}, xj, head,
                                              {i: (g[j], b[j]) for i, (g, b) in film_pieces.items()} or None)
                          for j, xj in enumerate(xs)])

    def _chunk_size(self, n_tasks: int, n_images: int) -> int:
        """Tasks per grouped convolution: ``task_chunk`` if set, else about ``images_per_chunk``
        images per chunk, with the meta-batch split into equal chunks."""
        if self.task_chunk is not None:
            return max(1, int(self.task_chunk))
        target = max(1, round(self.images_per_chunk / max(1, n_images)))
        n_chunks = -(-n_tasks // target)
        return -(-n_tasks // n_chunks)

    def _forward_group(self, params: Mapping[str, Tensor], x: Tensor, head: bool = True, film: Optional[Film] = None) -> Tensor:
        """c tasks at once: tasks are convolution groups, activations channels-last, so that
        [N, H, W, c·out] memory is a matrix whose columns are (task, channel) pairs."""
        c, n = x.shape[:2]
        # [N, H, W, c·C] memory seen as [N, c·C, H, W]: channels-last strides by construction. (With
        # c·C = 1, .contiguous(memory_format=channels_last) and reshapes keep NCHW strides, oneDNN
        # then answers in NCHW and every layer pays two full copies: 16% of a Q=15 meta-iteration.)
        size = self.image_size
        h = x.new_empty(n, size, size, c * self.in_channels).permute(0, 3, 1, 2)
        h.copy_(x.transpose(0, 1).reshape(n, c * self.in_channels, size, size))
        for i, block in enumerate(self.blocks):
            w = params[f"blocks.{i}.conv.weight"]  # [c, out, in, 3, 3]: task t's filters become group t
            # no conv bias here: batch norm subtracts each channel's batch mean right after, which
            # cancels it exactly; adding it costs an elementwise pass and a backward reduction per
            # layer for nothing (~5% of a Q=15 meta-iteration). It joins the logits as 0·b below.
            y = F.conv2d(h, w.reshape(c * self.hidden, *w.shape[2:]), None, stride=block.conv.stride, padding=1, groups=c)
            hh, ww = y.shape[-2:]
            m = y.permute(0, 2, 3, 1).reshape(n * hh * ww, c * self.hidden)  # a view when y is channels-last
            m = F.batch_norm(m, None, None, params[f"blocks.{i}.norm.weight"].reshape(-1),
                             params[f"blocks.{i}.norm.bias"].reshape(-1), training=True, eps=block.norm.eps)
            if film is not None and i in film:  # columns are (task, channel) pairs, as gamma/beta [c, out] flattened
                gamma, beta = film[i]
                m = torch.addcmul(beta.reshape(-1), m, gamma.reshape(-1))
            h = F.relu(m, inplace=True).reshape(n, hh, ww, c * self.hidden).permute(0, 3, 1, 2)  # BN's backward keeps its input, not its output
            if self.pooling == "max":
                h = F.max_pool2d(h, 2)
        # per task, flatten in forward's order (channel, row, column)
        feats = h.reshape(n, c, -1).transpose(0, 1)  # [c, N, out·s·s]
        # the conv biases' exact (zero) contribution, so that they stay in the graph and
        # autograd returns their gradient as zeros, as for forward, rather than "unused"
        cancelled = sum(params[f"blocks.{i}.conv.bias"].sum(-1) for i in range(len(self.blocks)))
        if not head:
            return feats + (0.0 * cancelled)[:, None, None]
        logits = torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2))
        return logits + (0.0 * cancelled)[:, None, None]
