"""The base class of the weight formats: each format declares once the names of its tensors
and of its plain settings (as torchao's ``tensor_data_names`` / ``tensor_attribute_names``
do), and the unchecked rebuild, ``device``, ``dtype``, ``tensors()``, ``settings()``, ``to``
and ``__repr__`` are derived from them."""
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch


def layer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a tensor stored in the layer's float dtype: that dtype itself."""
    return dtype


class WeightFormat:
    """A weight [N, K] held as plain tensors and plain settings.

    Subclasses declare:

    - ``tensor_names``: the tensors, in the order the format's op takes them; an nn module
      holds them (as buffers; a sparse format's ``values`` as a Parameter).
    - ``setting_names``: the plain values besides them (``shape``, the pattern, the group
      size, the layer's float ``dtype`` where no tensor holds it, ...).
    - ``dtype_follows``: tensor name -> the dtype it takes for a layer float dtype (the dtype
      of x, bias and y), for the tensors ``to(dtype=)`` casts; the others keep theirs.
      Where ``dtype`` is not a setting, it is the dtype of the first tensor stored in the
      layer's dtype (mapped to :func:`layer_dtype`).
    - ``checked_to``: whether ``to`` rebuilds through the checked constructor (whose keyword
      arguments are then the declared names), refusing a cast that breaks the format (a
      scale that underflows); otherwise through ``_trusted``.
    - ``repr_names``: the attributes ``__repr__`` shows between ``shape`` and ``dtype``
      (default: the settings other than those two).
    """

    tensor_names: Tuple[str, ...] = ()
    setting_names: Tuple[str, ...] = ()
    dtype_follows: Mapping[str, Callable[[torch.dtype], torch.dtype]] = {}
    checked_to: bool = False
    repr_names: Optional[Tuple[str, ...]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._fields = frozenset(cls.tensor_names + cls.setting_names)
        if cls.repr_names is None:
            cls.repr_names = tuple(n for n in cls.setting_names if n not in ("shape", "dtype"))

    def _fill(self, **fields) -> None:
        """Store ``fields``, exactly the declared tensors (each a :func:`plain_tensor`) and
        settings (no checks of their values: the checked constructor runs them first)."""
        _store(self, {name: plain_tensor(value) if name in self.tensor_names else value
                      for name, value in fields.items()})

    @classmethod
    def _trusted(cls, **fields):
        """The format over tensors and settings already known to be valid (as nn modules hold
        them), by their declared names: no copy, no checks."""
        w = cls.__new__(cls)
        _store(w, fields)
        return w

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Name -> tensor, in the declared order (what an nn module holds)."""
        return {name: getattr(self, name) for name in self.tensor_names}

    def settings(self) -> Dict[str, object]:
        """Name -> plain setting; ``_trusted(**w.tensors(), **w.settings())`` is ``w`` again."""
        return {name: getattr(self, name) for name in self.setting_names}

    @property
    def device(self) -> torch.device:
        return getattr(self, self.tensor_names[0]).device

    @property
    def dtype(self) -> torch.dtype:
        """The layer's float dtype (of x, bias and y)."""
        if "dtype" in self.setting_names:
            return vars(self)["dtype"]
        stored = next(name for name, follow in self.dtype_follows.items() if follow is layer_dtype)
        return getattr(self, stored).dtype

    def to(self, device=None, dtype=None):
        """A copy on ``device`` and/or for layer float dtype ``dtype``: the tensors of
        ``dtype_follows`` take their dtype for it, the others only move (see each format's
        ``to`` for which)."""
        with torch.inference_mode(False):  # plain tensors (plain_tensor)
            fields = {name: t.to(device=device, dtype=self.dtype_follows[name](dtype))
                      if dtype is not None and name in self.dtype_follows else t.to(device)
                      for name, t in self.tensors().items()}
        fields.update(self.settings())
        if dtype is not None and "dtype" in fields:
            fields["dtype"] = dtype
        return type(self)(**fields) if self.checked_to else type(self)._trusted(**fields)

    def __repr__(self) -> str:
        described = "".join(f", {name}={_shown(getattr(self, name))}" for name in self.repr_names)
        return (f"{type(self).__name__}(shape={tuple(self.shape)}{described}, dtype={self.dtype}, "
                f"device={self.device})")


def plain_tensor(t):
    """``t`` itself, or where ``t`` is an inference tensor (made under
    ``torch.inference_mode()``) a plain copy of it, a Parameter for a Parameter: what the
    formats and the sparqle.nn modules hold. An inference tensor keeps no version counter, so
    what the kernels derive from a weight (sparqle.kernels._derived: a bitmap, a compressed
    copy, a score table) could not be kept for it and would be made again on every call: a
    model converted, moved or loaded in inference mode would pay that on each forward."""
    if not isinstance(t, torch.Tensor) or not t.is_inference():
        return t
    with torch.inference_mode(False):
        copy = t.detach().clone()
        return torch.nn.Parameter(copy, t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy


def _store(w: WeightFormat, fields: Dict[str, object]) -> None:
    """Store ``fields`` in ``w``, exactly its format's declared tensors and settings."""
    if fields.keys() != w._fields:
        raise TypeError(f"{type(w).__name__} takes the tensors {w.tensor_names} and the "
                        f"settings {w.setting_names}, got {tuple(fields)}")
    shape = fields.get("shape")
    if shape is not None and type(shape) is not torch.Size:
        fields["shape"] = torch.Size(shape)
    # The instance dict, not setattr: ``dtype`` is a property that reads a dtype setting
    # from there.
    w.__dict__.update(fields)


def _shown(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
