"""``convert``: swap a model's layers for sparse or quantized ones, in place: one format for
the whole model, or one setting per pattern of module names; and the summary of what it did."""
import fnmatch
import inspect
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

from torch import nn

from .calibrate import Calibration
from .nn._load import ConvertedLinear
from .nn._replace import Outcome, filtered, replace_modules
from .nn.window_attention import (SparseWindowBlock, WindowAttention, convert_sparse_windows,
                                  convert_window_attention)
from .registry import BY_CONVERSION

# Formats that swap whole modules rather than nn.Linear layers: the converter, what it
# swaps (for messages), and the sparqle module it swaps them for.
_MODULE_CONVERTERS = {
    "window_attention": (convert_window_attention, "Swin WindowAttention", WindowAttention),
    "sparse_windows": (convert_sparse_windows, "Swin block", SparseWindowBlock),
}
_LINEAR = "nn.Linear"
Setting = Union[None, str, Tuple[str, Mapping[str, Any]]]


def _refusal(fmt: str, linear: nn.Linear, options: Mapping[str, Any]) -> Optional[str]:
    refuse = BY_CONVERSION[fmt].refusal
    reason = refuse(linear, options) if refuse else None
    return None if reason is None else f"{fmt} cannot serve it: {reason}"


def _converter(fmt: str) -> Tuple[Callable[..., nn.Module], Dict[str, Any]]:
    """(the converter of an nn.Linear to format name ``fmt``, the options the name gives it)."""
    entry = BY_CONVERSION[fmt]
    return entry.module_class.from_linear, entry.converts[fmt]


def _check_options(fmt: str, options: Mapping[str, Any], where: str) -> None:
    """Options that ``fmt``'s converter takes, or ValueError naming ``where`` they come from."""
    fn, given = _converter(fmt)
    signature = inspect.signature(fn)
    try:
        signature.bind(None, **given, **options)
    except TypeError as error:
        takes = [p for p in list(signature.parameters)[1:] if p not in given]
        raise ValueError(f"{where}: format {fmt!r} takes the options {takes}, got {dict(options)} "
                         f"({error})") from None


def _convert_linear(fmt: str, options: Mapping[str, Any], linear: nn.Linear, name: str,
                    where: str, calibration: Optional[Calibration]) -> nn.Module:
    fn, given = _converter(fmt)
    methods = BY_CONVERSION[fmt].methods
    if calibration is not None and id(linear) in calibration.built:
        return calibration.built.pop(id(linear))
    try:
        if calibration is not None and methods is not None:
            return calibration.convert(fn, methods, name, linear, {**given, **options})
        return fn(linear, **given, **options)
    except (ValueError, TypeError) as error:
        raise type(error)(f"convert: {where}, layer {name!r}: {error}") from error


class _Rule(NamedTuple):
    pattern: str
    matches: Callable[[str], bool]
    fmt: Optional[str]
    options: Dict[str, Any]


def _rules(mapping: Mapping[str, Setting], shared: Mapping[str, Any]) -> List[_Rule]:
    """The mapping's patterns, checked, in order, each with its options over ``shared``."""
    rules = []
    for pattern, setting in mapping.items():
        if not isinstance(pattern, str):
            raise TypeError(f"the mapping's keys must be str patterns, got {type(pattern).__name__} {pattern!r}")
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {error}") from None
            matches = lambda name, regex=regex: regex.fullmatch(name) is not None  # noqa: E731
        else:
            matches = lambda name, glob=pattern: fnmatch.fnmatchcase(name, glob)  # noqa: E731
        if setting is None or isinstance(setting, str):
            fmt, options = setting, {}
        elif (isinstance(setting, tuple) and len(setting) == 2 and isinstance(setting[0], str)
              and isinstance(setting[1], Mapping)):
            fmt, options = setting[0], dict(setting[1])
        else:
            raise TypeError(f"pattern {pattern!r}: a setting is None (skip), a format name or "
                            f"(format name, dict of options), got {setting!r}")
        if fmt in _MODULE_CONVERTERS:
            raise ValueError(f"pattern {pattern!r}: {fmt!r} swaps whole {_MODULE_CONVERTERS[fmt][1]} "
                             f"modules, not nn.Linear layers: call convert(model, {fmt!r}) on its own")
        if fmt is not None and fmt not in BY_CONVERSION:
            raise ValueError(f"pattern {pattern!r}: format must be one of {sorted(BY_CONVERSION)} or None "
                             f"(skip), got {fmt!r}")
        if fmt is not None:
            options = {**shared, **options}
            _check_options(fmt, options, f"pattern {pattern!r}")
        elif options:
            raise ValueError(f"pattern {pattern!r} skips its layers and takes no options, got {options}")
        rules.append(_Rule(pattern, matches, fmt, options))
    return rules


@dataclass(frozen=True)
class ConvertedLayer:
    """One module that ``convert`` replaced: its ``name`` (the first one it is reached at),
    the ``format`` it is now in, and the bytes of its tensors (parameters and buffers, each
    counted once) before and after."""
    name: str
    format: str
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class ConvertSummary:
    """What one :func:`convert` call did: ``converted`` (one :class:`ConvertedLayer` per
    module replaced, in model order) and ``skipped`` (name -> why it was left as it is,
    for every module of the kind the call converts that it did not). ``str(summary)`` is
    what ``verbose=True`` prints."""
    converted: Tuple[ConvertedLayer, ...]
    skipped: Dict[str, str]

    @property
    def counts(self) -> Dict[str, int]:
        """Format -> how many modules were converted to it."""
        return dict(Counter(layer.format for layer in self.converted))

    @property
    def bytes_before(self) -> int:
        """The bytes of the converted modules' tensors before the call."""
        return sum(layer.bytes_before for layer in self.converted)

    @property
    def bytes_after(self) -> int:
        """The bytes of the tensors of the modules that replaced them."""
        return sum(layer.bytes_after for layer in self.converted)

    def __str__(self) -> str:
        total = len(self.converted) + len(self.skipped)
        lines = [f"sparqle.convert: {len(self.converted)} of {total} modules converted"
                 + (f"; their tensors {_size(self.bytes_before)} -> {_size(self.bytes_after)}"
                    if self.converted else "")]
        for fmt, count in self.counts.items():
            layers = [layer for layer in self.converted if layer.format == fmt]
            lines.append(f"  {fmt}: {count} module{'s' * (count != 1)}, "
                         f"{_size(sum(x.bytes_before for x in layers))} -> "
                         f"{_size(sum(x.bytes_after for x in layers))}")
        by_reason: Dict[str, List[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"  skipped {len(names)} ({reason}): {shown}")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _tensor_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _summary(outcomes: List[Outcome], format_of: Callable[[Outcome], str]) -> ConvertSummary:
    return ConvertSummary(
        tuple(ConvertedLayer(o.names[0], format_of(o), _tensor_bytes(o.module), _tensor_bytes(o.new))
              for o in outcomes if o.reason is None),
        {o.names[0]: o.reason for o in outcomes if o.reason is not None})


def _warn_if_nothing_converted(model: nn.Module, summary: ConvertSummary, kind: str,
                               converted_type: type) -> None:
    """A UserWarning saying why, when the call converted nothing."""
    if summary.converted:
        return
    if not summary.skipped:
        done = sum(isinstance(m, converted_type) for m in model.modules())
        why = f"the model has no {kind}" + (
            f" (it holds {done} {converted_type.__name__}: is it converted already?)" if done else "")
    else:
        reasons = Counter(summary.skipped.values())
        names = list(summary.skipped)[:3]
        why = (f"none of its {len(summary.skipped)} {kind} modules was taken: "
               + "; ".join(f"{count} {reason}" if count > 1 else reason for reason, count in reasons.items())
               + f" (names such as {', '.join(map(repr, names))})")
    warnings.warn(f"sparqle.convert converted nothing: {why}", UserWarning, stacklevel=3)


def _warn_unused_patterns(rules: List[_Rule], outcomes: List[Outcome]) -> None:
    used = {o.setting for o in outcomes}
    for rule in rules:
        if rule.fmt is not None and rule.pattern not in used:
            warnings.warn(f"sparqle.convert: pattern {rule.pattern!r} takes no nn.Linear (none of their "
                          f"names matches it, or an earlier pattern takes each one that does)",
                          UserWarning, stacklevel=3)


def convert(model: nn.Module, fmt: Union[str, Mapping[str, Setting]], *,
            filter: Optional[Callable[[str, nn.Module], bool]] = None, verbose: bool = False,
            return_summary: bool = False, calibrate: Optional[Callable[[nn.Module], object]] = None,
            sequential: bool = False, **options):
    """Replace, in place, every module of type exactly ``nn.Linear`` in ``model`` (subclasses
    such as MultiheadAttention's out_proj read ``.weight`` directly and are left alone) for
    which ``filter(name, module)`` is true with its ``fmt`` version, built with ``options``:
    ``convert(model, "csr", sparsity=0.9)``, ``convert(model, "bell", block_size=32,
    sparsity=0.8)``, ``convert(model, "int4", group_size=128)``, ``convert(model, "int8")``,
    ``convert(model, "fp8", granularity="row")``, ``convert(model, "2:4")`` (or another N:M
    pattern). Returns ``model``, or ``(model, summary)`` with ``return_summary=True`` (a
    :class:`ConvertSummary`: modules converted per format, modules skipped and why, bytes
    of their tensors before and after); ``verbose=True`` prints the summary.

    Per layer: ``fmt`` may be a mapping from patterns of module names to settings, e.g.
    ``{"*.mlp.*": "int4", "re:.*\\.attn\\.(qkv|proj)": ("fp8", {"granularity": "row"}),
    "lm_head": None}``. A pattern is a glob matched against the whole dotted name
    (``fnmatch``: ``*`` matches any characters, dots included, ``?`` one, ``[...]`` a set),
    or, after ``re:``, a regular expression that must match the whole name. Each layer takes
    the setting of the **first** pattern it matches, in the mapping's order (put the
    specific ones first); a layer that no pattern matches is left as it is. A setting is a
    format name, ``(format name, options)``, or None: the layer is left as it is. The
    keyword ``options`` go to every pattern's format, under the pattern's own. An unknown
    format, or an option the format does not take, raises ValueError naming the pattern,
    before anything is converted.

    A layer whose shape the format cannot serve (CSR keeps int32 indices, so at most
    2^31 - 1 weights; every other format serves every shape) is left as it is and listed,
    with the reason, in the summary's ``skipped``. A call that converts nothing (a model
    without such modules, a filter or patterns that match none, a model converted already)
    warns (UserWarning) and says why; so does a pattern that takes no layer.

    One layer of each setting is converted before any is put in the model, so that a
    setting the format refuses raises with the model untouched. A module reached at
    several names is converted once and the converted module put at every name; a weight
    or bias tied to another module (an lm_head tied to the embedding) is copied into the
    converted module, and a warning says that the tie breaks.

    Swin models: ``convert(model, "window_attention")`` swaps every Swin WindowAttention for
    :class:`sparqle.nn.WindowAttention`; ``convert(model, "sparse_windows", keep_ratio=0.5)``
    wraps every Swin block in :class:`sparqle.nn.SparseWindowBlock` (a float, or a list of
    one ratio per stage). Attention whose windows hold more than 256 tokens, or whose head
    dim passes 128, is more than the fused kernel takes: it is skipped and reported.

    Calibration (sparse formats, int4, int8; docs/calibration.md): ``calibrate=run`` calls
    ``run(model)`` once before anything is replaced (for example ``lambda m:
    m.encode(sentences)``), records the input statistics of every nn.Linear ``filter``
    accepts (sparqle.calibrate), and converts with them; the option ``method`` names the
    criterion: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ``"admm"`` for the sparse formats,
    ``"minmax"``, ``"mse"``, ``"hqq"`` (no data needed), ``"gptq"``, ``"awq"`` for int4,
    ``"absmax"``, ``"gptq"``, ``"smoothquant"`` (W8A8: per-input-channel scales that move
    the activations' outliers into the weight) for int8 (default: the first without
    ``calibrate``, sparsegpt or gptq with it). ``"awq"`` (one int4 format for the model, sparqle.awq) first folds
    per-input-channel scales into the norms and linears that feed the layers, in place: the
    float model is unchanged as a function, and stays rescaled if a later step raises.
    ``"smoothquant"`` in a one-format int8 conversion (not sequential) folds its scales the
    same way where the model allows; elsewhere (a mapping, ``sequential``, a layer no fold
    reaches) each layer keeps its own. In a mapping, the layers of other formats are
    converted as without it. ``sparqle.calibrate.report(model)`` then
    tables each layer's output error on the calibration inputs. ``sequential=True``
    (not with "awq") converts the layers in the order ``run`` calls them, each for the
    inputs the layers converted before it give and toward what the float layer gives on
    the float inputs, calling ``run`` twice per stage of layers that share an input
    (sparqle.calibrate, "Sequential"): ``run`` must give the model the same batches each
    time."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    calibration = None
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be a bool, got {type(sequential).__name__}")
    if sequential and calibrate is None:
        raise ValueError("sequential=True converts layer by layer on calibration data: it needs calibrate=run")
    if calibrate is not None:
        calibrated = sorted(name for name, entry in BY_CONVERSION.items() if entry.methods is not None)
        if not (isinstance(fmt, Mapping) or fmt in calibrated):
            raise ValueError(f"calibrate applies to the formats {calibrated} (or a mapping "
                             f"with them), not {fmt!r}")
        fold, fold_options = None, None
        if options.get("method") == "awq":
            if fmt != "int4":
                raise ValueError(f"method='awq' rescales the model for one int4 conversion: "
                                 f"convert(model, 'int4', calibrate=run, method='awq'), not fmt={fmt!r}")
            _check_options(fmt, options, f"fmt {fmt!r}")
            fold = "awq"
            fold_options = {"group_size": options.get("group_size", 128), "symmetric": options.get("symmetric", False)}
        elif (options.get("method") == "smoothquant" and fmt == "int8" and not sequential
              and options.get("activation", "dynamic") == "dynamic"):
            _check_options(fmt, options, f"fmt {fmt!r}")
            fold = "smoothquant"  # where a fold exists; the other layers keep their own s
        calibration = Calibration(model, filter, calibrate, fold, fold_options, sequential)
    if isinstance(fmt, Mapping):
        rules = _rules(fmt, options)
        by_pattern = {rule.pattern: rule for rule in rules}

        def decide(name: str, linear: nn.Module):
            if filter is not None and not filter(name, linear):
                return None, "the filter rejects it"
            rule = next((rule for rule in rules if rule.matches(name)), None)
            if rule is None:
                return None, "no pattern matches it"
            if rule.fmt is None:
                return rule.pattern, f"pattern {rule.pattern!r} skips it"
            return rule.pattern, _refusal(rule.fmt, linear, rule.options)

        def make(name: str, linear: nn.Module, pattern: str) -> nn.Module:
            rule = by_pattern[pattern]
            return _convert_linear(rule.fmt, rule.options, linear, name, f"pattern {pattern!r}", calibration)

        if calibration is not None and calibration.sequential:
            _convert_sequentially(model, calibration, decide, make, lambda setting: by_pattern[setting].fmt)
        outcomes = replace_modules(model, _is_linear, decide, make, root_hint=_ROOT_HINT, copies_parameters=True)
        summary = _summary(outcomes, lambda o: by_pattern[o.setting].fmt)
        if summary.converted:  # else the warning below says why
            _warn_unused_patterns(rules, outcomes)
        kind, converted_type = _LINEAR, ConvertedLinear
    elif isinstance(fmt, str) and fmt in _MODULE_CONVERTERS:
        convert_modules, kind, converted_type = _MODULE_CONVERTERS[fmt]
        summary = _summary(convert_modules(model, filter=filter, **options), lambda o: fmt)
    elif isinstance(fmt, str) and fmt in BY_CONVERSION:
        _check_options(fmt, options, f"fmt {fmt!r}")
        decide = filtered(filter, fmt, lambda linear: _refusal(fmt, linear, options))

        def make(name: str, linear: nn.Module, setting: str) -> nn.Module:
            return _convert_linear(fmt, options, linear, name, f"fmt {fmt!r}", calibration)

        if calibration is not None and calibration.sequential:
            _convert_sequentially(model, calibration, decide, make, lambda setting: setting)
        outcomes = replace_modules(model, _is_linear, decide, make, root_hint=_ROOT_HINT, copies_parameters=True)
        summary = _summary(outcomes, lambda o: fmt)
        kind, converted_type = _LINEAR, ConvertedLinear
    else:
        raise ValueError(f"fmt must be one of {sorted([*BY_CONVERSION, *_MODULE_CONVERTERS])} or a mapping "
                         f"from patterns of module names to settings, got {fmt!r}")
    _warn_if_nothing_converted(model, summary, kind, converted_type)
    if verbose:
        print(summary)
    return (model, summary) if return_summary else model


_ROOT_HINT = "an nn.Linear: convert its parent, or use sparqle.nn.SparseLinear.from_linear"


def _convert_sequentially(model: nn.Module, calibration: Calibration, decide, make,
                          fmt_of: Callable[[Any], str]) -> None:
    """Build, with ``calibration.convert_sequentially``, every nn.Linear that ``decide``
    converts (by ``make``, from its target weight where its format is calibrated, from
    its float weight otherwise); replace_modules then puts the built modules in."""
    found: Dict[int, Tuple[List[str], nn.Linear]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_linear(module):
            found.setdefault(id(module), ([], module))[0].append(name)
    settings = {}
    for key, (names, module) in found.items():
        setting, reason = decide(names[0], module)
        if reason is None:
            settings[key] = setting

    def build(linear: nn.Linear, target: nn.Linear) -> nn.Module:
        setting = settings[id(linear)]
        calibrated = BY_CONVERSION[fmt_of(setting)].methods is not None
        return make(found[id(linear)][0][0], target if calibrated else linear, setting)

    calibration.convert_sequentially(model, {key: found[key] for key in settings}, build)


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear
