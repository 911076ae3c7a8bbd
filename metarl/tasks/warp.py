"""Affine warps of images for out-of-distribution evaluation (Finn & Levine 2018, "Meta-Learning
and Universality", sec. 7: test episodes whose Omniglot digits are sheared or scaled, support and
query alike, to compare how gradient-based and black-box learners degrade under task shift).

Coordinates are ``affine_grid``'s normalised ones with ``align_corners=False``: the image spans
[−1, 1] in x (columns, left → right) and y (rows, top → bottom), the origin at its centre; pixel
(row r, column c) of an H × W image has its centre at x = (2c + 1)/W − 1, y = (2r + 1)/H − 1.

- ``shear`` s: the content at (x, y) moves to (x + s·y, y): rows below the centre slide right,
  rows above slide left (s = 0: the identity);
- ``scale`` s: the content at (x, y) moves to (s·x, s·y): s > 1 enlarges the digit about the
  centre, s < 1 shrinks it (s = 1: the identity).

Resampling is bilinear with zero padding: what leaves the frame is lost, what enters is 0, which
is Omniglot's background here (the loader inverts the scans: ink 1, background 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import TaskBatch

KINDS = ("shear", "scale")


def forward_matrix(kind: str, value: float) -> Tensor:
    """The 2×2 map A taking a content point p to its warped place A·p (normalised coordinates)."""
    if kind == "shear":
        return torch.tensor([[1.0, float(value)], [0.0, 1.0]], dtype=torch.float64)
    if kind == "scale":
        if value <= 0:
            raise ValueError(f"scale factor must be > 0, got {value}")
        return torch.tensor([[float(value), 0.0], [0.0, float(value)]], dtype=torch.float64)
    raise ValueError(f"unknown warp '{kind}': choose one of {KINDS}")


def warp_images(x: Tensor, kind: str, value: float) -> Tensor:
    """Warp images x [..., C, H, W] by ``kind`` with factor ``value`` (see the module docstring)."""
    a_inv = torch.linalg.inv(forward_matrix(kind, value))  # grid_sample pulls: output point → source point
    if torch.equal(a_inv, torch.eye(2, dtype=torch.float64)):
        return x.clone()
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    theta = torch.cat([a_inv, torch.zeros(2, 1, dtype=torch.float64)], dim=1).to(x.dtype).expand(flat.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(*lead, c, h, w)


def warp_batch(batch: TaskBatch, kind: str, value: float) -> TaskBatch:
    """The same episodes with support and query images warped alike (labels unchanged)."""
    return TaskBatch(warp_images(batch.x_support, kind, value), batch.y_support,
                     warp_images(batch.x_query, kind, value), batch.y_query, info=batch.info)
