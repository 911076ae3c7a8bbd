"""Per-image embedding for black-box meta-learners (SNAIL, MANN): one image in, one vector out.

Architecture (Mishra et al. 2018, appendix, Omniglot; the embedding of Vinyals et al. 2016): four
blocks of 3×3 convolution (padding 1) → normalisation → ReLU → 2×2 max pooling (28 → 14 → 7 → 3
→ 1), flattened, then one linear layer to ``out_dim`` (64 in the paper).

Normalisation is batch norm with running statistics, as in the paper: batch statistics while
meta-training (over every image of the meta-batch), the running averages in ``eval()`` mode, which
black-box methods use for every prediction at evaluation (``metarl.algorithms.blackbox``). So at
evaluation each image is embedded on its own and a query's prediction depends only on the
sequence it is shown (the causality tests check this); unlike ``policies/conv4.py``, whose
transductive batch norm is part of MAML's protocol. Per-image normalisation (``GroupNorm(1, C)``)
was tried first and kept the learner at chance for hundreds of iterations on Omniglot: at
initialisation it maps different characters to nearly the same vector, while batch norm's
centring across images makes them distinct from the start (the attention stack alone, on
distinct inputs, learns the matching in ~100 Adam steps).

``centre=True`` adds one more batch norm on the output vector (``BatchNorm1d(out_dim)``, running
statistics in ``eval()`` as above), so embeddings are centred and of unit scale per feature
across the meta-batch. MANN needs it (``mann.centre_embedding``): its memory is addressed by the
cosine between keys computed from these vectors, and the raw embeddings of different characters
share a large common offset, so their keys point in nearly one direction and the read cannot pick
out the matching slot (at initialisation, 160 Omniglot characters: mean pairwise cosine 0.73
between raw embeddings and 0.91 between their keys; centred, −0.01 and 0.45).
SNAIL's attention (dot products, then a softmax with learned projections) does not need it.
"""
from __future__ import annotations

from torch import Tensor, nn


class ImageEmbedding(nn.Module):
    """x [..., C, H, W] → [..., out_dim]; in ``eval()`` mode each image on its own (running statistics)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, hidden: int = 64, out_dim: int = 64,
                 centre: bool = False):
        super().__init__()
        if min(in_channels, image_size, hidden, out_dim) < 1:
            raise ValueError(f"ImageEmbedding: in_channels, image_size, hidden, out_dim must be >= 1, got "
                             f"{in_channels}, {image_size}, {hidden}, {out_dim}")
        self.in_channels, self.image_size = in_channels, image_size
        layers, c, size = [], in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
            c, size = hidden, size // 2
        if size < 1:
            raise ValueError(f"ImageEmbedding: image_size {image_size} is too small for four 2x2 poolings (use >= 16)")
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden * size * size, out_dim)
        self.centre = nn.BatchNorm1d(out_dim) if centre else None
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        if tuple(x.shape[-3:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ImageEmbedding expects images [..., {self.in_channels}, {self.image_size}, {self.image_size}], "
                             f"got {tuple(x.shape)}")
        h = self.body(x.reshape(-1, *x.shape[-3:]))
        e = self.out(h.flatten(1))
        if self.centre is not None:
            e = self.centre(e)
        return e.reshape(*lead, self.out_dim)
