"""Test set-up: Triton's interpreter where there is no GPU, poisoned outputs, and the
(device, backend) pairs that can run here."""
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: the Triton kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SPARQLE_POISON"] = "1"
os.environ.pop("SPARQLE_BACKEND", None)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest -n W: W processes share the cores; torch's default (one thread per core each)
    # would oversubscribe them (MKL's sparse product of a 64 x 64 CSR took 8 ms instead of
    # 20 us with 2 threads beside a busy process on 2 cores).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

from sparqle.backends import cupy_status, triton_status  # noqa: E402


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends():
    """Every (device, backend) pair that can run here: the torch path on each device, and
    Triton on CUDA or, interpreted, on the CPU."""
    pairs = []
    for device in _devices():
        pairs.append((device, "torch"))
        if triton_status(torch.device(device))[0]:
            pairs.append((device, "triton"))
    return pairs


def pytest_addoption(parser):
    parser.addoption("--cuda-only", action="store_true",
                     help="keep only the tests that run on CUDA: those marked gpu or cupy, and "
                          "those with a cuda device among their parameters (the GPU check)")


def _runs_on_cuda(item) -> bool:
    return "gpu" in item.keywords or "cupy" in item.keywords or "cuda" in item.name


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cuda-only"):
        deselected = [item for item in items if not _runs_on_cuda(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if _runs_on_cuda(item)]
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    cupy_ok, cupy_why = (cupy_status(torch.device("cuda")) if torch.cuda.is_available()
                         else (False, "needs a CUDA device"))
    skip_cupy = pytest.mark.skip(reason=f"cupy: {cupy_why}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "cupy" in item.keywords and not cupy_ok:
            item.add_marker(skip_cupy)


@pytest.fixture(params=device_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def device_backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hf_models():
    """Two-block Hugging Face models with random weights, built once (tests deep-copy
    them): a Llama with multi-head and one with grouped-query attention, and a BERT."""
    tf = pytest.importorskip("transformers", reason="needs the test extra's transformers")
    torch.manual_seed(0)
    small = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4}
    return {"llama": tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=4)).eval(),
            "llama-gqa": tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=2)).eval(),
            "bert": tf.BertModel(tf.BertConfig(**small)).eval()}
