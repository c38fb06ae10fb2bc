"""Run MONAI's ViT / UNETR / SwinUNETR in the tests without einops (an optional MONAI dependency not installed
here): the few ``rearrange`` patterns MONAI uses are permutes and reshapes, implemented below.

``use_einops_shim(monkeypatch)`` does nothing when einops is importable; otherwise it patches the names MONAI
imported through ``optional_import`` (``Rearrange`` in the self-attention and patch-embedding blocks,
``rearrange`` in ``swin_unetr``) for the duration of one test.
"""
import importlib.util
import math
import re

from torch import nn


def _groups(side: str) -> list:
    """``"b h (qkv l d)"`` -> ``[["b"], ["h"], ["qkv", "l", "d"]]``."""
    return [g.split() if g.startswith("(") is False else g[1:-1].split()
            for g in re.findall(r"\([^)]*\)|\S+", side)]


def rearrange(x, pattern: str, **sizes):
    """``einops.rearrange`` for patterns whose sides are names and parenthesised groups (no ellipsis, no 1s)."""
    left, right = (_groups(s) for s in pattern.split("->"))
    if len(left) != x.dim():
        raise ValueError(f"pattern {pattern!r} does not fit a {x.dim()}-D tensor")
    dims = dict(sizes)
    for group, n in zip(left, x.shape):
        unknown = [a for a in group if a not in dims]
        if len(unknown) > 1:
            raise ValueError(f"pattern {pattern!r}: sizes of {unknown} are needed")
        if unknown:
            dims[unknown[0]] = n // math.prod(dims[a] for a in group if a in dims)
    flat = [a for g in left for a in g]
    x = x.reshape([dims[a] for a in flat])
    order = [a for g in right for a in g]
    x = x.permute([flat.index(a) for a in order])
    return x.reshape([math.prod(dims[a] for a in g) for g in right])


class Rearrange(nn.Module):
    """``einops.layers.torch.Rearrange`` for the patterns :func:`rearrange` supports."""

    def __init__(self, pattern: str, **sizes):
        super().__init__()
        self.pattern, self.sizes = pattern, sizes

    def forward(self, x):
        return rearrange(x, self.pattern, **self.sizes)


def use_einops_shim(monkeypatch) -> None:
    if importlib.util.find_spec("einops") is not None:
        return
    from monai.networks.blocks import patchembedding, selfattention
    from monai.networks.nets import swin_unetr

    monkeypatch.setattr(selfattention, "Rearrange", Rearrange)
    monkeypatch.setattr(patchembedding, "Rearrange", Rearrange)
    monkeypatch.setattr(swin_unetr, "rearrange", rearrange)
