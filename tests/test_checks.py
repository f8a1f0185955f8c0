"""What sparqle checks outside the ops' arguments: convert() on shared modules and tied
weights, the intent of a frozen layer, sizes and settings that are not ints (or not
numbers), window attention's construction, index range, errors that say what is wrong,
and the torch path from several threads."""
import threading
import warnings

import pytest
import torch
from torch import nn

import sparqle
from sparqle import CSR, BlockedELL, Int4Weight, SemiStructured
from sparqle.bench import swin_reference as swin
from sparqle.nn import FP8Linear, SparseWindowBlock, WindowAttention

# fmt -> convert's options
LINEAR_FORMATS = {"csr": {"sparsity": 0.5}, "bell": {"sparsity": 0.5, "block_size": 16}, "2:4": {},
                  "int4": {"group_size": 32}, "int8": {}, "fp8": {}, "fp8-training": {"training": True}}


def _convert(model, fmt):
    return sparqle.convert(model, fmt.partition("-")[0], **LINEAR_FORMATS[fmt])


# ---- convert: a module at several names, tied parameters ---------------------------

@pytest.mark.parametrize("fmt", sorted(LINEAR_FORMATS))
def test_a_module_at_several_names_is_converted_once(fmt):
    linear = nn.Linear(32, 32)
    model = nn.ModuleDict({"layers": nn.Sequential(linear, nn.ReLU(), linear), "alias": linear})
    x = torch.randn(3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is tied outside the module itself
        _convert(model, fmt)
    layers = model["layers"]
    assert type(layers[0]) is not nn.Linear and layers[0] is layers[2] is model["alias"]
    assert torch.equal(layers(x), layers[0](torch.relu(layers[0](x))))


def test_swin_modules_at_several_names_are_converted_once():
    attn = swin.WindowAttention(16, 2, (4, 4))
    model = nn.ModuleDict({"a": attn, "b": attn})
    sparqle.convert(model, "window_attention")
    assert isinstance(model["a"], WindowAttention) and model["a"] is model["b"]
    block = swin.SwinTransformerBlock(16, (8, 8), 2, 4, 2)
    model = nn.Sequential(nn.Sequential(block, block))
    sparqle.convert(model, "sparse_windows", keep_ratio=0.5)
    assert isinstance(model[0][0], SparseWindowBlock) and model[0][0] is model[0][1]


def test_a_filter_must_take_a_shared_module_at_all_its_names_or_none():
    linear = nn.Linear(8, 8)
    model = nn.Sequential(linear, linear)
    with pytest.raises(ValueError, match=r"the Linear at \['0', '1'\] is one module, decided differently by name "
                                         r"\('0': convert with 'int8'; '1': the filter rejects it\)"):
        sparqle.convert(model, "int8", filter=lambda name, m: name == "0")
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.body = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 50, bias=False)
        self.lm_head.weight = self.embed.weight


@pytest.mark.parametrize("fmt", sorted(LINEAR_FORMATS))
def test_converting_a_tied_weight_warns_that_the_tie_breaks(fmt):
    model = TiedLM()
    with pytest.warns(UserWarning, match="lm_head.weight is tied to embed.weight; .* the tie breaks"):
        _convert(model, fmt)
    assert type(model.lm_head) is not nn.Linear and type(model.body) is not nn.Linear


def test_tied_linears_and_biases_warn_too():
    first, second = nn.Linear(16, 16), nn.Linear(16, 16)
    second.bias = first.bias
    with pytest.warns(UserWarning) as record:
        sparqle.convert(nn.Sequential(first, second), "int8")
    assert sorted(str(w.message).split(";")[0] for w in record) == [
        "convert: 0.bias is tied to 1.bias", "convert: 1.bias is tied to 0.bias"]


def test_swin_conversions_share_the_parameters_and_do_not_warn():
    model = swin.TinySwin()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparqle.convert(model, "window_attention")
    assert sum(isinstance(m, WindowAttention) for m in model.modules()) == 4


# ---- a frozen layer stays frozen ---------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(LINEAR_FORMATS))
@pytest.mark.parametrize("weight_grad,bias_grad", [(False, False), (True, True), (False, True)])
def test_converted_parameters_follow_the_layers_requires_grad(fmt, weight_grad, bias_grad):
    linear = nn.Linear(32, 16)
    linear.weight.requires_grad_(weight_grad)
    linear.bias.requires_grad_(bias_grad)
    layer = _convert(nn.Sequential(linear), fmt)[0]
    for name, p in layer.named_parameters():
        assert p.requires_grad == (bias_grad if name == "bias" else weight_grad), name


# ---- sizes, settings, numbers ------------------------------------------------------

def test_sizes_must_be_ints():
    w = torch.randn(4, 64)
    csr = CSR.from_dense(w)
    with pytest.raises(TypeError, match="CSR: shape must hold ints, got \\(2.7, 2\\)"):
        CSR(torch.tensor([0, 1, 1]), torch.tensor([0]), torch.ones(1), (2.7, 2))
    with pytest.raises(TypeError, match="shape must hold ints"):
        CSR(csr.crow_indices, csr.col_indices, csr.values, (4, True))
    with pytest.raises(TypeError, match="BlockedELL: shape must hold ints"):
        BlockedELL(torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, 16, 16), (4.0, 64))
    nm = SemiStructured.from_dense(w)
    with pytest.raises(TypeError, match="SemiStructured: shape must hold ints"):
        SemiStructured(nm.values, nm.meta, ("4", 64))
    q = Int4Weight.from_float(w, 32)
    with pytest.raises(TypeError, match="Int4Weight: shape must hold ints"):
        Int4Weight(q.packed, q.scales, q.zeros, (4, 64.0), 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Weight(q.packed, q.scales, q.zeros, (4, 64), 32.0)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Weight.from_float(w, 32.0)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        Int4Weight(q.packed, q.scales, q.zeros, (4, 64), 32, symmetric=1)
    assert CSR(csr.crow_indices, csr.col_indices, csr.values, (torch.tensor(4), 64)).shape == (4, 64)


@pytest.mark.parametrize("sparsity", ["0.5", True, torch.tensor(0.5), None])
def test_sparsity_must_be_a_number(sparsity):
    with pytest.raises((TypeError, ValueError), match="sparsity"):
        sparqle.prune.magnitude(torch.randn(8, 8), sparsity)


def test_csr_column_indices_past_int32_are_refused_not_wrapped():
    big = 2**31 + 10
    with pytest.raises(ValueError, match="col_indices reaches 2147483653, past the int32"):
        CSR(torch.tensor([0, 1]), torch.tensor([2**31 + 5]), torch.ones(1), (1, big))
    assert CSR(torch.tensor([0, 1]), torch.tensor([2**31 - 1]), torch.ones(1), (1, big)).col_indices.tolist() == [2**31 - 1]


def test_symmetric_int4_keeps_its_zero_points():
    w = Int4Weight.from_float(torch.randn(4, 64), 32, symmetric=True)
    assert w.symmetric and bool((w.zeros == 8).all())
    assert not Int4Weight.from_float(torch.randn(4, 64), 32).symmetric


# ---- window attention --------------------------------------------------------------

def _attention(num_heads=2, index=None, table=None, proj=None):
    ref = swin.WindowAttention(16, 2, (3, 3))
    return WindowAttention(ref.qkv, proj or ref.proj, num_heads,
                           ref.relative_position_bias_table if table is None else table,
                           ref.relative_position_index if index is None else index, ref.scale, (3, 3))


def test_window_attention_construction_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="num_heads must be at least 1, got 0"):
        _attention(num_heads=0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        _attention(num_heads=2.0)
    with pytest.raises(ValueError, match=r"relative_position_bias_table must be \[entries, num_heads = 4\]"):
        _attention(num_heads=4, table=torch.randn(25, 2))
    with pytest.raises(ValueError, match="proj.in_features = 8 must be num_heads \\* head_dim = 16"):
        _attention(proj=nn.Linear(8, 16))
    index = swin.get_relative_position_index(3, 3)
    with pytest.raises(ValueError, match=r"relative_position_index holds values outside \[0, 25\).*got \[1, 25\]"):
        _attention(index=torch.where(index == 0, 25, index))
    with pytest.raises(ValueError, match=r"relative_position_index holds values outside \[0, 25\).*got \[-1, 23\]"):
        _attention(index=index - 1)
    with pytest.raises(TypeError, match="relative_position_index must hold integers"):
        _attention(index=index.float())
    with pytest.raises(ValueError, match="the tokens of the \\(3, 3\\) window"):
        _attention(index=swin.get_relative_position_index(2, 2))


# ---- errors that name what is wrong ------------------------------------------------

def test_fp8_linear_names_the_input_dtype_against_the_layers():
    layer = FP8Linear.from_linear(nn.Linear(32, 16)).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"x has dtype torch.float32 but this FP8Linear is in torch.bfloat16 "
                                        r"\(its bias\); pass x in torch.bfloat16, or convert the layer"):
        layer(torch.randn(2, 32))
    assert layer(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- the torch path from several threads -------------------------------------------

def test_the_torch_path_is_thread_safe():
    """Each op's torch path from four threads at once gives the results of one thread
    (the Triton interpreter is not thread-safe: docs/testing.md)."""
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = torch.randn(8, 64)
    q, k, v = (torch.randn(4, 2, 16, 8) for _ in range(3))
    weights = [CSR.from_dense(w * (torch.rand_like(w) < 0.3)), BlockedELL.from_dense(w, 16),
               SemiStructured.from_dense(w), Int4Weight.from_float(w, 32), sparqle.Int8Weight.from_float(w),
               sparqle.FP8Weight.from_float(w)]
    calls = [lambda fw=fw: sparqle.linear(x, fw) for fw in weights]
    calls += [lambda: sparqle.window_attention(q, k, v), lambda: sparqle.spmm(weights[0], x.t()),
              lambda: sparqle.window_partition(torch.randn(1, 8, 8, 4, generator=torch.Generator().manual_seed(1)),
                                               4, 2)]
    with sparqle.use_backend("torch"):
        expected = [call() for call in calls]
    failures = []

    def work(offset: int):
        try:
            with sparqle.use_backend("torch"):
                for i in range(5 * len(calls)):
                    j = (i + offset) % len(calls)
                    if not torch.equal(calls[j](), expected[j]):
                        failures.append(j)
        except Exception as error:  # noqa: BLE001 (reported below)
            failures.append(repr(error))

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
