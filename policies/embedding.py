"""Per-image embedding for black-box meta-learners (SNAIL, MANN): one image in, one vector out.

Architecture (Mishra et al. 2018, appendix, Omniglot; the embedding of Vinyals et al. 2016): four
blocks of 3×3 convolution (padding 1) → normalisation → ReLU → 2×2 max pooling (28 → 14 → 7 → 3
→ 1), flattened, then one linear layer to ``out_dim`` (64 in the paper).

One deliberate difference from the paper's batch norm: normalisation is *per image*
(``GroupNorm(1, C)``, i.e. layer norm over channels and pixels). A black-box learner's claim is
that its prediction for a query depends only on the sequence it is shown; with batch statistics
an image's embedding would depend on every other image in the batch (other queries, other
episodes, support examples "not yet seen"), which breaks causality and makes the "support
examples seen" curve meaningless. Unlike ``policies/conv4.py`` (whose transductive batch norm is
part of MAML's protocol), nothing here mixes images.
"""
from __future__ import annotations

from torch import Tensor, nn


class ImageEmbedding(nn.Module):
    """x [..., C, H, W] → [..., out_dim], each image on its own (no statistics across images)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, hidden: int = 64, out_dim: int = 64):
        super().__init__()
        if min(in_channels, image_size, hidden, out_dim) < 1:
            raise ValueError(f"ImageEmbedding: in_channels, image_size, hidden, out_dim must be >= 1, got "
                             f"{in_channels}, {image_size}, {hidden}, {out_dim}")
        self.in_channels, self.image_size = in_channels, image_size
        layers, c, size = [], in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.GroupNorm(1, hidden), nn.ReLU(), nn.MaxPool2d(2)]
            c, size = hidden, size // 2
        if size < 1:
            raise ValueError(f"ImageEmbedding: image_size {image_size} is too small for four 2x2 poolings (use >= 16)")
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden * size * size, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        if tuple(x.shape[-3:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ImageEmbedding expects images [..., {self.in_channels}, {self.image_size}, {self.image_size}], "
                             f"got {tuple(x.shape)}")
        h = self.body(x.reshape(-1, *x.shape[-3:]))
        return self.out(h.flatten(1)).reshape(*lead, self.out_dim)
