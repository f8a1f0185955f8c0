"""sparqle's autotuning policy, one place for every Triton kernel: ``autotune`` is
``triton.autotune`` with

- **one config when asked**: each kernel declares its tuning ``space`` and one small
  ``test`` config (:class:`Configs`). The interpreter, and any run with
  ``SPARQLE_AUTOTUNE=one`` in the environment before import (the GPU check's tests tier),
  use the test config alone: no tuning, one compile per specialisation.
- **bucketed keys**: the key arguments named in ``bucket`` (the token count M) are rounded
  up to a power of two, so that a new batch size does not re-tune the kernel and CUDA
  graphs and the tuning cache see a few shapes.
- **parallel compiles**: before a key is tuned on a GPU, every config is compiled at once
  on a thread pool (Triton's compiler releases the GIL), then each is timed.
- **pinned launches**: ``kernel.pinned(config)[grid](...)`` runs one config without tuning
  or reading the cache (a launcher that already knows the config, from
  :meth:`Autotuner.known_config`); with one config, or pinned, no key is computed per call.
- **nothing during CUDA-graph capture**: a key first met while a graph is being captured
  runs the space's first config untuned and is not remembered (timing would break the
  capture); call the op once outside capture to tune it.
- **planning**: inside :func:`planning`, kernels are not launched; the plan counts the
  autotune trials and the distinct compiles the calls would cause, so that a GPU run can
  say what it will cost before it starts, and keeps one :class:`Launch` per compile, from
  which the kernel can be compiled for any target without a GPU
  (sparqle.bench.kernel_specs).
"""
import concurrent.futures
import contextlib
import inspect
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner as _TritonAutotuner

from .. import _capture
from ._config import interpreting

AUTOTUNE_ENV = "SPARQLE_AUTOTUNE"  # "one": every kernel runs its test config only


class Configs(NamedTuple):
    """A kernel's autotune ``space`` and the single ``test`` config used when tuning is off."""
    space: List[triton.Config]
    test: triton.Config

    def active(self) -> List[triton.Config]:
        """The configs this process tunes over: the space, or ``[test]`` under the
        interpreter or ``SPARQLE_AUTOTUNE=one``."""
        return [self.test] if one_config() else list(self.space)


def one_config() -> bool:
    """True when every kernel runs its test config only (interpreter, SPARQLE_AUTOTUNE=one)."""
    mode = os.environ.get(AUTOTUNE_ENV, "full")
    if mode not in ("full", "one"):
        raise ValueError(f"{AUTOTUNE_ENV}={mode!r}: choose 'full' (tune every config) or 'one'")
    return interpreting() or mode == "one"


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0): the M of autotune and dispatch keys."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as Triton specialises it: its dtype, and its address (whose
    16-byte alignment Triton specialises on). Has ``dtype`` and ``data_ptr()`` like a tensor."""
    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


class Launch(NamedTuple):
    """A kernel call recorded by :func:`planning`: the autotuned kernel, one config it would
    run, and the call's arguments by name (every tensor as a :class:`TensorArg`; the
    config's meta-parameters not included)."""
    kernel: "Autotuner"
    config: triton.Config
    arguments: Dict[str, object]


@dataclass
class Plan:
    """What the calls made inside :func:`planning` would cost: one autotune trial per config
    per new key, one compile per distinct (kernel, config, specialisation)."""
    trials: Dict[str, int] = field(default_factory=dict)      # kernel -> configs to time
    compiles: Dict[Tuple, Launch] = field(default_factory=dict)  # compile signature -> a launch causing it
    keys: Set[Tuple] = field(default_factory=set)             # (kernel, key) tuned

    def compiles_by_kernel(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for signature in self.compiles:
            counts[signature[0]] = counts.get(signature[0], 0) + 1
        return counts


_plan: Optional[Plan] = None


@contextlib.contextmanager
def planning() -> Iterator[Plan]:
    """Count, instead of launching, every sparqle kernel called in the ``with`` block.
    Outputs of those kernels are left unwritten."""
    global _plan
    previous, _plan = _plan, Plan()
    try:
        yield _plan
    finally:
        _plan = previous


def _constexpr_names(fn) -> Set[str]:
    if hasattr(fn, "params"):
        return {p.name for p in fn.params if p.is_constexpr}
    python_fn = fn.fn  # the interpreter's wrapper
    return {name for name, p in inspect.signature(python_fn).parameters.items()
            if p.annotation is tl.constexpr or p.annotation == "tl.constexpr"}


def _specialisation(value):
    """How Triton specialises a run-time argument: pointers on 16-byte alignment, integers
    on equal to 1, divisible by 16 and the 64-bit range."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return ("1" if value == 1 else "%16" if value % 16 == 0 else "int",
                "i64" if not -2**31 <= value < 2**31 else "i32")
    return type(value).__name__


class Autotuner(_TritonAutotuner):
    """``triton.runtime.autotuner.Autotuner`` with sparqle's policy (module docstring)."""

    def __init__(self, fn, configs: Configs, key: Sequence[str], bucket: Sequence[str] = (),
                 reset_to_zero: Optional[Sequence[str]] = None):
        super().__init__(fn, fn.arg_names, configs.active(), list(key), reset_to_zero, None)
        self.space, self.test_config = list(configs.space), configs.test
        self.bucketed = frozenset(bucket)
        unknown = (set(key) | self.bucketed) - set(fn.arg_names)
        if unknown or not self.bucketed <= set(key):
            raise ValueError(f"autotune of {self.base_fn.__name__}: key {list(key)} and bucket "
                             f"{sorted(self.bucketed)} must name its arguments")
        self._constexprs = _constexpr_names(fn)
        self._warned_capture: Set[Tuple] = set()

    @property
    def name(self) -> str:
        return self.base_fn.__name__

    def tuning_key(self, arguments: Dict[str, object]) -> Tuple:
        """Triton's key (the key arguments' values, then every tensor's dtype), the bucketed
        arguments rounded up to a power of two."""
        key = [bucket(arguments[k]) if k in self.bucketed else arguments[k]
               for k in self.keys if k in arguments]
        key += [str(v.dtype) for v in arguments.values() if hasattr(v, "dtype")]
        return tuple(key)

    def known_config(self, *args, **kwargs) -> Optional[triton.Config]:
        """The config a call with these arguments would run without tuning anything: the only
        active one when tuning is off, else the one tuned for its key; None when untuned."""
        if len(self.configs) == 1:
            return self.configs[0]
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        return self.cache.get(self.tuning_key({k: v for k, v in named.items() if k in self.arg_names}))

    def pinned(self, config: triton.Config) -> "Pinned":
        """This kernel launched with ``config``, neither tuning nor reading the tuning cache:
        ``kernel.pinned(config)[grid](*args)``."""
        return Pinned(self, config)

    def run(self, *args, pinned: Optional[triton.Config] = None, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        config = pinned or (self.configs[0] if len(self.configs) == 1 else None)
        if config is None or _plan is not None:  # the key is read: tuning, or counting
            arguments = {k: v for k, v in {**self.nargs, **kwargs}.items() if k in self.arg_names}
            key = self.tuning_key(arguments)
            if _plan is not None:
                self._count(key, arguments, pinned)
                self.nargs = None
                return None
            config = self.cache.get(key)
        if config is None:
            if _capture.capturing():
                config = self._untuned_in_capture(key)
            else:
                config = self._tune(key, args, kwargs)
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        try:
            return self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    def _tune(self, key: Tuple, args, kwargs) -> triton.Config:
        configs = self.prune_configs(kwargs)
        if not interpreting():
            self._compile_all(configs, args, kwargs)
        start = time.perf_counter()
        timings = {config: self._bench(*args, config=config, **kwargs) for config in configs}
        self.bench_time = time.perf_counter() - start
        best = min(timings, key=timings.get)
        self.cache[key] = best
        self.configs_timings = timings
        # Trials may have written the output (split-K atomics): zero it again for the real run.
        self.pre_hook({**self.nargs, **kwargs, **best.all_kwargs()}, reset_only=True)
        return best

    def _compile_all(self, configs: List[triton.Config], args, kwargs) -> None:
        """Compile every config at once on a thread pool; a config that fails to compile is
        left to ``_bench``, which times it as infinitely slow."""
        from triton.runtime._async_compile import AsyncCompileMode
        compile_kwargs = {**kwargs, "warmup": True}
        workers = max(1, min(len(configs), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            with AsyncCompileMode(pool, ignore_errors=True):
                for config in configs:
                    try:
                        self.fn.run(*args, **compile_kwargs, **config.all_kwargs())
                    except Exception:  # noqa: BLE001 - _bench reports it
                        pass

    def _untuned_in_capture(self, key: Tuple) -> triton.Config:
        if key not in self._warned_capture:
            self._warned_capture.add(key)
            warnings.warn(f"sparqle: {self.name} met key {key} first inside CUDA graph capture, "
                          f"where nothing can be timed: it runs its first config untuned. Call the "
                          f"op once outside capture to tune it.", RuntimeWarning, stacklevel=3)
        return self.configs[0]

    def _count(self, key: Tuple, arguments: Dict[str, object], pinned: Optional[triton.Config] = None) -> None:
        configs = self.configs if pinned is None else [pinned]
        if len(configs) > 1 and key not in self.cache and (self.name, key) not in _plan.keys:
            _plan.keys.add((self.name, key))
            _plan.trials[self.name] = _plan.trials.get(self.name, 0) + len(configs)
        elif len(configs) > 1:
            configs = [self.cache.get(key, configs[0])]
        runtime = tuple((k, _specialisation(v)) for k, v in arguments.items() if k not in self._constexprs)
        constexprs = tuple((k, repr(v)) for k, v in arguments.items() if k in self._constexprs)
        recorded = {k: TensorArg(v.dtype, v.data_ptr()) if isinstance(v, torch.Tensor) else v
                    for k, v in arguments.items()}
        for config in configs:
            options = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
            _plan.compiles.setdefault((self.name, options, runtime, constexprs), Launch(self, config, recorded))


class Pinned(NamedTuple):
    """An autotuned kernel launched with one config (see :meth:`Autotuner.pinned`)."""
    kernel: Autotuner
    config: triton.Config

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.run(*args, grid=grid, warmup=False, pinned=self.config, **kwargs)


def autotune(configs: Configs, key: Sequence[str], bucket: Sequence[str] = (),
             reset_to_zero: Optional[Sequence[str]] = None):
    """Decorator: ``triton.autotune`` over ``configs`` with sparqle's policy (module
    docstring). ``reset_to_zero`` names every output the kernel accumulates into (atomics,
    split-K): it is zeroed before each trial and before the run that follows tuning."""
    def decorate(fn):
        return Autotuner(fn, configs, key, bucket, reset_to_zero)
    return decorate
