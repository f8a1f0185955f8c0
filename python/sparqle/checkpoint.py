"""Checkpoints of converted models, in safetensors (no pickle): ``sparqle.save(model, path)``
and ``sparqle.load(model, path)``.

The file's tensors are the model's state_dict less what a load rebuilds: the buffers a
converted module derives from its other tensors (the transposed structure of CSR and
Blocked-ELL, CSR's row order), and every name but one of a tensor reached at several (a tied
weight: safetensors refuses shared storage). The file's metadata (str -> str) holds, under
the key ``"sparqle"``, the JSON object

    {"format_version": 1,              # what this sparqle reads; a newer one is refused
     "sparqle_version": "0.1.0",       # who wrote it (for the error messages)
     "modules": {name: settings},      # each converted module: its settings() (format, ...)
     "aliases": {key: saved_key}}      # state_dict keys whose tensor is saved under another

so that ``load`` converts a float (or meta-device) model of the same architecture to match
and loads it, without the float weights. A load is a strict ``load_state_dict``: every check
of one (keys, shapes, and the converted modules' own checks) runs, and a refused file is a
ValueError or TypeError naming the module or the state_dict key.
"""
import json
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .nn import SparseWindowBlock, WindowAttention
from .nn._load import CheckedLoad, ConvertedLinear, Settings, _named
from .nn._replace import filtered, replace_modules
from .nn.window_attention import is_swin_block, is_swin_window_attention
from .registry import BY_CONVERSION

FORMAT_VERSION = 1
METADATA_KEY = "sparqle"
# format (settings()["format"], the name sparqle.convert takes) -> the module class that holds it
_LINEARS = {name: entry.module_class for name, entry in BY_CONVERSION.items()}
# formats that swap whole modules, in the order a load converts them (a block before the
# attention inside it; both before the linear layers, which they keep as they are):
# format -> (class, whether a float module is one to convert, the conversion)
_STRUCTURAL = {
    "sparse_windows": (SparseWindowBlock, is_swin_block,
                       lambda m, settings: SparseWindowBlock.from_block(m, settings["keep_ratio"])),
    "window_attention": (WindowAttention, is_swin_window_attention,
                         lambda m, settings: WindowAttention.from_module(m)),
}
_CONVERTED = (ConvertedLinear, WindowAttention, SparseWindowBlock)

Path = Union[str, os.PathLike]


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("sparqle checkpoints need safetensors: pip install 'sparqle[checkpoint]' "
                          "(or pip install safetensors)") from None
    return safetensors


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def checkpoint_state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
    """(tensors, modules) of ``model``'s checkpoint: its state_dict without the settings and
    the derived buffers of the converted modules; each converted module's settings."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    modules, rebuilt = {}, set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, _CONVERTED):
            modules[name] = module.settings()
            if isinstance(module, ConvertedLinear):
                rebuilt.update(_prefix(name) + key for key in ("_extra_state", *module.derived()))
    tensors = {}
    for key, value in state.items():
        if key in rebuilt:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict key {key!r} holds a {type(value).__name__}, not a tensor: a "
                            f"sparqle checkpoint keeps tensors, and the settings of sparqle's modules")
        if value.is_meta:
            raise ValueError(f"state_dict key {key!r} is on the meta device: it has no values to save")
        tensors[key] = value
    return tensors, modules


def file_metadata(modules: Dict[str, dict], aliases: Dict[str, str]) -> Dict[str, str]:
    """The checkpoint's safetensors metadata (see the module's docstring)."""
    return {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, "sparqle_version": _version(),
                                      "modules": modules, "aliases": aliases})}


def _version() -> str:
    from . import __version__
    return __version__


def _unshared(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``tensors`` with no two sharing memory, and {key: the key that holds its tensor} for
    the keys dropped as the same view of the same memory as another (a tied weight); other
    overlapping views are copied."""
    kept: Dict[tuple, str] = {}
    storages: Dict[tuple, int] = {}
    out, aliases = {}, {}
    for key, t in tensors.items():
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in kept:
            aliases[key] = kept[view]
            continue
        kept[view] = key
        shared = t.numel() > 0 and storages.get(storage, 0) > 0
        storages[storage] = storages.get(storage, 0) + 1
        out[key] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return out, aliases


def save(model: nn.Module, path: Path) -> None:
    """Write ``model`` (converted by :func:`sparqle.convert`, or a sparqle.nn module) to the
    safetensors file ``path``: its tensors, less those a load rebuilds, and in the metadata
    the format and settings of every converted module (see :func:`load`)."""
    tensors, modules = checkpoint_state(model)
    tensors, aliases = _unshared(tensors)
    _safetensors().torch.save_file(tensors, os.fspath(path), metadata=file_metadata(modules, aliases))


def read_metadata(metadata, where: str) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """(modules, aliases) of a checkpoint's metadata, checked; ``where`` names the file in
    the errors."""
    if not metadata or METADATA_KEY not in metadata:
        raise ValueError(f"{where} has no {METADATA_KEY!r} metadata: it was not written by "
                         f"sparqle.save (load a plain state_dict with load_state_dict)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: metadata key {METADATA_KEY!r} is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: metadata key {METADATA_KEY!r} must hold a JSON object, got "
                         f"{type(header).__name__}")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: metadata key {METADATA_KEY!r} has no valid format_version "
                         f"(got {version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} was written by sparqle {header.get('sparqle_version', '?')} in "
                         f"checkpoint format {version}; this sparqle ({_version()}) reads format "
                         f"{FORMAT_VERSION}: upgrade sparqle to load it")
    modules, aliases = header.get("modules"), header.get("aliases")
    if not isinstance(modules, dict) or not all(isinstance(s, dict) and isinstance(s.get("format"), str)
                                                for s in modules.values()):
        raise ValueError(f"{where}: metadata 'modules' must map each module's name to its settings "
                         f"(a JSON object with a 'format'), got {modules!r:.200}")
    for name, settings in modules.items():
        if settings["format"] not in _LINEARS and settings["format"] not in _STRUCTURAL:
            raise ValueError(f"{where}: module {name!r} has format {settings['format']!r}, which this "
                             f"sparqle does not know ({sorted([*_LINEARS, *_STRUCTURAL])})")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in aliases.items()):
        raise ValueError(f"{where}: metadata 'aliases' must map state_dict keys to keys, got {aliases!r:.200}")
    return modules, aliases


def load(model: nn.Module, path: Path, *, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Convert ``model`` (the float model of the checkpoint's architecture, on any device or
    the meta device; or one converted as the checkpoint was) to match the checkpoint
    ``path`` written by :func:`save`, and load it; returns ``model``.

    Each module the checkpoint converted is built from the file's tensors (no float
    weight needed), checked as its constructor checks them, with the derived buffers
    rebuilt; it replaces the float module, which must have the same shape and bias. Then
    the whole state_dict is loaded strictly: missing or unexpected keys, other shapes, a
    tensor refused by a module's checks are errors naming the key. Tensors are read to
    ``device``, where the converted modules and the meta-device tensors are created; the
    model's other tensors stay where they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    where = os.fspath(path)
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(where, framework="pt", device=str(torch.device(device))) as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except safetensors.SafetensorError as error:
        raise ValueError(f"{where} is not a readable safetensors file (truncated or corrupt?): "
                         f"{error}") from None
    modules, aliases = read_metadata(metadata, where)
    for key, saved in aliases.items():
        if saved not in tensors or key in tensors:
            raise ValueError(f"{where}: metadata 'aliases' maps state_dict key {key!r} to {saved!r}, "
                             f"but the file {'lacks ' + repr(saved) if saved not in tensors else 'has ' + repr(key)}")
    state = {**tensors, **{key: tensors[saved] for key, saved in aliases.items()}}
    undo: List[Dict[int, nn.Module]] = []
    try:
        convert_structural(model, modules, where, undo)
        built = build_linears(model, modules, state, where)
        _swap(model, built, undo)
        _check_keys(model, state, where)
        _materialize(model, torch.device(device))
        # the keys are checked: the load is strict; the layers just built from the file
        # hold its tensors, checked by their constructors, and are not loaded twice
        built_ids = {id(m) for m in built.values()}
        model.load_state_dict({key: t for key, t in state.items()
                               if id(model.get_submodule(key.rpartition(".")[0])) not in built_ids}, strict=False)
    except BaseException:  # a refused file leaves the model's modules as they were
        for swapped in reversed(undo):
            _swap(model, swapped)
        raise
    return model


def _submodule(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where} converts module {name!r}, which the model does not have: the "
                         f"checkpoint is of another architecture") from None


def _swap(model: nn.Module, new: Dict[int, nn.Module], undo: Optional[List[Dict[int, nn.Module]]] = None) -> None:
    """Put ``new[id(m)]`` in place of every module m of ``model`` it names, at each of m's
    names; ``undo`` gains the swap that reverts it."""
    if undo is not None:
        undo.append({id(new[id(m)]): m for m in model.modules() if id(m) in new})
    if new:
        replace_modules(model, lambda m: id(m) in new, filtered(None, None), lambda name, m, setting: new[id(m)],
                        root_hint="a module the checkpoint converts: load into a model that contains it",
                        copies_parameters=False)


def convert_structural(model: nn.Module, modules: Dict[str, dict], where: str,
                       undo: Optional[List[Dict[int, nn.Module]]] = None) -> None:
    """Swap the modules of ``model`` that ``modules`` (name -> settings, from the metadata;
    ``where`` names the file) records in a format that swaps whole modules (Swin's
    attention and blocks: their tensors stay those of the float modules); ``undo`` gains
    the swaps that revert it."""
    for fmt, (cls, is_kind, make) in _STRUCTURAL.items():
        for name, settings in modules.items():
            if settings["format"] != fmt:
                continue
            target = _submodule(model, name, where)
            if not isinstance(target, cls):
                if not is_kind(target):
                    raise ValueError(f"{where} holds a {fmt} module at {name!r}, but the model has a "
                                     f"{type(target).__name__} there: another architecture")
                try:
                    converted = make(target, Settings(settings))
                except (ValueError, TypeError) as error:
                    raise type(error)(f"{where}, module {name!r}: {error}") from None
                _swap(model, {id(target): converted}, undo)
                target = converted
            if json.loads(json.dumps(target.settings())) != settings:
                raise ValueError(f"{where}: module {name!r} was saved with settings {settings}, but this "
                                 f"model's gives {target.settings()}: another architecture")


def build_linears(model: nn.Module, modules: Dict[str, dict], state: Dict[str, object],
                  where: str) -> Dict[int, nn.Module]:
    """{id(float layer): its converted layer} for the linear layers of ``model`` that
    ``modules`` records, each built from the tensors of ``state`` (the checkpoint's
    state_dict, which gains each converted layer's ``_extra_state`` and derived buffers).
    A recorded layer that the model already holds converted keeps its module (the load
    checks it) and is not in the result."""
    new = {}
    for name, settings in modules.items():
        if settings["format"] not in _LINEARS:
            continue
        target = _submodule(model, name, where)
        cls, prefix = _LINEARS[settings["format"]], _prefix(name)
        local = {key[len(prefix):]: t for key, t in state.items()
                 if key.startswith(prefix) and "." not in key[len(prefix):]}
        local["_extra_state"] = settings
        try:
            built = cls.from_state_dict(local, prefix)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None
        if type(target) is nn.Linear:
            if (target.out_features, target.in_features) != (built.out_features, built.in_features) or \
                    (target.bias is None) != (built.bias is None):
                raise ValueError(f"{where} holds at {name!r} a {built.out_features} x {built.in_features} "
                                 f"layer {'with' if built.bias is not None else 'without'} bias, but the "
                                 f"model has {target}: another architecture")
            new[id(target)] = built
        elif not isinstance(target, cls):
            raise ValueError(f"{where} holds a {settings['format']} {cls.__name__} at {name!r}, but the "
                             f"model has a {type(target).__name__} there (an nn.Linear, or a {cls.__name__}, "
                             f"is expected)")
        if any(key in local for key in built.derived()):  # sparqle.save leaves them out
            own = {key: t for key, t in [*built._parameters.items(), *built._buffers.items()] if t is not None}
            try:
                built._check_state({**own, **{key: t for key, t in local.items() if key in own}})
            except (ValueError, TypeError) as error:
                raise _named(prefix, local, error) from None
        state[prefix + "_extra_state"] = settings
        for key in built.legacy_keys():  # saved by earlier versions, derived now
            state.pop(prefix + key, None)
        for key in built.derived():
            state.setdefault(prefix + key, getattr(built, key))
    return new


def _check_keys(model: nn.Module, state: Dict[str, object], where: str) -> None:
    """The keys of ``state`` are those of ``model``'s state_dict; the tensors of modules that
    do not check their own loads have the model's shapes."""
    expected = model.state_dict(keep_vars=True)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model's state_dict: "
                         + "; ".join(f"{what} keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                                     for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    for key, t in expected.items():
        owner = model.get_submodule(key.rpartition(".")[0])
        if isinstance(t, torch.Tensor) and not isinstance(owner, CheckedLoad) and state[key].shape != t.shape:
            raise ValueError(f"state_dict key {key!r} has shape {tuple(state[key].shape)} in {where}; "
                             f"the model has {tuple(t.shape)}: another architecture")


@torch.inference_mode(False)
def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta-device tensor of ``model`` memory on ``device`` (uninitialized: the
    load fills it), a tensor shared by several modules staying shared; plain tensors, in
    inference mode too (sparqle.formats._base.plain_tensor)."""
    made: Dict[int, torch.Tensor] = {}
    for name, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None or not t.is_meta:
                    continue
                if store is module._buffers and key in module._non_persistent_buffers_set:
                    raise ValueError(f"buffer {_prefix(name) + key!r} is on the meta device and not in the "
                                     f"state_dict (non-persistent), so no checkpoint holds its values: "
                                     f"build the model on a real device")
                if id(t) not in made:
                    empty = torch.empty_like(t, device=device)
                    made[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                store[key] = made[id(t)]
