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

The formula applied to the statistics (MONAI's / nnU-Net's loss, its reduction and weights) is a
:class:`LossSpec`, what ``fastmed::loss_finalize`` computes: the loss and ``jac = d loss / d stats`` (the
coefficients the backward pass of the statistics consumes) in one small step.  ``jac`` is 0 in the slots that do
not depend on the logits (GROUND, COUNT, BAD).  For a loss with ``reduction="none"`` (a tensor of values rather
than one number), ``jac[b, k, c]`` is the derivative of the one output value that ``stats[b, k, c]`` enters.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["SLOTS", "NUM_SLOTS", "INTERSECT", "PRED", "GROUND", "DIFF", "NLL", "LOGSUM", "FOCAL", "FOCAL_POS",
           "COUNT", "BAD", "ACTIVATIONS", "POW_MODES", "CE_MODES", "FOCAL_MODES", "FOCAL_POS_MODES", "StatsSpec",
           "check_spec", "NON_LOGIT_SLOTS", "REGIONS", "CE_TERMS", "ALPHA_MODES", "REDUCTIONS", "W_TYPES", "LossSpec",
           "check_loss_spec"]

SLOTS = ("intersect", "pred", "ground", "diff", "nll", "logsum", "focal", "focal_pos", "count", "bad")
NUM_SLOTS = len(SLOTS)
INTERSECT, PRED, GROUND, DIFF, NLL, LOGSUM, FOCAL, FOCAL_POS, COUNT, BAD = range(NUM_SLOTS)
#: the slots that do not depend on the logits: their entries of ``jac`` are 0
NON_LOGIT_SLOTS = (GROUND, COUNT, BAD)

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


#: the overlap term of a loss: off; MONAI Dice ``1 - (2 tp + s_nr) / (2 tp + fp + fn + s_dr)``; Jaccard (fp and fn
#: counted twice); Tversky ``1 - (tp + s_nr) / (tp + alpha fp + beta fn + s_dr)``; generalized Dice (class weights
#: from the ground sums, one value per sample); nnU-Net's ``-(2 tp + s) / clip(2 tp + fp + fn + s, 1e-8)``
REGIONS = ("off", "dice", "jaccard", "tversky", "generalized", "nnunet")
#: the cross-entropy term: off; softmax CE on label targets (``nn.CrossEntropyLoss`` with class indices); on dense
#: (probability) targets; BCE with logits (one channel); nnU-Net's CE (mean over the voxels that are not ignored)
CE_TERMS = ("off", "labels", "dense", "bce", "nnunet")
#: MONAI FocalLoss's alpha: none, one number, one value per class kept
ALPHA_MODES = ("off", "scalar", "per_class")
#: how a term reduces over samples and classes (MONAI's ``reduction``)
REDUCTIONS = ("mean", "sum", "none")
#: GeneralizedDiceLoss ``w_type``: class weights ``1 / G^2``, ``1 / G`` or 1
W_TYPES = ("square", "simple", "uniform")


class LossSpec(NamedTuple):
    """The formula on the statistics (every argument of ``fastmed::loss_finalize`` but the tensors and backend):
    ``loss = region_scale * region + ce_scale * ce + focal_scale * focal``, each term MONAI's (or nnU-Net's).

    The per-class tensors travel beside the spec: ``region_weight (C')`` (Dice class weight), ``ce_weight (C)``
    (CE class weight; BCE ``pos_weight`` when C = 1), ``focal_alpha (C')`` (``alpha_mode`` "per_class"),
    ``focal_weight (C')``; C' the classes kept (from ``region_c0`` / ``focal_c0`` on).

    Attributes:
        num_voxels: voxels per sample (the spatial size), the CE / focal means divide by it.
        region: one of :data:`REGIONS`.
        region_c0: the first class of the overlap term (1 drops the background, 0 keeps it).
        pow_mode: the :data:`POW_MODES` of the statistics: ``"abs"`` (MONAI's soft labels) takes
            ``tp = (PRED + GROUND - DIFF) / 2``, the others ``tp = INTERSECT``.
        batch: sum the statistics over the batch before the overlap term (one value per class).
        smooth_nr, smooth_dr: the smoothing of the numerator and denominator (``"nnunet"``: nnU-Net's one
            ``smooth`` is ``smooth_nr``, in both).
        tversky_alpha, tversky_beta: the weights of fp and fn (``region="tversky"``).
        w_type: one of :data:`W_TYPES` (``region="generalized"``).
        region_reduction: one of :data:`REDUCTIONS`; ``"none"`` keeps ``(B, C')`` (``(C',)`` with ``batch``;
            ``(B, 1)`` / ``(1,)`` for the generalized Dice) and needs every other term off.
        region_scale: the factor of the overlap term (``lambda_dice``, ``weight_dice``).
        ce: one of :data:`CE_TERMS`.
        ce_reduction: ``"mean"`` or ``"sum"``.
        label_smoothing: CE label smoothing.
        ce_scale: the factor of the CE term.
        focal: one of :data:`FOCAL_MODES`, the focal term of the statistics.
        focal_c0: the first class of the focal term.
        alpha_mode: one of :data:`ALPHA_MODES`; ``alpha`` the number for ``"scalar"``.
        focal_reduction: ``"mean"`` or ``"sum"`` (``"none"`` is per voxel: not a function of the statistics).
        focal_masked: an ignore index masks voxels: the means divide by the voxels that count (COUNT).
        focal_scale: the factor of the focal term.
    """
    num_voxels: int = 1
    region: str = "off"
    region_c0: int = 0
    pow_mode: str = "linear"
    batch: bool = False
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    tversky_alpha: float = 0.5
    tversky_beta: float = 0.5
    w_type: str = "square"
    region_reduction: str = "mean"
    region_scale: float = 1.0
    ce: str = "off"
    ce_reduction: str = "mean"
    label_smoothing: float = 0.0
    ce_scale: float = 1.0
    focal: str = "off"
    focal_c0: int = 0
    alpha_mode: str = "off"
    alpha: float = 0.0
    focal_reduction: str = "mean"
    focal_masked: bool = False
    focal_scale: float = 1.0


_LOSS_VOCABULARY = {"pow_mode": POW_MODES, "region": REGIONS, "w_type": W_TYPES, "region_reduction": REDUCTIONS,
                    "ce": CE_TERMS, "ce_reduction": REDUCTIONS[:2], "focal": FOCAL_MODES, "alpha_mode": ALPHA_MODES,
                    "focal_reduction": REDUCTIONS[:2]}


def check_loss_spec(spec: LossSpec) -> LossSpec:
    """``spec`` unchanged, or ``ValueError`` naming the first mode outside its vocabulary (or a ``"none"``
    reduction combined with another term)."""
    for name, words in _LOSS_VOCABULARY.items():
        value = getattr(spec, name)
        if value not in words:
            raise ValueError(f"LossSpec.{name} must be one of {', '.join(map(repr, words))}; got {value!r}")
    if spec.region == "nnunet" and (spec.pow_mode != "linear" or spec.region_reduction != "mean"):
        raise ValueError("LossSpec.region='nnunet' is nnU-Net's soft Dice: pow_mode 'linear', region_reduction "
                         f"'mean'; got {spec.pow_mode!r}, {spec.region_reduction!r}")
    if spec.region_reduction == "none" and (spec.ce != "off" or spec.focal != "off"):
        raise ValueError("LossSpec.region_reduction='none' keeps one value per sample and class: the ce and focal "
                         f"terms must be off, got ce={spec.ce!r}, focal={spec.focal!r}")
    return spec
