"""Whole models converted with sparqle: a Hugging Face Llama and Swin.

- On the CPU (torch path): ``generate`` of a converted Llama gives the greedy tokens of the
  same converted model run without a cache (the whole sequence each step); the bench's
  static-cache decoder gives the logits of that full forward; the e2e and overhead benchmarks
  run and report every point.
- On a GPU (marked ``gpu``, the GPU check's tests tier): a converted Llama's decode step and a
  converted Swin captured in a CUDA graph by hand, and under
  ``torch.compile(mode="reduce-overhead")``, replay what eager calls give.
"""
import copy
import importlib.util
import json

import pytest
import torch

import sparqle
from sparqle import cli
from sparqle.bench import bench_e2e, bench_overhead, harness, swin_reference

from ._oracle import RTOL

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers (pip install transformers)")

FORMATS = bench_e2e.llama_formats(tiny=True)
PROMPT, STEPS = 4, 4  # batch 2: at most 14 rows, so FP8 stays weight-only (<= 16 rows) with and
# without a cache


def _tiny_llama(variant=None, dtype=torch.float32, device="cpu"):
    model = bench_e2e.build_llama("llama-tiny", None, dtype, device)
    if variant is not None:
        bench_e2e.convert_llama(model, *FORMATS[variant])
    return model


def _no_cache_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the whole sequence run again at every step (no KV cache)."""
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("variant", sorted(FORMATS))
def test_generate_of_a_converted_llama_gives_its_greedy_tokens(variant):
    model = _tiny_llama(variant)
    model.generation_config.eos_token_id = None  # never stop early: the loop below does not
    ids = torch.randint(0, model.config.vocab_size, (2, PROMPT))
    with sparqle.use_backend("torch"), torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                                   do_sample=False, pad_token_id=0)
        expected = _no_cache_greedy(model, ids, STEPS)
    assert generated.shape == (2, PROMPT + STEPS)
    assert torch.equal(generated, expected), f"{variant}: generate {generated[:, PROMPT:].tolist()} " \
                                             f"!= no-cache greedy {expected[:, PROMPT:].tolist()}"


@pytest.mark.parametrize("variant", [None, "int4", "csr-0.9"], ids=lambda v: v or "dense")
def test_static_cache_decoder_gives_the_full_forwards_logits(variant):
    """The bench's decoder (static cache, positions on the device) computes what a forward
    over the whole sequence computes for its last token, step after step."""
    model = _tiny_llama(variant)
    prompt = torch.randint(0, model.config.vocab_size, (2, PROMPT))
    decoder = bench_e2e.Decoder(model, 2, PROMPT + STEPS)
    with sparqle.use_backend("torch"), torch.no_grad():
        first = decoder.prefill(prompt)
        sequence = torch.cat([prompt, decoder.ids.clone()], dim=1)
        torch.testing.assert_close(first, model(input_ids=prompt, use_cache=False).logits[:, -1])
        for _ in range(STEPS - 1):
            logits = decoder.step()
            torch.testing.assert_close(logits, model(input_ids=sequence, use_cache=False).logits[:, -1],
                                       rtol=1e-4, atol=1e-5)
            sequence = torch.cat([sequence, decoder.ids.clone()], dim=1)
        assert int(decoder.position) == PROMPT + STEPS - 1


def _quick_setting() -> bench_e2e.Setting:
    return bench_e2e.Setting("llama-tiny", None, (1, 2), context=4, steps=2, repeats=1, prefill=8,
                             swin=("swin-reference",), swin_batch=1, compiled=False, dtype=torch.float32)


def test_e2e_bench_reports_every_point_on_the_cpu(tmp_path):
    report = bench_e2e.report(quick=True, progress=False, s=_quick_setting())
    rows = report["results"]
    assert report["backend"] == "torch" and report["kind"] == "e2e"
    errors = [r for r in rows if r.get("error")]
    assert not errors, errors
    llama = [r for r in rows if r["model"] == "llama-tiny"]
    assert {r["variant"] for r in llama} == {"dense", *FORMATS}
    for r in llama:
        if r["timing"] == "graph":
            assert r["missing"] and "throughput" not in r  # no CUDA device: reported, not timed
        else:
            assert r["throughput"] > 0 and r["unit"] == "tokens/s" and r["speedup"] > 0
    assert {(r["batch"], r["metric"]) for r in llama} == {(1, "decode"), (2, "decode"), (1, "prefill")}
    swin = [r for r in rows if r["model"] == "swin-reference" and r["timing"] == "eager"]
    assert {r["variant"] for r in swin} == set(bench_e2e.swin_variants())
    assert all(r["throughput"] > 0 and r["unit"] == "images/s" for r in swin)
    assert all(r["speedup"] == 1.0 for r in rows if r["variant"] in bench_e2e.BASELINES and r.get("throughput"))
    json.dumps(report)  # the JSON the CLI writes
    text = harness.cells_markdown(report, bench_e2e.cells(report), "e2e")
    assert all(v in text for v in ("int4", "bell-0.8", "sparse_windows-0.25"))
    bench_e2e.plot(report, str(tmp_path / "e2e.png"))


def test_overhead_bench_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_overhead, "per_call_us", lambda fn, calls: _few_calls_us(fn))
    assert cli.main(["bench", "--op", "overhead", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("overhead-quick-*.json")
    report = json.loads(path.read_text())
    ops = {(r["op"], r["entry"]) for r in report["results"]}
    assert ("dense", "F.linear") in ops
    for op in ("int4", "int8", "int8-w8a16", "fp8", "2:4", "csr", "bell"):
        assert {(op, "module"), (op, "sparqle.linear")} <= ops
    for r in report["results"]:
        if r["op"] != "dense":
            assert r["stubbed_us"] > 0 and isinstance(r["extra_ops"], list) and r["python_calls"] > 0
    assert path.with_suffix(".md").exists()


def _few_calls_us(fn) -> float:
    import time
    start = time.perf_counter()
    for _ in range(5):
        fn()
    return (time.perf_counter() - start) / 5 * 1e6


def test_stubbed_launchers_are_restored():
    """The overhead bench's stub leaves the kernel modules as they were."""
    from sparqle.kernels.torch import int4_linear
    real = int4_linear.int4_linear
    with bench_overhead.stubbed("torch", [("int4_linear", "int4_linear")]):
        assert int4_linear.int4_linear is not real
    assert int4_linear.int4_linear is real


# ------------------------------------------------------------------------------------------
# GPU: capture
# ------------------------------------------------------------------------------------------

def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.float().abs().max().clamp(min=1).item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=RTOL.get(want.dtype, 1e-5) * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [None, *sorted(FORMATS)], ids=lambda v: v or "dense")
def test_converted_llama_decode_step_replays_as_eager(variant):
    """A decode step of the converted Llama (bf16, auto backend) captured by hand in a CUDA
    graph: its replays continue the greedy sequence as eager steps do."""
    model = _tiny_llama(variant, torch.bfloat16, "cuda")
    prompt = torch.randint(0, model.config.vocab_size, (2, PROMPT), device="cuda")
    decoder = bench_e2e.Decoder(model, 2, PROMPT + 2 * STEPS + 4)
    with torch.no_grad():
        decoder.prefill(prompt)
        eager = [decoder.step().clone() for _ in range(STEPS)]
        graph, _ = bench_e2e.graph(decoder.step)  # warm-up outside capture, then capture
        decoder.prefill(prompt)
        for step, want in enumerate(eager):
            graph.replay()
            torch.cuda.synchronize()
            _close(decoder.logits, want, f"{variant} replay {step}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [None, *sorted(FORMATS)], ids=lambda v: v or "dense")
def test_converted_llama_under_reduce_overhead_compile_matches_eager(variant):
    model = _tiny_llama(variant, torch.bfloat16, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        for _ in range(3):  # warm-up, record, replay
            got = compiled(input_ids=ids, use_cache=False).logits
        _close(got, want, f"{variant} reduce-overhead")


def _swin(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = swin_reference.TinySwin().to("cuda", torch.bfloat16).eval()
    return bench_e2e.swin_variants()[variant](copy.deepcopy(model))


SWIN = ["window_attention", "sparse_windows-0.5"]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", SWIN)
def test_converted_swin_replays_as_eager(variant):
    model = _swin(variant)
    x = torch.randn(4, 3, 28, 28, device="cuda", dtype=torch.bfloat16)
    static = x.clone()
    with torch.no_grad():
        graph, out = bench_e2e.graph(lambda: model(static))
        for _ in range(2):
            static.copy_(torch.randn_like(static))
            graph.replay()
            torch.cuda.synchronize()
            _close(out, model(static.clone()), f"{variant} replay")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", SWIN)
def test_converted_swin_under_reduce_overhead_compile_matches_eager(variant):
    model = _swin(variant)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 3, 28, 28, device="cuda", dtype=torch.bfloat16)
            _close(compiled(x).clone(), model(x), f"{variant} reduce-overhead")
