"""End to end: decode and prefill throughput of a Hugging Face ``LlamaForCausalLM`` and the
image throughput of Swin, each converted with sparqle, against the unconverted model in the
same run (``sparqle bench --op e2e``).

Llama (random weights, built from a config): every nn.Linear but ``lm_head`` converted with
each format of :func:`llama_formats` (int4, int8, FP8, 2:4, CSR and Blocked-ELL at the
sparsities named there), against the model in its own dtype (``dense``):

- decode tokens/s = batch * steps / time of ``steps`` greedy decode steps (each step's
  argmax is the next step's input) over a static KV cache holding ``context`` prompt tokens,
  at batch 1 and 16: ``eager`` (one Python call of the model per step) and ``graph`` (one
  decode step captured in a CUDA graph after warm-up, then replayed ``steps`` times; the
  replay's first logits are checked against an eager step's, ``replay_error``);
- prefill tokens/s = tokens / time of one forward over ``prefill`` tokens at batch 1;
- peak memory: ``peak_mb`` of that prefill (the CUDA allocator's peak; the resident set on a
  CPU), ``weights_mb`` the model's parameters and buffers.

Swin: timm's Swin-T and Swin-B (224 px) on a GPU, ``swin_reference.TinySwin`` (timm's layout,
28 px) on a CPU, as they are (``timm``), with every window attention on sparqle's fused
kernel (``window_attention``) and with SparseViT at keep ratios 0.75, 0.5 and 0.25
(``sparse_windows-<keep>``): images/s of one forward, eager and (GPU) ``torch.compile``d.

On a GPU the models are bf16 and ``auto`` picks Triton; on a CPU they are tiny, fp32, on the
torch path (``backend: torch`` in the JSON: the Triton interpreter is left out, it would
time NumPy). Each point that fails records its error and the run goes on.
"""
import contextlib
import copy
import gc
import importlib.util
import inspect
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

import sparqle

from . import harness, swin_reference

OP = "e2e"
KEYS = ("model", "variant", "batch", "metric", "timing")

# Llama-3-8B's shapes, and a tiny Llama for the CPU and the tests.
LLAMA_CONFIGS = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "llama-tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
SWIN_MODELS = {"swin-t": "swin_tiny_patch4_window7_224", "swin-b": "swin_base_patch4_window7_224"}
KEEP_RATIOS = (0.75, 0.5, 0.25)


@dataclass(frozen=True)
class Setting:
    """How one run measures: sizes per device and quick or full."""
    llama: str
    layers: Optional[int]      # None: the config's; else that many decoder layers
    batches: Tuple[int, ...]
    context: int               # prompt tokens in the KV cache before decode is timed
    steps: int                 # decode steps timed per repeat
    repeats: int
    prefill: int
    swin: Tuple[str, ...]
    swin_batch: int
    compiled: bool             # also time torch.compile'd Swin
    dtype: torch.dtype


def setting(quick: bool) -> Setting:
    """GPU: Llama-3-8B's shapes in bf16 (quick: 4 of its 32 layers, Swin-T only); CPU: the
    tiny Llama and TinySwin in fp32."""
    if harness.device().type == "cuda":
        return Setting("llama-3-8b", 4 if quick else None, (1, 16), 128, 64 if quick else 128,
                       3, 2048, ("swin-t",) if quick else ("swin-t", "swin-b"), 64, not quick,
                       torch.bfloat16)
    return Setting("llama-tiny", None, (1, 16) if not quick else (1,), 8, 8, 3, 64 if not quick else 32,
                   ("swin-reference",), 4, False, torch.float32)


def llama_formats(tiny: bool) -> Dict[str, Tuple[str, dict]]:
    """variant -> (sparqle.convert format, its options)."""
    return {
        "int4": ("int4", {"group_size": 32 if tiny else 128}),
        "int8": ("int8", {}),
        "fp8": ("fp8", {}),
        "2:4": ("2:4", {}),
        "csr-0.9": ("csr", {"sparsity": 0.9}),
        "bell-0.8": ("bell", {"sparsity": 0.8, "block_size": 16 if tiny else 64}),
    }


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llama(name: str, layers: Optional[int], dtype: torch.dtype, device) -> nn.Module:
    """A LlamaForCausalLM with random weights (the config's init) in ``dtype`` on ``device``,
    eval mode, SDPA attention, untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM
    options = dict(LLAMA_CONFIGS[name], tie_word_embeddings=False)
    if layers is not None:
        options["num_hidden_layers"] = layers
    config = LlamaConfig(**options)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def convert_llama(model: nn.Module, fmt: str, options: dict) -> nn.Module:
    """``model`` with every nn.Linear but lm_head converted to ``fmt`` (in place)."""
    return sparqle.convert(model, fmt, filter=lambda name, m: not name.endswith("lm_head"), **options)


def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` names the parameter ``name`` (transformers' signatures vary by version)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def static_cache(model: nn.Module, batch: int, length: int):
    """transformers' StaticCache for ``batch`` sequences of ``length`` tokens, whichever
    constructor this transformers version has (config and max_cache_len everywhere; batch
    size, device and dtype where it takes them, else set on first use)."""
    from transformers import StaticCache
    accepted = inspect.signature(StaticCache.__init__).parameters
    wanted = {"config": model.config, "max_cache_len": length, "device": model.device, "dtype": model.dtype,
              "max_batch_size" if "max_batch_size" in accepted else "batch_size": batch}
    return StaticCache(**{k: v for k, v in wanted.items() if k in accepted})


class Decoder:
    """Greedy decode of ``batch`` sequences over a static KV cache of ``length`` tokens.

    ``prefill(ids)`` runs the prompt [batch, P] eagerly and leaves the cache holding it;
    ``step()`` feeds ``self.ids`` [batch, 1] at position ``self.position`` and writes the
    argmax back into ``self.ids`` and position + 1 into ``self.position``, all on the device
    (so that a CUDA graph of ``step`` replays autoregressively). The cache is passed as
    ``past_key_values`` with ``cache_position`` where the model names them (transformers
    4.x), else as ``cache`` (5.x, which counts positions in the cache itself).
    """

    def __init__(self, model: nn.Module, batch: int, length: int):
        self.model, self.batch = model, batch
        self.cache = static_cache(model, batch, length)
        device = model.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.logits: Optional[torch.Tensor] = None
        self._cache_position = _accepts(model.forward, "cache_position")
        self._cache_name = "past_key_values" if _accepts(model.forward, "past_key_values") else "cache"

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "position_ids": positions.view(1, -1).expand(ids.shape[0], -1),
                  self._cache_name: self.cache, "use_cache": True}
        if self._cache_position:
            kwargs["cache_position"] = positions
        return self.model(**kwargs).logits[:, -1]

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Empty the cache, run ``prompt`` [batch, P]; the next step decodes at position P."""
        self.cache.reset()
        logits = self._forward(prompt, torch.arange(prompt.shape[1], device=prompt.device))
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.position.fill_(prompt.shape[1])
        return logits

    def step(self) -> torch.Tensor:
        logits = self._forward(self.ids, self.position)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.position.add_(1)
        self.logits = logits
        return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def graph(fn: Callable[[], object]) -> Tuple["torch.cuda.CUDAGraph", object]:
    """``fn`` captured in a CUDA graph after two warm-up calls on a side stream (which
    autotune and measure dispatch outside capture): the graph, and what the captured call
    returned (its tensors hold each replay's result)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        out = fn()
    return captured, out


def decode(model: nn.Module, batch: int, s: Setting, timing: str) -> dict:
    """Decode tokens/s at ``batch`` (see the module doc); ``timing`` eager or graph."""
    device = model.device
    decoder = Decoder(model, batch, s.context + s.steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (batch, s.context), device=device)
    run = decoder.step
    extra = {}
    with torch.no_grad():
        decoder.prefill(prompt)
        eager_logits = decoder.step().clone()
        if timing == "graph":
            step_graph, _ = graph(decoder.step)
            decoder.prefill(prompt)
            step_graph.replay()
            _sync(device)
            scale = eager_logits.abs().max().clamp(min=1e-30)
            extra["replay_error"] = float((decoder.logits.float() - eager_logits.float()).abs().max() / scale)
            run = step_graph.replay
        times = []
        for _ in range(s.repeats):
            decoder.prefill(prompt)
            _sync(device)
            start = time.perf_counter()
            for _ in range(s.steps):
                run()
            _sync(device)
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {"throughput": batch * s.steps / seconds, "unit": "tokens/s",
            "time_ms": seconds / s.steps * 1e3, **extra}


def prefill(model: nn.Module, s: Setting) -> dict:
    """Prefill tokens/s of one forward over ``s.prefill`` tokens at batch 1 (logits of the
    last token only, as generate computes them), and its peak memory."""
    ids = torch.randint(0, model.config.vocab_size, (1, s.prefill), device=model.device)
    kwargs = {"use_cache": False}
    if _accepts(model.forward, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1

    def fn():
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits
    ms = harness.time_ms(lambda _: fn, 1)
    peak = harness.peak_bytes(fn)
    return {"throughput": s.prefill / (ms * 1e-3), "unit": "tokens/s", "time_ms": ms,
            "peak_mb": None if peak is None else peak / 2**20}


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:400]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def llama_rows(s: Setting, variants: Optional[List[str]] = None, progress: Callable[[str], None] = print) -> List[dict]:
    """Every Llama point of setting ``s``: the dense model and each format of
    :func:`llama_formats` (or those named in ``variants``)."""
    device = harness.device()
    name = s.llama if s.layers is None else f"{s.llama} ({s.layers} layers)"
    rows: List[dict] = []
    try:
        base = build_llama(s.llama, s.layers, s.dtype, device)
    except Exception as error:  # noqa: BLE001 - e.g. transformers missing: reported
        return [{"model": name, "variant": "dense", "batch": None, "metric": "build", "timing": None,
                 "error": _error(error)}]
    formats = {"dense": None, **llama_formats(s.llama == "llama-tiny")}
    for variant in variants or formats:
        spec = formats[variant]
        common = {"model": name, "variant": variant, "dtype": str(s.dtype).replace("torch.", ""),
                  "format": None if spec is None else spec[0], "options": None if spec is None else spec[1]}
        try:
            model = base if spec is None else convert_llama(copy.deepcopy(base), *spec)
        except Exception as error:  # noqa: BLE001
            rows.append({**common, "batch": None, "metric": "convert", "timing": None, "error": _error(error)})
            continue
        weights_mb = model_bytes(model) / 2**20
        points = [(b, "decode", t) for b in s.batches for t in ("eager", "graph")] + [(1, "prefill", "eager")]
        for batch, metric, timing in points:
            row = {**common, "batch": batch, "metric": metric, "timing": timing, "weights_mb": weights_mb}
            if timing == "graph" and device.type != "cuda":
                rows.append({**row, "missing": "CUDA graphs need a CUDA device"})
                continue
            try:
                row.update(decode(model, batch, s, timing) if metric == "decode" else prefill(model, s))
            except Exception as error:  # noqa: BLE001 - a finding, reported in the row
                row["error"] = _error(error)
            rows.append(row)
            progress(f"{name} {variant} {metric} batch {batch} {timing}: "
                     + (f"{row['throughput']:.1f} {row['unit']}" if "throughput" in row else row.get("error", row.get("missing"))))
        if model is not base:
            del model
            _free(device)
    del base
    _free(device)
    return rows


def _timm():
    if importlib.util.find_spec("timm") is None:
        return None
    try:
        import timm
        return timm
    except Exception:  # noqa: BLE001 - timm needs torchvision, which may not import
        return None


def build_swin(name: str, dtype: torch.dtype, device) -> Tuple[nn.Module, torch.Tensor]:
    """A Swin model with random weights and a batch-independent image shape [3, side, side]:
    timm's ``name`` at 224 px, or ``swin-reference`` (bench/swin_reference.TinySwin, 28 px)."""
    torch.manual_seed(0)
    if name == "swin-reference":
        model, side = swin_reference.TinySwin(), 28
    else:
        timm = _timm()
        if timm is None:
            raise RuntimeError("timm does not import here")
        model, side = timm.create_model(SWIN_MODELS[name], pretrained=False), 224
    return model.to(device=device, dtype=dtype).eval(), torch.Size((3, side, side))


def swin_variants() -> Dict[str, Callable[[nn.Module], nn.Module]]:
    """variant -> what it does to a (copied) Swin model."""
    variants: Dict[str, Callable[[nn.Module], nn.Module]] = {
        "timm": lambda m: m,
        "window_attention": lambda m: sparqle.convert(m, "window_attention"),
    }
    for keep in KEEP_RATIOS:
        variants[f"sparse_windows-{keep}"] = lambda m, keep=keep: sparqle.convert(m, "sparse_windows", keep_ratio=keep)
    return variants


def swin_rows(s: Setting, progress: Callable[[str], None] = print) -> List[dict]:
    device = harness.device()
    rows: List[dict] = []
    for name in s.swin:
        try:
            base, image = build_swin(name, s.dtype, device)
        except Exception as error:  # noqa: BLE001
            rows.append({"model": name, "variant": "timm", "batch": s.swin_batch, "metric": "build",
                         "timing": None, "error": _error(error)})
            continue
        x = torch.randn(s.swin_batch, *image, device=device, dtype=s.dtype)
        for variant, make in swin_variants().items():
            common = {"model": name, "variant": variant, "batch": s.swin_batch, "metric": "images",
                      "dtype": str(s.dtype).replace("torch.", ""), "image": list(image)}
            try:
                model = make(copy.deepcopy(base))
            except Exception as error:  # noqa: BLE001
                rows.append({**common, "timing": None, "metric": "convert", "error": _error(error)})
                continue
            for timing in ("eager", "compiled"):
                row = {**common, "timing": timing}
                if timing == "compiled" and not s.compiled:
                    rows.append({**row, "missing": "compiled timings are taken on a GPU, full run"})
                    continue
                try:
                    run = model if timing == "eager" else torch.compile(model)

                    def fn(run=run):
                        with torch.no_grad():
                            return run(x)
                    fn()
                    ms = harness.time_ms(lambda _: fn, 1)
                    peak = harness.peak_bytes(fn)
                    row.update(throughput=s.swin_batch / (ms * 1e-3), unit="images/s", time_ms=ms,
                               peak_mb=None if peak is None else peak / 2**20)
                except Exception as error:  # noqa: BLE001
                    row["error"] = _error(error)
                rows.append(row)
                progress(f"{name} {variant} {timing}: "
                         + (f"{row['throughput']:.1f} images/s" if "throughput" in row else row.get("error", row.get("missing"))))
            del model
            _free(device)
    return rows


BASELINES = {"dense", "timm"}


def _speedups(rows: List[dict]) -> None:
    """``speedup``: a row's throughput over its baseline's (dense Llama, timm Swin) at the
    same model, batch, metric and timing."""
    base = {(r["model"], r["batch"], r["metric"], r["timing"]): r.get("throughput")
            for r in rows if r["variant"] in BASELINES}
    for r in rows:
        b = base.get((r["model"], r["batch"], r["metric"], r["timing"]))
        r["speedup"] = r["throughput"] / b if r.get("throughput") and b else None


def report(quick: bool, progress: bool = True, s: Optional[Setting] = None) -> dict:
    """Every e2e point of :func:`setting` (or ``s``) as a report (bench/results schema:
    stamp, notes, results)."""
    s = s or setting(quick)
    say = print if progress else (lambda *_: None)
    on_cpu = harness.device().type != "cuda"
    with sparqle.use_backend("torch") if on_cpu else contextlib.nullcontext():
        rows = llama_rows(s, progress=say) + swin_rows(s, progress=say)
        stamp = harness.stamp()
    _speedups(rows)
    return {**stamp, "kind": OP, "setting": {k: (str(v) if isinstance(v, torch.dtype) else v)
                                              for k, v in s.__dict__.items()},
            "notes": "throughput: tokens/s (decode: batch * steps / time of the steps; prefill: "
                     "tokens / time of one forward) or images/s; time_ms: per decode step, per "
                     "forward otherwise (median over repeats); speedup: throughput over the "
                     "dense Llama's (timm's Swin) at the same model, batch, metric and timing; "
                     "graph: one decode step captured in a CUDA graph and replayed, replay_error "
                     "its first logits' max difference from an eager step's over their max; "
                     "peak_mb: the memory one prefill (forward) holds at its peak beyond what was "
                     "held before; weights_mb: parameters and buffers. "
                     + ("CPU: tiny models on the torch path (the Triton interpreter left out)."
                        if on_cpu else ""),
            "results": rows}


def _cell(value, fmt: str = "{:.1f}") -> str:
    return "" if value is None else fmt.format(value)


def cells(report_: dict) -> List[List[str]]:
    """The report's table: a header row, then one row per result (harness.cells_table and
    cells_markdown print it)."""
    rows = [["model", "variant", "batch", "metric", "timing", "throughput", "unit", "speed-up",
             "ms", "peak MB", "weights MB", "note"]]
    for r in report_["results"]:
        note = r.get("error") or r.get("missing") or ""
        if r.get("replay_error") is not None:
            note = f"replay error {r['replay_error']:.1e}" + (f"; {note}" if note else "")
        rows.append([str(r["model"]), str(r["variant"]), str(r.get("batch")), str(r["metric"]),
                     str(r.get("timing")), _cell(r.get("throughput")), r.get("unit", ""),
                     _cell(r.get("speedup"), "{:.2f}x"), _cell(r.get("time_ms"), "{:.3f}"),
                     _cell(r.get("peak_mb")), _cell(r.get("weights_mb")), note.replace("|", "/")[:120]])
    return rows


def plot(report_: dict, path: str) -> None:
    """Speed-up over the baseline per variant, one panel per (model, metric, batch, timing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels: Dict[tuple, List[Tuple[str, float]]] = {}
    for r in report_["results"]:
        if r.get("speedup") is not None and r["variant"] not in BASELINES:
            panels.setdefault((r["model"], r["metric"], r["batch"], r["timing"]), []).append(
                (r["variant"], r["speedup"]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 4), squeeze=False)
    for ax, (key, bars) in zip(axes[0], sorted(panels.items(), key=str)):
        names, values = zip(*bars)
        ax.bar(names, values)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(title=" ".join(map(str, key)), ylabel="speed-up (x)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.suptitle(f"end to end on {report_['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# The GPU check's headline points (bench/headline.py, family "e2e")
# ------------------------------------------------------------------------------------------

# (model, layers, dtype, Swin's batch) -> ((the dense model, Swin's image shape), its
# measurements by (batch, timing)): the headline points of one model share its baseline.
_dense: Dict[tuple, Tuple[Tuple[nn.Module, Optional[torch.Size]], Dict[tuple, dict]]] = {}
# A graph replay agrees with an eager step within this fraction of the logits' largest
# magnitude (one model, the same kernels: only a different tuned config could differ).
REPLAY_AGREEMENT = 1e-2


def _headline_setting(params: dict, dry_run: bool) -> Setting:
    dtype = getattr(torch, params["dtype"])
    is_llama = params["model"] in LLAMA_CONFIGS
    return Setting(params["model"] if is_llama else "llama-tiny", params.get("layers"), (params["batch"],),
                   4 if dry_run else 128, 2 if dry_run else 64, 1 if dry_run else 3, 0,
                   () if is_llama else (params["model"],), params["batch"], False, dtype)


def _headline_row(params: dict, impl: str, timing: str, goals: dict, **fields) -> dict:
    """A row of the GPU check's bench.json (its _row's keys)."""
    shape = " ".join(f"{k}={v}" for k, v in params.items() if k not in ("dtype", "model"))
    return {"op": OP, "shape": f"{params['model']} {shape}", **params, "impl": impl, "timing": timing,
            "time_ms": None, "tflops": None, "gbs": None, "roof_fraction": None, "sparqle_speedup": None,
            "goal": goals.get(impl), "error": None, "missing": None, "agreement": None, "agrees": None,
            **fields}


def _measured(measure: Callable[[], dict]) -> dict:
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - a finding, reported in the row
        return {"error": _error(error)}


def headline_rows(params: dict, goals: dict, dry_run: bool) -> List[dict]:
    """One headline point: ``params`` = model (a Llama config or a Swin), layers (Llama),
    variant (a format of :func:`llama_formats`, or a Swin variant), batch and dtype; rows for
    sparqle (the converted model) and ``dense`` (Llama) or ``timm`` (Swin) per timing, the
    baseline's ``sparqle_speedup`` = its time per token (image batch) over sparqle's. Graph
    rows (CUDA) carry the replay's agreement with an eager step."""
    s = _headline_setting(params, dry_run)
    device = harness.device()
    is_llama = params["model"] in LLAMA_CONFIGS
    baseline = "dense" if is_llama else "timm"
    timings = ("eager", "graph") if is_llama and device.type == "cuda" else ("eager",)
    if is_llama and importlib.util.find_spec("transformers") is None:
        return [_headline_row(params, impl, "eager", goals, missing="transformers is not installed")
                for impl in ("sparqle", baseline)]
    key = (params["model"], params.get("layers"), params["dtype"], params["batch"] if not is_llama else None)
    try:
        if key not in _dense:
            _dense.clear()
            _free(device)
            _dense[key] = ((build_llama(s.llama, s.layers, s.dtype, device), None) if is_llama
                           else build_swin(params["model"], s.dtype, device)), {}
        (dense, image), dense_rows = _dense[key]
        if is_llama:
            model = convert_llama(copy.deepcopy(dense), *llama_formats(s.llama == "llama-tiny")[params["variant"]])
        else:
            model = swin_variants()[params["variant"]](copy.deepcopy(dense))
            x = torch.randn(s.swin_batch, *image, device=device, dtype=s.dtype)
    except Exception as error:  # noqa: BLE001
        return [_headline_row(params, "sparqle", "eager", goals, error=_error(error))]

    def measure(m: nn.Module, timing: str) -> dict:
        if is_llama:
            return decode(m, params["batch"], s, timing)
        run = lambda: m(x)  # noqa: E731
        with torch.no_grad():
            run()  # warm-up (autotuning, the shift masks)
            return {"time_ms": harness.time_ms(lambda _: run, 1) if not dry_run else harness.once_ms(run)}

    rows = []
    for timing in timings:
        mine = _measured(lambda: measure(model, timing))
        if (params["batch"], timing) not in dense_rows:
            dense_rows[(params["batch"], timing)] = _measured(lambda: measure(dense, timing))
        theirs = dense_rows[(params["batch"], timing)]
        sparqle_row = _headline_row(params, "sparqle", timing, goals, time_ms=mine.get("time_ms"),
                                    error=mine.get("error"))
        if "replay_error" in mine:
            sparqle_row.update(agreement=mine["replay_error"], agrees=mine["replay_error"] <= REPLAY_AGREEMENT)
        base_row = _headline_row(params, baseline, timing, goals, time_ms=theirs.get("time_ms"),
                                 error=theirs.get("error"))
        if sparqle_row["time_ms"]:
            sparqle_row["sparqle_speedup"] = 1.0
            if base_row["time_ms"]:
                base_row["sparqle_speedup"] = base_row["time_ms"] / sparqle_row["time_ms"]
        rows += [sparqle_row, base_row]
    del model
    _free(device)
    return rows


def forget_headline_models() -> None:
    """Drop the dense models kept between headline points."""
    _dense.clear()
    _free(harness.device())
