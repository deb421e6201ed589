"""Training-only supervision of the image features, not part of the checkpoint. A ViT learns shapes from scratch
slowly, and answers alone teach it hardly at all (few answer tokens depend on what a shape looks like): trained
so, the tower passed on colors but no shapes. Two heads give it a direct signal: PatchHead labels every patch
token with the shape and color covering it; SceneHead reads the perceiver's latents and says what the scene
holds and where."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idefics.demo.scenes import COLORS, SHAPES, Scene

# One 4-way question per head: how many of each shape, of each color, of each colored shape (0..3); and for
# each shape seen once, where it is across and down (left / middle / right) and its size; 0 means absent.
PAIRS = [(c, k) for c in COLORS for k in SHAPES]
HEADS = len(SHAPES) + len(COLORS) + len(PAIRS) + 3 * len(SHAPES)
IGNORE = -100


def _third(v: float) -> int:
    return 1 if v < 0.4 else 3 if v > 0.6 else 2


def labels(scene: Scene) -> list[int]:
    kinds = [sum(s.kind == k for s in scene.shapes) for k in SHAPES]
    out = kinds + [sum(s.color == c for s in scene.shapes) for c in COLORS]
    out += [sum(s.color == c and s.kind == k for s in scene.shapes) for c, k in PAIRS]
    for k, n in zip(SHAPES, kinds):
        s = next((s for s in scene.shapes if s.kind == k), None)
        if n == 0:
            out += [0, 0, 0]
        elif n == 1:
            out += [_third(s.x), _third(s.y), 2 if s.large else 1]
        else:
            out += [IGNORE] * 3
    return out


def patch_labels(scene: Scene, grid: int) -> list[int]:
    """Shape (1..4) then color (1..8) of each patch of a grid x grid tiling, row-major; 0 for background and
    IGNORE near an edge. Shapes are taken as disks, which the core and margin make safe for every renderer's
    outline and for squashed aspect ratios."""
    kinds, colors = [0] * (grid * grid), [0] * (grid * grid)
    for shape in scene.shapes:
        core = 0.45 if shape.kind == "star" else 0.7
        for i in range(grid * grid):
            y, x = (i // grid + 0.5) / grid, (i % grid + 0.5) / grid
            d = ((x - shape.x) ** 2 + (y - shape.y) ** 2) ** 0.5 / shape.radius
            if d < core:
                kinds[i], colors[i] = 1 + SHAPES.index(shape.kind), 1 + COLORS.index(shape.color)
            elif d < 1.25:
                kinds[i], colors[i] = IGNORE, IGNORE
    return kinds + colors


class PatchHead(nn.Module):
    """A linear map of each patch token to shape and color logits."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1 + len(SHAPES) + 1 + len(COLORS))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """tokens (M, 1 + P, D) from the vision tower (class token first); targets (M, 2P): patch_labels()."""
        logits = self.out(self.norm(tokens[:, 1:])).float()  # (M, P, 5 + 9)
        p = logits.shape[1]
        kinds, colors = logits.split([1 + len(SHAPES), 1 + len(COLORS)], dim=-1)
        if not (targets != IGNORE).any():
            return logits.sum() * 0.0
        return (F.cross_entropy(kinds.flatten(0, 1), targets[:, :p].flatten(), ignore_index=IGNORE)
                + F.cross_entropy(colors.flatten(0, 1), targets[:, p:].flatten(), ignore_index=IGNORE))


class SceneHead(nn.Module):
    """One learned query per head attends over an image's latents; a per-head linear map gives 4 logits."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(HEADS, dim))
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Parameter(torch.randn(HEADS, dim, 4) / dim ** 0.5)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (M, T, D) -> logits (M, HEADS, 4)"""
        x = self.norm(feats)
        h, _ = self.attn(self.queries.expand(x.shape[0], -1, -1), x, x, need_weights=False)  # (M, HEADS, D)
        # Normalized before the read-out, so that the logits start near unit scale and move fast.
        return torch.einsum("mhd,hdc->mhc", self.out_norm(h), self.out)

    def loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """targets (M, HEADS); rows of images without labels are all IGNORE."""
        logits = self(feats).float()
        if not (targets != IGNORE).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
