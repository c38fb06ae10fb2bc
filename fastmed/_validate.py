"""Input checks shared by every op: errors name the argument, what was expected and what came."""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x, name: str, *, floating: bool = True, min_ndim: Optional[int] = None,
                 max_ndim: Optional[int] = None, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {x.dtype}")
    if min_ndim is not None and x.dim() < min_ndim or max_ndim is not None and x.dim() > max_ndim:
        lo = "" if min_ndim is None else str(min_ndim)
        hi = "" if max_ndim is None else str(max_ndim)
        expect = f"{lo}..{hi}" if lo != hi else lo
        raise ValueError(f"{name} must have {expect} dimensions, got shape {tuple(x.shape)} ({x.dim()} dimensions)")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    first = device = None
    for k, v in tensors.items():
        if v is None or not isinstance(v, torch.Tensor):
            continue
        if device is None:
            first, device = k, v.device
        elif v.device != device:
            raise ValueError(f"{k} is on {v.device} but {first} is on {device}; all tensors must be on one device")
    return device


def check_choice(value, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_per_channel(t: Optional[torch.Tensor], name: str, channels: int, *, allow_scalar: bool = False) -> None:
    if t is None:
        return
    check_tensor(t, name)
    ok = t.dim() == 1 and (t.shape[0] == channels or (allow_scalar and t.shape[0] == 1))
    if not ok:
        extra = " or (1,)" if allow_scalar else ""
        raise ValueError(f"{name} must have shape ({channels},){extra} to match the {channels} channels of x, "
                         f"got shape {tuple(t.shape)}")


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S) as a view when the spatial dims collapse (contiguous or
    channels-last layouts); otherwise a contiguous copy."""
    n, c = x.shape[:2]
    s = 1
    for d in x.shape[2:]:
        s *= d
    try:
        return x.view(n, c, s)
    except RuntimeError:
        return x.contiguous().view(n, c, s)


def check_per_axis(value, name: str, nd: int, minimum: int) -> tuple[int, ...]:
    """An int or a sequence of ``nd`` ints, each >= ``minimum`` -> a tuple of ``nd`` ints (one per spatial axis)."""
    if type(value) is tuple and len(value) == nd and all(type(v) is int and v >= minimum for v in value):
        return value  # the common case (a torch module's stride/padding/dilation) without the ABC checks below
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        vals = (int(value),) * nd
    elif (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == nd
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        vals = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{name} must be an int or a sequence of {nd} ints (one per spatial axis), got {value!r}")
    if any(v < minimum for v in vals):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return vals


# --------------------------------------------------------------------------------------------
# Numbers, and the arguments of the segmentation losses (fastmed.ops.losses, fastmed.nn.losses)
# --------------------------------------------------------------------------------------------

def check_number(value, name: str, *, minimum: Optional[float] = None, maximum: Optional[float] = None) -> float:
    """A finite real number (not a bool; NaN and ±inf are refused) in ``[minimum, maximum]`` -> float."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and -float("inf") < value < float("inf")
          and (minimum is None or value >= minimum) and (maximum is None or value <= maximum))
    if not ok:
        if minimum is None and maximum is None:
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be a finite real number in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_int(value, name: str, minimum: Optional[int] = None, *, allow_none: bool = False) -> Optional[int]:
    """An int (not a bool; ``None`` too with ``allow_none``), at least ``minimum`` -> int or None.

    A value of another type raises TypeError, an int below ``minimum`` ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expect = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {expect}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_reduction(reduction, choices: Sequence[str] = ("mean", "sum", "none")) -> str:
    """A loss's ``reduction``: one of ``choices``, given as a string or a MONAI ``LossReduction`` enum."""
    return check_choice(getattr(reduction, "value", reduction), "reduction", choices)


def check_loss_activation(sigmoid: bool, softmax: bool, other_act) -> None:
    """MONAI's activation arguments of a loss: ``other_act`` None or callable, at most one of the three set."""
    if other_act is not None and not callable(other_act):
        raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
    if int(bool(sigmoid)) + int(bool(softmax)) + int(other_act is not None) > 1:
        raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")


def check_ddp_sync(ddp_sync: bool, batch: bool) -> None:
    """``ddp_sync=True`` sums batch statistics over ranks, so it needs batch statistics (``batch=True``)."""
    if ddp_sync and not batch:
        raise ValueError("ddp_sync=True sums the batch Dice statistics over ranks and needs batch=True "
                         "(batch_dice=True for nnU-Net)")


def check_class_weight(weight, name: str, channels: int) -> Optional[torch.Tensor]:
    """A per-class loss weight: None, a number, or one non-negative value per class kept (``channels``, without
    the background class 0 when ``include_background=False``) -> None or a tensor (0-d for a number)."""
    if weight is None:
        return None
    expect = f"{name} must be a number, a sequence of numbers or a tensor, got {type(weight).__name__}"
    if isinstance(weight, (bool, str, bytes)) or not isinstance(weight, (numbers.Real, Sequence, torch.Tensor)):
        raise TypeError(expect)
    try:
        w = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{expect} ({exc})") from None
    if w.ndim > 1 or w.ndim == 1 and w.shape[0] != channels:
        raise ValueError(f"{name} must be a number or have one value per class ({channels} classes, without the "
                         f"background class 0 when include_background=False), got shape {tuple(w.shape)}")
    if w.device.type == "cpu":
        if bool((w < 0).any()):
            raise ValueError(f"{name} values must be no less than 0, got {w.tolist()}")
    else:  # a weight on a GPU (a module buffer after .cuda()) is not read back on every call
        device_assert(~(w < 0).any(), f"{name} values must be no less than 0")
    return w


def device_assert(ok: torch.Tensor, message: str) -> None:
    """A device-side assert of the 0-d bool ``ok`` (for tensors off the CPU): nothing is read back, the error
    surfaces at the next synchronization; skipped for meta tensors and while torch.compile traces."""
    if ok.device.type != "meta" and not torch.compiler.is_compiling():
        torch._assert_async(ok, message)


def check_number_sequence(values, name: str, *, minimum: Optional[float] = None) -> list[float]:
    """A sequence (or 1-D tensor) of finite real numbers, each at least ``minimum`` -> a list of floats."""
    if isinstance(values, torch.Tensor):
        values = values.tolist() if values.dim() == 1 else values
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    return [check_number(v, f"{name}[{i}]", minimum=minimum) for i, v in enumerate(values)]


def check_spatial_dims(spatial_dims) -> int:
    """2 or 3 spatial dimensions -> int."""
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, numbers.Integral) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def check_state_dict(state_dict, name: str = "state_dict"):
    """A mapping of parameter names to tensors, not a checkpoint that wraps one (``{"state_dict": {...}}``)."""
    from collections.abc import Mapping

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name} must be a mapping of parameter names to tensors, got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        raise ValueError(f"{name} looks like a checkpoint wrapper (it has a 'state_dict' entry); pass "
                         f"checkpoint['state_dict'] (or nnU-Net's checkpoint['network_weights'])")
    return state_dict


def check_token_grid(x, name: str, spatial_dims: int, channels: int) -> torch.Tensor:
    """A channels-last token grid ``(B, *S, channels)`` with ``spatial_dims`` spatial axes (Swin modules)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2 or x.shape[-1] != channels:
        axes = ", ".join("DHW"[3 - spatial_dims:])
        raise ValueError(f"{name} must be a {spatial_dims}D token grid (B, {axes}, {channels}), got shape "
                         f"{tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------
# Shapes, dtypes and modes (norm_act, conv_norm_act and their modules)
# --------------------------------------------------------------------------------------------

def check_mode(value, name: str, choices: Iterable[str]) -> str:
    """A mode name, case-insensitive -> its lower-case form, one of ``choices`` (TypeError for a non-string)."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string (one of {', '.join(choices)}), got {type(value).__name__}")
    return check_choice(value.lower(), name, choices)


def check_shape(t: torch.Tensor, name: str, shape: Sequence[int], what: str) -> None:
    """``t`` must have ``shape`` (the shape of ``what``)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {what} {tuple(shape)}, got {tuple(t.shape)}")


def check_same_dtype(t: torch.Tensor, name: str, dtype: torch.dtype, what: str) -> None:
    """``t`` must have ``dtype`` (the dtype of ``what``)."""
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {what} ({dtype}), got {t.dtype}")


def check_batch_and_spatial(t: torch.Tensor, name: str, like: torch.Tensor, what: str) -> None:
    """``t`` ``(N, C', *spatial)`` must have the batch and spatial size of ``like`` (``what``)."""
    if t.dim() != like.dim() or t.shape[0] != like.shape[0] or t.shape[2:] != like.shape[2:]:
        expect = (like.shape[0],) + tuple(like.shape[2:])
        raise ValueError(f"{name} must have the batch and spatial size of {what} {expect}, got {name} of shape "
                         f"{tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# Checks remembered per call signature (the per-call cost of the ops on small tensors)
# --------------------------------------------------------------------------------------------

def signature(value) -> tuple:
    """What the checks of an argument read: a tensor's type, shape, dtype and device (never its values), or the
    type and value of anything else.  Part of a :class:`CheckedCalls` key."""
    if isinstance(value, torch.Tensor):
        return type(value), value.shape, value.dtype, value.device
    return type(value), value


class CheckedCalls:
    """The results of an op's argument checks, remembered per call signature, so that a call like an earlier one
    (same tensor types, shapes, dtypes and devices, same other arguments) skips the checks.

    Only results of checks that read nothing else may be remembered: a key built from :func:`signature` of every
    argument the checks read determines their outcome (the type is part of each value's signature, so ``True``
    never passes for ``1``).  Failed checks are not remembered (they raise); an unhashable argument is never
    remembered (the checks then run and say what is wrong with it).  At most ``size`` signatures are kept (all
    are forgotten when it is reached: a program calls an op with few signatures).
    """

    def __init__(self, size: int = 1024):
        self.size = size
        self._results: dict = {}

    def get(self, key: tuple):
        """The remembered result for ``key``, else None."""
        try:
            return self._results.get(key)
        except TypeError:  # an unhashable argument
            return None

    def remember(self, key: tuple, result) -> None:
        if len(self._results) >= self.size:
            self._results.clear()
        try:
            self._results[key] = result
        except TypeError:
            pass

    def clear(self) -> None:
        self._results.clear()

    def __len__(self) -> int:
        return len(self._results)
