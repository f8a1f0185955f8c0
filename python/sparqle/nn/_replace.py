"""Swapping modules of a model in place, as ``sparqle.convert`` does."""
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn


def replace_modules(model: nn.Module, is_target: Callable[[nn.Module], bool],
                    filter: Optional[Callable[[str, nn.Module], bool]],
                    make: Callable[[str, nn.Module], nn.Module], *, root_hint: str,
                    copies_parameters: bool) -> nn.Module:
    """Replace, in place, every module of ``model`` for which ``is_target(module)`` and
    ``filter(name, module)`` with ``make(name, module)``.

    A module reached at several names (used twice in a Sequential, or registered under two
    attributes) is made once, from its first name, and the result is put at every name;
    a filter that accepts it at some of its names and not at others is refused. When the
    new modules hold copies of the old ones' parameters (``copies_parameters``), a
    parameter that the old module shares with a module left in the model (a tied weight,
    such as an lm_head tied to the embedding) gets a warning: the tie breaks.
    """
    found: Dict[int, Tuple[nn.Module, List[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_target(module):
            found.setdefault(id(module), (module, []))[1].append(name)
    targets = []
    for module, names in found.values():
        chosen = [name for name in names if filter is None or filter(name, module)]
        if chosen and chosen != names:
            raise ValueError(f"filter accepts the {type(module).__name__} at {chosen} but not at "
                             f"{[n for n in names if n not in chosen]}, the same module: a module is "
                             f"converted at all of its names or at none")
        if chosen:
            targets.append((module, names))
    if any("" in names for _, names in targets):
        raise ValueError(f"model is itself {root_hint}")
    if copies_parameters:
        _warn_ties(model, targets)
    for module, names in targets:
        new = make(names[0], module)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


def _warn_ties(model: nn.Module, targets) -> None:
    """Warn for each parameter of a target that some other module of ``model`` shares."""
    holders: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    for module, names in targets:
        prefixes = tuple(f"{name}." for name in names)
        for local, p in module.named_parameters():
            others = [n for n in holders[id(p)] if not n.startswith(prefixes)]
            if others:
                warnings.warn(f"convert: {names[0]}.{local} is tied to {', '.join(others)}; the "
                              f"converted {names[0]} keeps its own copy, so the tie breaks (an "
                              f"update to one no longer reaches the other)", stacklevel=4)
