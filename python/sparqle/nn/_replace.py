"""Swapping modules of a model in place, as ``sparqle.convert`` does."""
import warnings
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple

from torch import nn

# How one module is to be converted: (setting, reason). ``setting`` names the conversion
# (a hashable key, None when none applies); ``reason`` says why the module is left as it
# is (None: it is converted with that setting).
Decision = Tuple[Optional[Hashable], Optional[str]]


class Outcome(NamedTuple):
    """What ``replace_modules`` did with one module of the model."""
    names: List[str]                # every name it is reached at, in model order
    module: nn.Module               # the module as it was
    setting: Optional[Hashable]     # the setting it was (or would have been) converted with
    reason: Optional[str]           # why it was left as it is; None: it was converted
    new: Optional[nn.Module]        # what replaced it (None when left as it is)


def replace_modules(model: nn.Module, is_target: Callable[[nn.Module], bool],
                    decide: Callable[[str, nn.Module], Decision],
                    make: Callable[[str, nn.Module, Hashable], nn.Module], *, root_hint: str,
                    copies_parameters: bool) -> List[Outcome]:
    """Replace, in place, every module of ``model`` for which ``is_target(module)`` and
    whose ``decide(name, module)`` gives no reason to leave it with
    ``make(name, module, setting)``; returns one :class:`Outcome` per target, in model order.

    A module reached at several names (used twice in a Sequential, or registered under two
    attributes) is made once, from its first name, and the result is put at every name;
    a module decided differently at some of its names is refused. One module of each
    setting is made before any is put in the model, so that a setting its maker refuses
    raises with the model untouched. When the new modules hold copies of the old ones'
    parameters (``copies_parameters``), a parameter that the old module shares with a
    module left in the model (a tied weight, such as an lm_head tied to the embedding) gets
    a warning: the tie breaks.
    """
    found: Dict[int, Tuple[nn.Module, List[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_target(module):
            found.setdefault(id(module), (module, []))[1].append(name)
    planned = []
    for module, names in found.values():
        decisions = {name: decide(name, module) for name in names}
        if len(set(decisions.values())) > 1:
            said = "; ".join(f"{n!r}: {reason or f'convert with {setting!r}'}"
                             for n, (setting, reason) in decisions.items())
            raise ValueError(f"the {type(module).__name__} at {names} is one module, decided differently "
                             f"by name ({said}): a module is converted at all of its names, with one "
                             f"setting, or at none")
        planned.append(Outcome(names, module, *decisions[names[0]], None))
    if any("" in p.names for p in planned if p.reason is None):
        raise ValueError(f"model is itself {root_hint}")
    if copies_parameters:
        _warn_ties(model, [(p.module, p.names) for p in planned if p.reason is None])
    first_of_setting = {}
    for i, p in enumerate(planned):
        if p.reason is None and p.setting not in first_of_setting:
            first_of_setting[p.setting] = i
    made = {i: make(planned[i].names[0], planned[i].module, planned[i].setting)
            for i in first_of_setting.values()}
    outcomes = []
    for i, p in enumerate(planned):
        if p.reason is not None:
            outcomes.append(p)
            continue
        new = made.pop(i) if i in made else make(p.names[0], p.module, p.setting)
        for name in p.names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        outcomes.append(p._replace(new=new))
    return outcomes


def filtered(filter: Optional[Callable[[str, nn.Module], bool]], setting: Hashable,
             refusal: Callable[[nn.Module], Optional[str]] = lambda module: None
             ) -> Callable[[str, nn.Module], Decision]:
    """The ``decide`` of a conversion with one ``setting`` for every module that
    ``filter(name, module)`` accepts (every module when None) and that ``refusal(module)``
    (the reason the setting cannot serve it, or None) does not refuse."""
    def decide(name: str, module: nn.Module) -> Decision:
        if filter is not None and not filter(name, module):
            return setting, "the filter rejects it"
        return setting, refusal(module)
    return decide


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
