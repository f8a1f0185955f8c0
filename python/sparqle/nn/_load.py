"""Checked state_dict loads, shared by the sparqle.nn modules.

A load is validated like a constructor call before anything is copied: the module's own
tensors, taken from the state_dict where it has them, go through the checks of the
format's constructor, and an error names the state_dict key. A converted linear layer
also keeps its settings (format, pattern, group size, FP8 dtype, ...) in the state_dict
as extra state of plain types, so that a state_dict saved with other settings is refused
instead of computed with, and ``torch.load(weights_only=True)`` still reads it.
"""
import re
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from sparqle.formats._base import plain_tensor


def _named(prefix: str, names, error: Exception) -> Exception:
    """``error`` again, its message led by the state_dict keys of the ``names`` it mentions,
    in order (the constructors' messages name their arguments, which are the modules'
    tensor names)."""
    message = str(error)
    found = sorted((m.start(), name) for name in names
                   for m in [re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message)] if m)
    keys = [prefix + name for _, name in found] or [prefix + name for name in names]
    return type(error)(f"state_dict key {' / '.join(map(repr, keys))}: {message}")


class CheckedLoad(nn.Module):
    """A module whose ``load_state_dict`` validates what it loads before copying it.

    Subclasses implement ``_check_state(tensors)``: ``tensors`` maps each of the module's
    own parameter and persistent buffer names to the tensor that the load would give it
    (from the state_dict, else the module's own); it raises ValueError or TypeError
    naming the tensor, with the checks its constructor runs. A tensor for which
    ``_sized_by_format(name)`` may change size in a load (the check decides); every other
    one must keep its size.
    """

    # The module's tensors are plain ones (formats._base.plain_tensor) however it is built,
    # moved or loaded, in inference mode too: what the kernels derive from them is kept.
    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, plain_tensor(value))

    def register_buffer(self, name: str, tensor: Optional[torch.Tensor], persistent: bool = True) -> None:
        super().register_buffer(name, plain_tensor(tensor), persistent)

    def _apply(self, fn, recurse=True):
        with torch.inference_mode(False):
            return super()._apply(fn, recurse)

    @classmethod
    def upgrade_state(cls, state: Dict[str, object], prefix: str) -> None:
        """Rewrite, in place, the entries under ``prefix`` of a state_dict that an earlier
        version of this module saved into what this one loads (by default there is nothing
        to rewrite); ``load_state_dict`` and ``from_state_dict`` call it first."""

    def _sized_by_format(self, name: str) -> bool:
        return False

    def _check_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _resize(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Make room for the tensors sized by the format whose size changes (SparseLinear)."""

    def legacy_keys(self) -> Tuple[str, ...]:
        """Keys that earlier versions of this module saved and this one derives instead: a
        load accepts them and drops them unread."""
        return ()

    def _check_extra_state(self, state_dict, prefix: str) -> None:
        """Check the extra state the load would set, before anything is copied."""

    @torch.inference_mode(False)
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self.upgrade_state(state_dict, prefix)
        self._check_extra_state(state_dict, prefix)
        for name in self.legacy_keys():
            state_dict.pop(prefix + name, None)
        own = {name: t for name, t in [*self._parameters.items(), *self._buffers.items()]
               if t is not None and name not in self._non_persistent_buffers_set}
        incoming = {name: state_dict[prefix + name] for name in own if prefix + name in state_dict}
        for name, t in incoming.items():
            current = own[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state_dict key {prefix + name!r} must be a torch.Tensor, got "
                                f"{type(t).__name__}")
            if current.is_floating_point() and not t.is_floating_point():
                raise TypeError(f"state_dict key {prefix + name!r} must be floating point, got {t.dtype}")
            if not current.is_floating_point() and t.dtype != current.dtype:
                raise TypeError(f"state_dict key {prefix + name!r} has dtype {t.dtype}; this "
                                f"{type(self).__name__} keeps it as {current.dtype}")
            if not self._sized_by_format(name) and t.shape != current.shape:
                raise ValueError(f"state_dict key {prefix + name!r} has shape {tuple(t.shape)}; this "
                                 f"{type(self).__name__} has {tuple(current.shape)}")
        tensors = {**own, **incoming}
        if incoming and not any(t.is_meta for t in tensors.values()):
            device = next(iter(incoming.values())).device
            try:
                self._check_state({name: t.to(device) for name, t in tensors.items()})
            except (ValueError, TypeError) as error:
                raise _named(prefix, tensors, error) from None
        self._resize(incoming)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class Settings(dict):
    """A module's saved settings: a missing one is a ValueError that names it."""

    def __missing__(self, key):
        raise ValueError(f"_extra_state has no setting {key!r}")


class ConvertedLinear(CheckedLoad):
    """A linear layer with its weight in a sparqle format: ``settings()`` (plain types)
    travel in the state_dict as extra state and must match on load."""

    def settings(self) -> Dict[str, object]:
        """What this module computes with beyond its tensors' values."""
        raise NotImplementedError

    def _held(self, names) -> Dict[str, torch.Tensor]:
        """Name -> this module's own Parameter or buffer, for each of ``names`` (a format's
        ``tensor_names``: what ``_trusted`` rebuilds the weight from)."""
        parameters, buffers = self._parameters, self._buffers
        return {name: parameters[name] if name in parameters else buffers[name] for name in names}

    def _register_format_tensors(self, weight, parameter: Optional[str] = None) -> None:
        """Hold each tensor of format ``weight`` (``weight.tensors()``) under its name: as a
        buffer, but tensor ``parameter`` (a sparse format's stored values) as a trainable
        Parameter, a copy."""
        for name, tensor in weight.tensors().items():
            if name == parameter:
                setattr(self, name, nn.Parameter(tensor.detach().clone()))
            else:
                self.register_buffer(name, tensor)

    def derived(self) -> Tuple[str, ...]:
        """The buffers computed from the module's other tensors (a checkpoint leaves them
        out; ``from_state_dict`` rebuilds them)."""
        return ()

    @classmethod
    def from_state_dict(cls, state: Dict[str, object], prefix: str = "") -> "ConvertedLinear":
        """The module whose ``state_dict()`` is ``state`` (the keys of the module itself,
        ``_extra_state`` included; the ``derived()`` buffers may be left out and are
        rebuilt), without a float weight: its tensors go through the checks of the
        format's constructor and its settings must be the ones it computes with. A missing
        or bad entry is a ValueError or TypeError naming its key, led by ``prefix``."""
        state = dict(state)
        cls.upgrade_state(state, "")
        settings = state.get("_extra_state")
        if not isinstance(settings, dict):
            raise TypeError(f"state_dict key {prefix + '_extra_state'!r} must be the dict of settings that "
                            f"{cls.__name__}.get_extra_state() saves, got {type(settings).__name__}")
        try:
            module = cls._from_state(Settings(settings), state)
        except KeyError as error:
            raise ValueError(f"state_dict key {prefix + error.args[0]!r} is missing: a {settings.get('format')} "
                             f"{cls.__name__} needs it") from None
        except (ValueError, TypeError) as error:
            raise _named(prefix, state, error) from None
        if module.settings() != settings:
            saved, here = _differences(settings, module.settings())
            keys = " / ".join(repr(prefix + key) for key in state if key != "_extra_state")
            raise ValueError(f"state_dict key {prefix + '_extra_state'!r} records {saved}, but the tensors "
                             f"({keys}) give {here}: the state_dict is corrupt")
        return module

    @classmethod
    def _from_state(cls, settings: Settings, tensors: Dict[str, torch.Tensor]) -> "ConvertedLinear":
        """The module of ``settings`` over ``tensors``, built by its checked constructor."""
        raise NotImplementedError

    @staticmethod
    def _check_recorded_shape(shape, settings: Settings, name: str) -> None:
        """The weight that tensor ``name`` holds has the shape the settings record (checked
        before the bias is, so that a corrupt weight is named as such)."""
        recorded = (settings["out_features"], settings["in_features"])
        if tuple(shape) != recorded:
            raise ValueError(f"{name} holds a {shape[0]} x {shape[1]} weight, but _extra_state records "
                             f"out_features, in_features = {recorded}")

    def get_extra_state(self) -> Dict[str, object]:
        return self.settings()

    def set_extra_state(self, state) -> None:
        self._check_settings(state, "_extra_state")

    def _check_extra_state(self, state_dict, prefix: str) -> None:
        if prefix + "_extra_state" in state_dict:
            self._check_settings(state_dict[prefix + "_extra_state"], prefix + "_extra_state")

    def _check_settings(self, state, key: str) -> None:
        mine = self.settings()
        if state == mine:
            return
        if not isinstance(state, dict):
            raise TypeError(f"state_dict key {key!r} must be the dict of settings that "
                            f"{type(self).__name__}.get_extra_state() saves, got {type(state).__name__}")
        saved, here = _differences(state, mine)
        raise ValueError(f"state_dict key {key!r}: the state_dict was saved from a "
                         f"{type(self).__name__} with {saved}, but this one has {here}; convert "
                         f"the model with the settings it was saved with before loading")

    def _follow(self, linear_: nn.Linear, weight_name: Optional[str]) -> "ConvertedLinear":
        """Keep ``linear_``'s intent: a frozen weight or bias stays frozen in this module
        (``weight_name``: the Parameter that holds the weight here, None if a buffer)."""
        if weight_name is not None:
            getattr(self, weight_name).requires_grad_(linear_.weight.requires_grad)
        if self.bias is not None:
            self.bias.requires_grad_(linear_.bias.requires_grad)
        return self


def _differences(saved: dict, mine: dict) -> Tuple[str, str]:
    """The settings on which ``saved`` and ``mine`` differ: ("k=saved, ...", "k=mine, ...")."""
    differ = sorted(set(saved) ^ set(mine) | {k for k in mine if k in saved and saved[k] != mine[k]})
    return (", ".join(f"{k}={saved.get(k)!r}" for k in differ), ", ".join(f"{k}={mine.get(k)!r}" for k in differ))


def bias_parameter(bias: Optional[torch.Tensor], out_features: int) -> Optional[nn.Parameter]:
    """The bias as this module's own Parameter (a copy), checked: floating, [out_features]."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got "
                        f"{bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return nn.Parameter(bias.detach().clone())
