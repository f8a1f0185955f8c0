"""The headline points of every family: one shape per question a user asks first ("is the
2:4 layer faster than dense at decode?"), each with the baselines it is measured against and
the goal ratio (baseline time / sparqle time) the open issues set.

The GPU check's bench tier (``sparqle gpu-check``) times these; the kernel report
(``python -m sparqle.bench.kernel_report``) compiles the kernels at their specialisations.
``params`` are the arguments of the family's ``bench_<family>.make_case`` (the e2e family:
of ``bench_e2e.headline_rows``, which measures whole models its own way).
"""
from typing import Dict, List, NamedTuple, Optional


class Point(NamedTuple):
    family: str                       # bench module bench_<family>
    params: Dict[str, object]         # its make_case arguments
    goals: Dict[str, Optional[float]]  # baseline impl -> goal ratio (None: measured, no goal)
    graphs: bool = False              # small M: also timed as CUDA-graph replays


def _linear(tokens: int, out_features: int, in_features: int) -> Dict[str, object]:
    return {"tokens": tokens, "out_features": out_features, "in_features": in_features, "dtype": "bfloat16"}


POINTS: List[Point] = [
    # CSR (issue 18): > dense at 95% for n >= 256 tokens; 1.5x cuSPARSE (geomean over DLMC shapes).
    Point("spmm_csr", {"out_features": 4096, "in_features": 4096, "tokens": 512, "sparsity": 0.95,
                       "dtype": "bfloat16"},
          {"torch.sparse": 1.5, "dense": 1.0}),
    # CSR at moderate sparsity and decode (issue 18): where auto's tensor-core kernel should
    # beat the CUDA-core one, if anywhere (measured, no goal; the report's measured_choices
    # say which auto kept).
    Point("spmm_csr", {"out_features": 4096, "in_features": 4096, "tokens": 16, "sparsity": 0.7,
                       "dtype": "bfloat16"}, {"torch.sparse": None, "dense": None}),
    # Blocked-ELL (issue 18): >= 5x dense at 90% with 64x64 blocks, >= 1.2x torch BSR.
    Point("spmm_bell", {"out_features": 4096, "in_features": 4096, "tokens": 4096, "block": 64, "sparsity": 0.9,
                        "dtype": "bfloat16"}, {"dense": 5.0, "torch.bsr": 1.2}),
    # 2:4 (issue 18): >= 1.5x dense at M <= 16, >= 1.15x at M >= 2048.
    *[Point("nm", _linear(m, 11008, 4096), {"dense": goal, "torch-cusparselt": None}, graphs=m <= 16)
      for m, goal in ((1, 1.5), (16, 1.5), (4096, 1.15))],
    # int4 group 128 (issue 17): 3.0x bf16 at M = 1, 2.0x at 16, >= 1.0x at every M.
    *[Point("int4", _linear(m, 8192, 8192), {"dense": goal}, graphs=m <= 16)
      for m, goal in ((1, 3.0), (16, 2.0), (256, 1.0), (4096, 1.0))],
    # int8 W8A8 with quantization (issue 17): >= 1.6x bf16 at 4096^3 and above.
    *[Point("int8", _linear(s, s, s), {"dense": 1.6, "torch._int_mm": None}) for s in (4096, 8192)],
    # FP8 row-wise with quantization (issue 17): 1.6x bf16 at 8192^3, >= 0.9x torch._scaled_mm.
    *[Point("fp8", _linear(s, s, s), {"dense": 1.6 if s == 8192 else None,
                                      "torch._scaled_mm-row": 0.9 if s == 8192 else None})
      for s in (4096, 8192)],
    # Window attention with bias and shift mask (issue 19), Swin-T stage 1 (N = 49), Swin-B
    # stage 3 (N = 144) and SwinV2-B stage 2 (N = 256): forward >= 2x eager and >= 1.3x SDPA
    # with the mask; backward >= 1.5x eager.
    *[Point("window_attention", {"model": model, "stage": stage, "batch": 32, "heads": heads, "n": n,
                                 "dtype": "bfloat16", "mode": mode}, goals)
      for model, stage, heads, n in (("swin-t", 1, 3, 49), ("swin-b", 3, 16, 144), ("swinv2-b", 2, 8, 256))
      for mode, goals in (("fwd", {"eager": 2.0, "sdpa": 1.3}), ("fwd+bwd", {"eager": 1.5, "sdpa": None}))],
    # End to end (issue 16), bench_e2e.headline_rows: Llama-3-8B's shapes (4 of its 32 layers)
    # decoding under CUDA graphs at batch 1: int4 >= 2.5x bf16 tokens/s, int8 >= 1.6x, FP8
    # >= 1.5x, 2:4 >= 1.3x; at batch 16 none slower than bf16. Swin-T (timm) with window
    # attention >= 1.1x timm's images/s, SparseViT at keep 0.5 >= 1.5x.
    *[Point("e2e", {"model": "llama-3-8b", "layers": 4, "variant": variant, "batch": batch,
                    "dtype": "bfloat16"}, {"dense": goal if batch == 1 else 1.0})
      for batch in (1, 16) for variant, goal in (("int4", 2.5), ("int8", 1.6), ("fp8", 1.5), ("2:4", 1.3))],
    *[Point("e2e", {"model": "swin-t", "variant": variant, "batch": 64, "dtype": "bfloat16"}, {"timm": goal})
      for variant, goal in (("window_attention", 1.1), ("sparse_windows-0.5", 1.5))],
]

FAMILIES = tuple(dict.fromkeys(p.family for p in POINTS))


def points(families=None) -> List[Point]:
    """The headline points of ``families`` (every family when None), in POINTS' order."""
    unknown = set(families or ()) - set(FAMILIES)
    if unknown:
        raise ValueError(f"no headline points for {sorted(unknown)}; families are {list(FAMILIES)}")
    return [p for p in POINTS if families is None or p.family in families]
