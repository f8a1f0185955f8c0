"""sparqle.convert with one setting per pattern of module names, its summary, the warnings
of a call that converts nothing, and the layers whose shape a format cannot serve."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import sparqle
from sparqle.bench import swin_reference as swin
from sparqle.nn import FP8Linear, Int4Linear, Int8Linear, SparseLinear, SparseWindowBlock, WindowAttention


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.o(a @ self.v(x))


class Layer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """Names: embed, layers.{0,1}.attn.{q,k,v,o}, layers.{0,1}.mlp.{0,2}, lm_head."""
    def __init__(self, dim=32, vocab=40):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Layer(dim), Layer(dim)])
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


# ---- per-layer settings ------------------------------------------------------------

def test_each_layer_takes_the_first_pattern_it_matches():
    torch.manual_seed(0)
    model = TinyLM()
    before = {name: copy.deepcopy(m) for name, m in _linears(model).items()}
    mapping = {"layers.0.*": "int8", "*.mlp.*": ("int4", {"group_size": 32}),
               r"re:layers\.\d+\.attn\.[qkv]": ("fp8", {"granularity": "row"}), "lm_head": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparqle.convert(model, mapping) is model
    expected = {**{f"layers.0.{n}": Int8Linear for n in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.0", "mlp.2")},
                "layers.1.mlp.0": Int4Linear, "layers.1.mlp.2": Int4Linear,
                **{f"layers.1.attn.{n}": FP8Linear for n in "qkv"},
                "layers.1.attn.o": nn.Linear, "lm_head": nn.Linear}
    got = dict(model.named_modules())
    assert {name: type(got[name]) for name in expected} == expected
    assert got["layers.1.mlp.0"].group_size == 32 and got["layers.1.attn.q"].granularity == "row"
    x = torch.randn(3, 64)
    for name, cls in expected.items():  # each is its own format's conversion of the same layer
        reference = before[name] if cls is nn.Linear else cls.from_linear(before[name], **(
            {"group_size": 32} if cls is Int4Linear else {}))
        assert torch.equal(got[name](x[:, :got[name].in_features]), reference(x[:, :got[name].in_features])), name


def test_glob_stars_cross_dots_and_regexes_match_the_whole_name():
    model = TinyLM()
    with pytest.warns(UserWarning, match="pattern 're:.*attn' takes no nn.Linear"):
        sparqle.convert(model, {"*.q": "int8", "re:.*attn": "int8", "re:layers\\.1\\.attn\\.k.*": "int8"})
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Int8Linear))
    # "re:.*attn" matches no Linear (it would have to end the name); "*.q" reaches into both layers.
    assert converted == ["layers.0.attn.q", "layers.1.attn.k", "layers.1.attn.q"]


def test_keyword_options_go_to_every_pattern_under_its_own():
    model = TinyLM()
    sparqle.convert(model, {"*.mlp.0": ("int4", {"group_size": 64}), "*.mlp.2": "int4"}, group_size=32)
    assert model.layers[0].mlp[0].group_size == 64 and model.layers[0].mlp[2].group_size == 32


def test_sparse_formats_in_a_mapping():
    model = TinyLM()
    sparqle.convert(model, {"*.mlp.0": "2:4", "*.mlp.2": ("csr", {"sparsity": 0.5}),
                            "*.attn.*": ("bell", {"sparsity": 0.5, "block_size": 16})})
    assert [model.layers[1].mlp[0].format, model.layers[1].mlp[2].format, model.layers[1].attn.v.format] == [
        "2:4", "csr", "bell"]
    assert model(torch.randint(0, 40, (2, 5))).shape == (2, 5, 40)


@pytest.mark.parametrize("mapping,error,match", [
    ({"*.mlp.*": "int3"}, ValueError, r"pattern '\*\.mlp\.\*': format must be one of .* got 'int3'"),
    ({"*.mlp.*": "window_attention"}, ValueError, r"pattern '\*\.mlp\.\*': 'window_attention' swaps whole"),
    ({"lm_head": ("int8", {"group_size": 32})}, ValueError,
     r"pattern 'lm_head': format 'int8' takes the options \['activation', 'method', 'stats'\], got \{'group_size': 32\}"),
    ({"lm_head": ("csr", {"sparsity": 0.5, "format": "bell"})}, ValueError, r"pattern 'lm_head': format 'csr'"),
    ({"lm_head": None, "*.q": ("int4",)}, TypeError, r"pattern '\*\.q': a setting is None \(skip\), a format name"),
    ({"lm_head": (None, {"sparsity": 0.5})}, TypeError, r"pattern 'lm_head': a setting is None"),
    ({"re:*.q": "int8"}, ValueError, r"pattern 're:\*\.q' is not a regular expression"),
    ({3: "int8"}, TypeError, r"the mapping's keys must be str patterns, got int 3"),
    # A value the format refuses: raised by the first layer of its pattern, before any layer
    # of any pattern is put in the model.
    ({"*.attn.*": "int8", "*.mlp.*": ("int4", {"group_size": 100})}, ValueError,
     r"convert: pattern '\*\.mlp\.\*', layer 'layers.0.mlp.0': group_size must be one of"),
    ({"*.attn.*": "int8", "*.mlp.*": ("csr", {"sparsity": 1.5})}, ValueError,
     r"pattern '\*\.mlp\.\*', layer 'layers.0.mlp.0': sparsity must lie in \[0, 1\)"),
])
def test_a_bad_setting_raises_naming_its_pattern_with_the_model_untouched(mapping, error, match):
    model = TinyLM()
    with pytest.raises(error, match=match):
        sparqle.convert(model, mapping)
    assert all(type(m) is nn.Linear for m in _linears(model).values())


def test_a_pattern_that_takes_no_layer_warns():
    model = TinyLM()
    with pytest.warns(UserWarning, match=r"pattern '\*\.mlp\.\*' takes no nn.Linear") as record:
        sparqle.convert(model, {"*": "int8", "*.mlp.*": "int4", "*.ffn.*": None})
    assert len(record) == 1  # a None pattern that matches nothing is no mistake
    assert isinstance(model.layers[0].mlp[0], Int8Linear) and isinstance(model.layers[1].mlp[2], Int8Linear)


def test_a_shared_module_decided_differently_by_name_is_refused():
    linear = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": linear, "b": linear})
    with pytest.raises(ValueError, match=r"the Linear at \['a', 'b'\] is one module, decided differently by "
                                         r"name \('a': convert with 'a'; 'b': convert with 'b'\)"):
        sparqle.convert(model, {"a": "int8", "b": "int4"})
    with pytest.raises(ValueError, match=r"'a': convert with 'a'; 'b': pattern 'b' skips it"):
        sparqle.convert(model, {"a": "int8", "b": None})
    sparqle.convert(model, {"[ab]": "int8"})
    assert isinstance(model["a"], Int8Linear) and model["a"] is model["b"]


def test_filter_and_mapping_both_apply():
    model = TinyLM()
    _, summary = sparqle.convert(model, {"*.mlp.*": "int8"}, filter=lambda name, m: name.startswith("layers.1"),
                                 return_summary=True)
    assert sorted(layer.name for layer in summary.converted) == ["layers.1.mlp.0", "layers.1.mlp.2"]
    assert summary.skipped["layers.0.mlp.0"] == "the filter rejects it"
    assert summary.skipped["layers.1.attn.q"] == "no pattern matches it"


# ---- layers a format cannot serve ---------------------------------------------------

def test_csr_skips_a_layer_past_its_int32_indices_and_reports_it():
    """A meta layer of 2^32 weights: at sparsity 0.25 CSR would keep 3 * 2^30 > 2^31 - 1 of
    them. The refusal is decided from the shape alone, so the layer is never read."""
    model = nn.ModuleDict({"small": nn.Linear(16, 8), "huge": nn.Linear(1 << 16, 1 << 16, device="meta")})
    _, summary = sparqle.convert(model, "csr", sparsity=0.25, return_summary=True)
    assert isinstance(model["small"], SparseLinear) and type(model["huge"]) is nn.Linear
    assert summary.skipped == {"huge": f"csr cannot serve it: it keeps {3 << 30} weights at sparsity 0.25, "
                                       f"past the {2**31 - 1} that CSR's int32 indices reach"}
    assert summary.counts == {"csr": 1}


@pytest.mark.parametrize("fmt,options", [("window_attention", {}), ("sparse_windows", {"keep_ratio": 0.5})])
def test_swin_attention_past_the_fused_kernel_is_skipped_and_reported(fmt, options):
    model = nn.ModuleDict({"small": swin.SwinTransformerBlock(16, (8, 8), 2, 4),
                           "wide": swin.SwinTransformerBlock(16, (17, 17), 2, 17),   # 289 tokens a window
                           "deep": swin.SwinTransformerBlock(320, (8, 8), 2, 4)})   # head dim 160
    _, summary = sparqle.convert(model, fmt, return_summary=True, **options)
    at = (lambda key: key) if fmt == "sparse_windows" else (lambda key: f"{key}.attn")  # what fmt swaps
    assert [layer.name for layer in summary.converted] == [at("small")]
    assert summary.skipped == {at("wide"): "its windows hold 289 tokens; the fused kernel takes at most 256",
                               at("deep"): "its head dim is 160; the fused kernel takes 1 to 128"}
    assert isinstance(model.get_submodule(at("small")), SparseWindowBlock if fmt == "sparse_windows" else WindowAttention)
    assert type(model["wide"].attn) is swin.WindowAttention and type(model["deep"].attn) is swin.WindowAttention


# ---- the summary -------------------------------------------------------------------

def test_summary_counts_and_bytes(capsys):
    model = nn.ModuleDict({"a": nn.Linear(64, 48), "b": nn.Linear(48, 64, bias=False),
                           "c": nn.Linear(64, 64), "d": nn.Linear(8, 8).double()})
    result = sparqle.convert(model, {"[ab]": ("int4", {"group_size": 32}), "c": "int8", "d": None},
                             verbose=True, return_summary=True)
    assert isinstance(result, tuple) and result[0] is model
    summary = result[1]
    assert isinstance(summary, sparqle.ConvertSummary)
    assert summary.counts == {"int4": 2, "int8": 1}
    assert summary.skipped == {"d": "pattern 'd' skips it"}
    f32 = 4
    # int4: packed [N, 64 ceil(K / 128)] uint8, scales and zeros [N, ceil(K / 32)] in the
    # layer's dtype.
    a_before, a_after = (48 * 64 + 48) * f32, 48 * 64 + 2 * 48 * 2 * f32 + 48 * f32
    b_before, b_after = 64 * 48 * f32, 64 * 64 + 2 * 64 * 2 * f32
    # int8: qweight [N, K] int8, scales [N] fp32.
    c_before, c_after = (64 * 64 + 64) * f32, 64 * 64 + 64 * f32 + 64 * f32
    assert [(x.name, x.format, x.bytes_before, x.bytes_after) for x in summary.converted] == [
        ("a", "int4", a_before, a_after), ("b", "int4", b_before, b_after), ("c", "int8", c_before, c_after)]
    assert summary.bytes_before == a_before + b_before + c_before
    assert summary.bytes_after == a_after + b_after + c_after
    printed = capsys.readouterr().out
    assert printed == str(summary) + "\n"
    assert printed.startswith("sparqle.convert: 3 of 4 modules converted; their tensors "
                              f"{summary.bytes_before / 1024:.2f} KiB -> {summary.bytes_after / 1024:.2f} KiB")
    assert "int4: 2 modules" in printed and "skipped 1 (pattern 'd' skips it): d" in printed


def test_without_verbose_nothing_is_printed_and_the_model_is_returned(capsys):
    model = TinyLM()
    assert sparqle.convert(model, "int8") is model
    assert capsys.readouterr().out == ""


def test_summary_of_swin_conversions_counts_shared_parameters_once():
    model = swin.TinySwin()
    _, summary = sparqle.convert(model, "window_attention", return_summary=True)
    assert summary.counts == {"window_attention": 4} and not summary.skipped
    for layer in summary.converted:
        attn = model.get_submodule(layer.name)
        # The same qkv, proj and table; the index buffer is a copy of the same size.
        assert layer.bytes_before == layer.bytes_after == sum(
            t.numel() * t.element_size() for t in (*attn.parameters(), *attn.buffers()))


# ---- a call that converts nothing warns --------------------------------------------

class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([nn.ModuleDict({"query": nn.Linear(16, 16), "output": nn.Linear(16, 16)})])


@pytest.mark.parametrize("fmt", ["window_attention", "sparse_windows"])
def test_a_swin_conversion_of_a_model_without_swin_warns(fmt):
    with pytest.warns(UserWarning, match=r"sparqle.convert converted nothing: the model has no Swin "):
        sparqle.convert(Bert(), fmt)


def test_a_filter_or_patterns_that_match_nothing_warn():
    with pytest.warns(UserWarning, match=r"converted nothing: none of its 2 nn.Linear modules was taken: "
                                         r"2 the filter rejects it \(names such as 'encoder.0.query', "
                                         r"'encoder.0.output'\)"):
        sparqle.convert(Bert(), "int8", filter=lambda name, m: "mlp" in name)
    with pytest.warns(UserWarning) as record:
        sparqle.convert(Bert(), {"*.mlp.*": "int8"})
    assert [str(w.message) for w in record] == [  # not also that the pattern takes none
        "sparqle.convert converted nothing: none of its 2 nn.Linear modules was taken: 2 no pattern matches "
        "it (names such as 'encoder.0.query', 'encoder.0.output')"]
    with pytest.warns(UserWarning, match=r"none of its 1 Swin WindowAttention modules was taken: the filter"):
        sparqle.convert(nn.Sequential(swin.WindowAttention(16, 2, (4, 4))), "window_attention",
                        filter=lambda name, m: False)


@pytest.mark.parametrize("fmt,options", [("int8", {}), ("csr", {"sparsity": 0.5})])
def test_converting_a_converted_model_warns(fmt, options):
    model = sparqle.convert(Bert(), fmt, **options)
    with pytest.warns(UserWarning, match=r"the model has no nn.Linear \(it holds 2 ConvertedLinear: is it "
                                         r"converted already\?\)"):
        sparqle.convert(model, "int4")
    with pytest.warns(UserWarning, match=r"the model has no nn.Linear \(it holds 2 ConvertedLinear"):
        sparqle.convert(model, {"*": "int4"})


@pytest.mark.parametrize("fmt,converted", [("window_attention", "WindowAttention"),
                                           ("sparse_windows", "SparseWindowBlock")])
def test_converting_a_converted_swin_warns(fmt, converted):
    model = sparqle.convert(swin.TinySwin(), fmt)
    with pytest.warns(UserWarning, match=rf"the model has no Swin .* \(it holds \d+ {converted}: is it "
                                         rf"converted already\?\)"):
        sparqle.convert(model, fmt)


def test_a_model_without_linears_warns():
    with pytest.warns(UserWarning, match=r"converted nothing: the model has no nn.Linear$"):
        sparqle.convert(nn.Sequential(nn.ReLU()), "int8")


# ---- torch's sparse beta notice ----------------------------------------------------

def test_the_torch_path_gives_no_sparse_beta_notice():
    """Torch gives it once per process, so the first use is checked in a fresh one; no
    filter for it is left behind (the caller sees torch's notice for its own tensors)."""
    code = """
import warnings
warnings.simplefilter("error")
import torch, sparqle
x = torch.randn(3, 40)
for _ in range(2):
    sparqle.linear(x, sparqle.BlockedELL.from_dense(torch.randn(24, 40), 16))
    sparqle.linear(x, sparqle.CSR.from_dense(torch.randn(24, 40)))
    sparqle.CSR.from_dense(torch.randn(4, 4)).to_sparse_csr()
assert not [f for f in warnings.filters if f[1] is not None and "beta" in f[1].pattern]
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "SPARQLE_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr
    # The check itself fails where torch does give the notice.
    shown = subprocess.run([sys.executable, "-W", "error", "-c",
                            "import torch; torch.sparse_bsr_tensor(torch.tensor([0, 1]), torch.tensor([0]), "
                            "torch.ones(1, 2, 2), (2, 2), check_invariants=False)"], capture_output=True, text=True)
    assert "Sparse BSR tensor support is in beta state" in shown.stderr
