"""The vocabulary of the fused loss statistics: one definition shared by the reference, the ops and the kernels.

A fused loss computes per-(sample, class) sums, the *statistics* ``stats (B, NUM_SLOTS, C)``, in one pass over
the logits and the target (see :mod:`fastmed.reference.losses` for the formulas and :mod:`fastmed.kernels.losses`
for the Triton kernels).  What that pass computes is a :class:`StatsSpec`; its modes are strings, which travel
unchanged through the ``torch.library`` op signature (``str`` arguments) and into the kernels (string
``tl.constexpr`` flags).  Where a string cannot go (the index of a statistic in the stats tensor) the kernels
import the named slot constants below.

Statistics slots (``stats[:, SLOT, :]``), with ``m`` the ignore mask, ``p`` the activation of the logits ``z``,
``g`` the one-hot or dense target, ``p' = m p``, ``g' = m g``; each is a sum over the voxels of:

=========  ==================================================================================================
slot       sum over the voxels of ...
=========  ==================================================================================================
INTERSECT  ``p' g'``
PRED       ``p'`` (pow_mode "linear"), ``p'^2`` ("square"), ``|p'|`` ("abs")
GROUND     the same of ``g'``
DIFF       ``|p' - g'|`` (pow_mode "abs" only: MONAI's soft-label formulation)
NLL        softmax CE: ``-m g log q`` (q = softmax(z)); BCE: ``m ((1 - g) softplus(z) + g softplus(-z))``
LOGSUM     softmax CE: ``-m log q`` (label smoothing); BCE: ``m g softplus(-z)`` (pos_weight)
FOCAL      focal term ``l`` of MONAI's sigmoid / softmax focal loss on (m z, m g), times m
FOCAL_POS  ``l g'`` (focal_pos "linear", scalar alpha) or ``l [g' == 1]`` (focal_pos "hard", per-class alpha)
COUNT      ``m`` (same value in every class column)
BAD        label targets: voxels whose label is neither an integer in [0, C) nor ignore_index
=========  ==================================================================================================

A product whose weight is zero counts as zero even when the other factor is infinite (``0 * log 0 = 0``): a
``-inf`` logit on a class the target does not hold (how users mask classes) adds nothing; NaN stays NaN.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["SLOTS", "NUM_SLOTS", "INTERSECT", "PRED", "GROUND", "DIFF", "NLL", "LOGSUM", "FOCAL", "FOCAL_POS",
           "COUNT", "BAD", "ACTIVATIONS", "POW_MODES", "CE_MODES", "FOCAL_MODES", "FOCAL_POS_MODES", "StatsSpec",
           "check_spec"]

SLOTS = ("intersect", "pred", "ground", "diff", "nll", "logsum", "focal", "focal_pos", "count", "bad")
NUM_SLOTS = len(SLOTS)
INTERSECT, PRED, GROUND, DIFF, NLL, LOGSUM, FOCAL, FOCAL_POS, COUNT, BAD = range(NUM_SLOTS)

#: the Dice activation of the logits: identity, sigmoid, or softmax over the classes
ACTIVATIONS = ("none", "sigmoid", "softmax")
#: the Dice sums PRED / GROUND: off, of p, of p^2, of |p| (with DIFF)
POW_MODES = ("off", "linear", "square", "abs")
#: the cross-entropy slots NLL / LOGSUM: off, softmax CE, softmax CE with label smoothing, BCE with logits (C = 1)
CE_MODES = ("off", "softmax", "softmax_smooth", "bce")
#: the focal slot FOCAL: off, MONAI's sigmoid focal term, MONAI's softmax focal term
FOCAL_MODES = ("off", "sigmoid", "softmax")
#: the alpha split FOCAL_POS of the sigmoid focal term: off, linear in the target (scalar alpha), target == 1
FOCAL_POS_MODES = ("off", "linear", "hard")


class StatsSpec(NamedTuple):
    """What one statistics pass computes (every argument of ``fastmed::loss_stats`` but the tensors and backend).

    Attributes:
        act: one of :data:`ACTIVATIONS`, applied to the logits for the Dice slots.
        pow_mode: one of :data:`POW_MODES`.
        ce_mode: one of :data:`CE_MODES`.
        focal_mode: one of :data:`FOCAL_MODES`.
        focal_c0: the first class of the softmax focal term (1 drops the background, 0 keeps it).
        gamma: the focal exponent.
        focal_pos: one of :data:`FOCAL_POS_MODES`.
        label_mode: the target holds one integer label per voxel ``(B, 1, *spatial)``; else it is dense
            ``(B, C, *spatial)`` (``(B, 1, *spatial)`` when C = 1).
        has_ignore: labels equal to ``ignore_index`` count nowhere (label targets).
        ignore_index: the ignored label when ``has_ignore``.
    """
    act: str = "none"
    pow_mode: str = "off"
    ce_mode: str = "off"
    focal_mode: str = "off"
    focal_c0: int = 0
    gamma: float = 0.0
    focal_pos: str = "off"
    label_mode: bool = False
    has_ignore: bool = False
    ignore_index: int = 0


_VOCABULARY = {"act": ACTIVATIONS, "pow_mode": POW_MODES, "ce_mode": CE_MODES, "focal_mode": FOCAL_MODES,
               "focal_pos": FOCAL_POS_MODES}


def check_spec(spec: StatsSpec) -> StatsSpec:
    """``spec`` unchanged, or ``ValueError`` naming the first mode outside its vocabulary."""
    for name, words in _VOCABULARY.items():
        value = getattr(spec, name)
        if value not in words:
            raise ValueError(f"StatsSpec.{name} must be one of {', '.join(map(repr, words))}; got {value!r}")
    return spec
