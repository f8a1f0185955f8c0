"""sparqle.save / sparqle.load: safetensors checkpoints of converted models.

A round trip (save, then load into a float model of the same architecture built from other
random weights, on the CPU or the meta device, or into one converted from other weights)
gives the saved model's outputs on every backend, for every format and setting of
tests/test_state_dict.py (a layer with a bias and one without), Swin's window modules (with
int8 layers inside) and tied weights. The file holds no derived tensor (CSR's row order)
and no pickle; a file holding the transposed structure that earlier versions kept loads. A
corrupted tensor, corrupted or missing metadata, a file from a newer sparqle, a missing or
unexpected key, or a model of another architecture is a ValueError or TypeError naming the
key or module, and leaves the model's modules as they were. Corrupted files are loaded in a
fresh interpreter (tests._modules.run_isolated)."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparqle
from sparqle.bench import swin_reference as swin
from sparqle.nn import Int8Linear, SparseLinear

from ._modules import run_isolated
from .test_state_dict import (FAMILIES, KINDS, LEGACY, _assert_same_outputs, _checked_keys, _corruptions, _input,
                              _outputs, legacy_state_dict)

safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs safetensors (the checkpoint extra)")

LINEAR_KINDS = [kind for kind in KINDS if kind != "window"]  # the window kind: see the Swin tests


def _float() -> nn.Module:
    """The float model the KINDS convert, its first layer without a bias."""
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 16))
    model[0].bias = None
    return model


def _converted(kind: str) -> nn.Module:
    """KINDS[kind], its first layer without a bias (the second keeps its own)."""
    model = KINDS[kind]()
    model[0].bias = None
    return model


def _rewrite(path, change_tensors=lambda t: t, change_header=lambda h: h) -> None:
    """Write ``path`` again with its tensors and its sparqle metadata changed."""
    with safetensors_torch.safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    header = change_header(json.loads(metadata["sparqle"]))
    safetensors_torch.save_file(change_tensors(tensors), str(path),
                                metadata={"sparqle": header if isinstance(header, str) else json.dumps(header)})


# ---- round trips -------------------------------------------------------------------

@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_a_round_trip_gives_the_saved_models_outputs(kind, tmp_path):
    torch.manual_seed(1)
    model, x = _converted(kind), _input(kind)
    expected = _outputs(model, x)
    sparqle.save(model, tmp_path / "model.safetensors")
    torch.manual_seed(2)
    with torch.device("meta"):
        on_meta = _float()
    torch.manual_seed(3)
    for target in (_float(), on_meta, _converted(kind)):
        loaded = sparqle.load(target, tmp_path / "model.safetensors")
        assert loaded is target
        assert not any(t.is_meta for t in [*target.parameters(), *target.buffers()])
        assert type(target[0]) is type(model[0]) and target[0].bias is None and target[2].bias is not None
        assert target[0].settings() == model[0].settings()
        assert [p.requires_grad for p in target.parameters()] == [p.requires_grad for p in model.parameters()]
        _assert_same_outputs(_outputs(target, x), expected, f"{kind} loaded into {target}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["csr", "bell", "2:4", "int4", "int8", "fp8"])
def test_a_load_to_cuda_gives_the_saved_models_outputs(kind, tmp_path):
    """Read to the GPU: the converted layers and the meta-device tensors are created there."""
    torch.manual_seed(1)
    model, x = _converted(kind).cuda(), _input(kind).cuda()
    sparqle.save(model, tmp_path / "model.safetensors")
    with torch.device("meta"):
        target = _float()
    sparqle.load(target, tmp_path / "model.safetensors", device="cuda")
    assert all(t.is_cuda for t in [*target.parameters(), *target.buffers()])
    with torch.no_grad():
        assert torch.equal(target(x), model(x))


def test_the_file_holds_no_derived_tensor_and_no_settings(tmp_path):
    model = _converted("csr")
    sparqle.save(model, tmp_path / "csr.safetensors")
    with safetensors_torch.safe_open(str(tmp_path / "csr.safetensors"), "pt") as f:
        keys, header = set(f.keys()), json.loads(f.metadata()["sparqle"])
    assert keys == {"0.crow_indices", "0.col_indices", "0.values",
                    "2.crow_indices", "2.col_indices", "2.values", "2.bias"}
    assert header["format_version"] == sparqle.checkpoint.FORMAT_VERSION
    assert header["modules"] == {"0": model[0].settings(), "2": model[2].settings()}
    bell = _converted("bell")
    sparqle.save(bell, tmp_path / "bell.safetensors")
    with safetensors_torch.safe_open(str(tmp_path / "bell.safetensors"), "pt") as f:
        assert set(f.keys()) == {"0.ell_cols", "0.values", "2.ell_cols", "2.values", "2.bias"}


def test_a_csr_checkpoint_at_half_density_is_no_larger_than_the_dense_one(tmp_path):
    """Per weight kept, CSR saves a value and a column index (4 + 4 bytes for 2 dense
    entries of 4 at 50% sparsity): the bytes of the dense weight. The row order is rebuilt
    at load, not saved."""
    model = nn.Sequential(nn.Linear(384, 256), nn.ReLU(), nn.Linear(256, 384))
    safetensors_torch.save_file(model.state_dict(), str(tmp_path / "dense.safetensors"))
    sparqle.save(sparqle.convert(model, "csr", sparsity=0.5), tmp_path / "csr.safetensors")
    dense, csr = ((tmp_path / f"{name}.safetensors").stat().st_size for name in ("dense", "csr"))
    assert csr < 1.01 * dense, (csr, dense)


def test_a_file_holding_derived_tensors_has_them_checked(tmp_path):
    """A file written with the derived buffers (not by sparqle.save) loads when they are the
    ones the pattern gives, and is refused, naming the key, when they are not."""
    model, x = _converted("csr"), _input("csr")
    path = tmp_path / "model.safetensors"
    sparqle.save(model, path)
    derived = {f"2.{name}": getattr(model[2], name) for name in model[2].derived()}
    assert set(derived) == {"2.row_order"}
    _rewrite(path, lambda t: {**t, **derived})
    _assert_same_outputs(_outputs(sparqle.load(_float(), path), x), _outputs(model, x), "with derived tensors")
    derived["2.row_order"] = derived["2.row_order"].flip(0)
    _rewrite(path, lambda t: {**t, **derived})
    with pytest.raises(ValueError, match=r"'2\.row_order'.*derived"):
        sparqle.load(_float(), path)


@pytest.mark.parametrize("kind", ["csr", "bell"])
def test_a_file_holding_the_old_transposed_structure_loads(kind, tmp_path):
    """A file holding A^T's structure under the keys SparseLinear kept it in before the
    backward derived it: sparqle.load accepts them and drops them."""
    model, x = _converted(kind), _input(kind)
    path = tmp_path / "model.safetensors"
    sparqle.save(model, path)
    old = {key: t for key, t in legacy_state_dict(model).items() if key.rpartition(".")[2] in LEGACY[kind]}
    assert len(old) == 2 * len(LEGACY[kind])
    _rewrite(path, lambda t: {**t, **old})
    loaded = sparqle.load(_float(), path)
    assert not any(key in loaded.state_dict() for key in old)
    _assert_same_outputs(_outputs(loaded, x), _outputs(model, x), "with the old transposed structure")


def test_a_file_of_the_k_order_int4_packing_loads_repacked(tmp_path):
    """A file that an earlier version wrote for int4 (``packed`` [N, ceil(K / 2)] in K order,
    settings without ``packing``) loads into a float model, on the meta device too, and into
    one converted today: repacked, the saved model's outputs."""
    from sparqle.formats.int4 import deinterleave
    torch.manual_seed(1)
    model, x = _converted("int4-64"), _input("int4-64")
    path = tmp_path / "model.safetensors"
    sparqle.save(model, path)
    k_order = {f"{name}.packed": deinterleave(m.packed)[:, :-(-m.in_features // 2)].contiguous()
               for name, m in model.named_modules() if isinstance(m, sparqle.nn.Int4Linear)}

    def earlier(header):
        for settings in header["modules"].values():
            settings.pop("packing")
        return header
    _rewrite(path, lambda t: {**t, **k_order}, earlier)
    with torch.device("meta"):
        on_meta = _float()
    for target in (_float(), on_meta, _converted("int4-64")):
        loaded = sparqle.load(target, path)
        assert all(torch.equal(loaded.get_submodule(key[:-7]).packed, model.get_submodule(key[:-7]).packed)
                   for key in k_order)
        _assert_same_outputs(_outputs(loaded, x), _outputs(model, x), "the K-order int4 packing")


def _swin(fmt: str, **options) -> nn.Module:
    return sparqle.convert(sparqle.convert(swin.TinySwin().eval(), fmt, **options), "int8")


@pytest.mark.parametrize("fmt,options", [("window_attention", {}), ("sparse_windows", {"keep_ratio": [0.5, 0.25]})])
def test_swin_window_modules_round_trip(fmt, options, tmp_path):
    """Swin's window modules (swapped whole) with int8 layers inside them (qkv, proj, mlp)."""
    torch.manual_seed(0)
    model, images = _swin(fmt, **options), torch.randn(2, 3, 28, 28)
    sparqle.save(model, tmp_path / "swin.safetensors")
    torch.manual_seed(1)
    loaded = sparqle.load(swin.TinySwin().eval(), tmp_path / "swin.safetensors")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad(), sparqle.use_backend("torch"):
        assert torch.equal(loaded(images), model(images))
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0.*saved with settings.*another architecture"):
        sparqle.load(swin.TinySwin(num_heads=(1, 4)).eval(), tmp_path / "swin.safetensors")


def test_per_layer_settings_round_trip(tmp_path):
    """A model converted layer by layer (convert's patterns), one layer left float."""
    def model():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                             nn.ReLU(), nn.Linear(32, 16))
    torch.manual_seed(0)
    converted = sparqle.convert(model(), {"0": ("int4", {"group_size": 32}), "2": "2:4",
                                          "4": ("csr", {"sparsity": 0.7}), "6": None})
    sparqle.save(converted, tmp_path / "mixed.safetensors")
    loaded = sparqle.load(model(), tmp_path / "mixed.safetensors")
    assert [type(m) for m in loaded] == [type(m) for m in converted]
    x = torch.randn(5, 64)
    _assert_same_outputs(_outputs(loaded, x), _outputs(converted, x), "per-layer settings")


class _Tied(nn.Module):
    """An embedding, a hidden layer and an lm_head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed, self.hidden, self.lm_head = nn.Embedding(16, 24), nn.Linear(24, 24), nn.Linear(24, 16, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.hidden(self.embed(ids))))


@pytest.mark.parametrize("convert_lm_head", [False, True])
def test_tied_weights(convert_lm_head, tmp_path):
    """A tie left in the model is saved once and loads tied (on the meta device too); an
    lm_head converted apart from its embedding (convert warns that the tie breaks) loads
    converted, the embedding as it was saved."""
    torch.manual_seed(0)
    model, ids = _Tied(), torch.randint(0, 16, (3, 5))
    if convert_lm_head:
        with pytest.warns(UserWarning, match="tie breaks"):
            sparqle.convert(model, "int8")
    else:
        sparqle.convert(model, "int8", filter=lambda name, m: name != "lm_head")
    sparqle.save(model, tmp_path / "tied.safetensors")
    with safetensors_torch.safe_open(str(tmp_path / "tied.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    with torch.device("meta"):
        on_meta = _Tied()
    for target in (_Tied(), on_meta):
        sparqle.load(target, tmp_path / "tied.safetensors")
        assert isinstance(target.lm_head, Int8Linear) == convert_lm_head
        if not convert_lm_head:
            assert target.lm_head.weight is target.embed.weight
        with torch.no_grad():
            assert torch.equal(target(ids), model(ids))


def test_a_module_reached_at_two_names(tmp_path):
    shared = nn.Linear(24, 24)
    model = sparqle.convert(nn.Sequential(nn.Linear(40, 24), shared, nn.ReLU(), shared), "2:4")
    sparqle.save(model, tmp_path / "model.safetensors")
    shared = nn.Linear(24, 24)
    target = sparqle.load(nn.Sequential(nn.Linear(40, 24), shared, nn.ReLU(), shared), tmp_path / "model.safetensors")
    assert target[1] is target[3] and isinstance(target[1], SparseLinear)
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(target(x), model(x))


# ---- refused files -----------------------------------------------------------------

def corrupted_files_are_refused(family: str, examples: int, directory: str) -> None:
    """Run in a fresh interpreter by the test below: a tensor of a converted module,
    corrupted in the file, is refused with an error naming its key; the model keeps its
    float modules."""
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data):
        kind = data.draw(st.sampled_from([k for k in FAMILIES[family] if k != "window"]), label="kind")
        torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        model = _converted(kind)
        path = f"{directory}/{kind}.safetensors"
        sparqle.save(model, path)
        with safetensors_torch.safe_open(path, "pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}
        key = data.draw(st.sampled_from([k for k in _checked_keys(model) if k in saved]), label="key")
        what, corrupt = data.draw(st.sampled_from([c for c in _corruptions(key.rpartition(".")[2], saved[key])
                                                   if c[0] != "not a tensor"]), label="corruption")
        _rewrite(path, lambda t: {**t, key: corrupt(t[key], data.draw(st.integers(0, 2**20), label="position"))})
        target = _float()
        before = [type(m) for m in target.modules()]
        with pytest.raises((ValueError, TypeError)) as error:
            sparqle.load(target, path)
        assert f"'{key}'" in str(error.value), f"{what}: the error does not name {key!r}: {error.value}"
        assert [type(m) for m in target.modules()] == before
    run()


@pytest.mark.parametrize("family", ["sparse", "quantized"])
def test_corrupted_tensors_are_refused(family, tmp_path):
    run_isolated("tests.test_checkpoint", "corrupted_files_are_refused", family, 20, str(tmp_path))


def _saved(tmp_path, kind="int4"):
    path = tmp_path / f"{kind}.safetensors"
    sparqle.save(_converted(kind), path)
    return path


@pytest.mark.parametrize("cut", [1, 100, 10_000])
def test_a_truncated_or_garbled_file_is_refused(cut, tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sparqle.load(_float(), path)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sparqle.load(_float(), path)


METADATA_ERRORS = [
    ("newer version", lambda h: {**h, "format_version": 2}, r"format 2; this sparqle .* reads format 1: upgrade"),
    ("no version", lambda h: {k: v for k, v in h.items() if k != "format_version"}, "no valid format_version"),
    ("version as a string", lambda h: {**h, "format_version": "1"}, "no valid format_version"),
    ("not JSON", lambda h: "{'modules':", "'sparqle' is not valid JSON"),
    ("not an object", lambda h: [h], "must hold a JSON object"),
    ("modules not a dict", lambda h: {**h, "modules": ["0"]}, "'modules' must map"),
    ("unknown format", lambda h: {**h, "modules": {**h["modules"], "0": {**h["modules"]["0"], "format": "int3"}}},
     r"module '0' has format 'int3'"),
    ("a setting missing", lambda h: {**h, "modules": {**h["modules"], "2": {
        k: v for k, v in h["modules"]["2"].items() if k != "group_size"}}}, r"'2\._extra_state'.*no setting 'group_size'"),
    ("a setting of another type", lambda h: {**h, "modules": {**h["modules"], "2": {
        **h["modules"]["2"], "group_size": "32"}}}, r"'2\.|group_size"),
    ("another shape", lambda h: {**h, "modules": {**h["modules"], "2": {**h["modules"]["2"], "out_features": 17}}},
     r"'2\."),
    ("an unknown setting", lambda h: {**h, "modules": {**h["modules"], "2": {**h["modules"]["2"], "rank": 4}}},
     r"'2\._extra_state' records rank=4, but the tensors.*corrupt"),
    ("a module the model lacks", lambda h: {**h, "modules": {**h["modules"], "5": h["modules"]["2"]}},
     r"module '5', which the model does not have"),
    ("a bad alias", lambda h: {**h, "aliases": {"0.bias": "9.weight"}}, r"'aliases' maps .*'0\.bias'"),
]


@pytest.mark.parametrize("what,change,message", METADATA_ERRORS, ids=[e[0] for e in METADATA_ERRORS])
def test_bad_metadata_is_refused(what, change, message, tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, change_header=change)
    target = _float()
    with pytest.raises((ValueError, TypeError), match=message):
        sparqle.load(target, path)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in target.modules())


def test_a_file_without_sparqle_metadata_is_refused(tmp_path):
    safetensors_torch.save_file(_float().state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no 'sparqle' metadata: it was not written by sparqle.save"):
        sparqle.load(_float(), tmp_path / "plain.safetensors")


@pytest.mark.parametrize("what,change,message", [
    ("a missing tensor", lambda t: {k: v for k, v in t.items() if k != "2.scales"}, r"state_dict key .2\.scales. is missing"),
    ("a missing float tensor", lambda t: {k: v for k, v in t.items() if k != "2.bias"}, r"layer without bias.*another"),
    ("an unexpected tensor", lambda t: {**t, "2.extra": torch.zeros(3)}, r"unexpected keys \['2\.extra'\]"),
])
def test_missing_and_unexpected_keys_are_refused(what, change, message, tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, change_tensors=change)
    target = _float()
    with pytest.raises(ValueError, match=message):
        sparqle.load(target, path)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in target.modules())


@pytest.mark.parametrize("what,target,message", [
    ("a wider layer", lambda: nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 17)),
     r"at '2' a 16 x 24 layer with bias, but the model has Linear\(in_features=24, out_features=17"),
    ("a layer with a bias", lambda: nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 16)),
     r"at '0' a 24 x 40 layer without bias"),
    ("another module", lambda: nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Conv1d(24, 16, 1)),
     r"at '2', but the model has a Conv1d there"),
    ("fewer modules", lambda: nn.Sequential(nn.Linear(40, 24)), r"module '2', which the model does not have"),
])
def test_a_model_of_another_architecture_is_refused(what, target, message, tmp_path):
    path = _saved(tmp_path)
    model = target()
    if isinstance(model[0], nn.Linear) and what != "a layer with a bias":
        model[0].bias = None
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        sparqle.load(model, path)
    assert [type(m) for m in model.modules()] == before


def test_an_unconverted_tensor_of_another_shape_is_refused(tmp_path):
    model = sparqle.convert(nn.Sequential(nn.Linear(40, 24), nn.LayerNorm(24), nn.Linear(24, 16)), "int8",
                            filter=lambda name, m: name == "2")
    sparqle.save(model, tmp_path / "model.safetensors")
    target = nn.Sequential(nn.Linear(40, 32), nn.LayerNorm(24), nn.Linear(24, 16))
    with pytest.raises(ValueError, match=r"'0\.weight' has shape \(24, 40\).*the model has \(32, 40\)"):
        sparqle.load(target, tmp_path / "model.safetensors")
    assert type(target[2]) is nn.Linear


def test_settings_that_differ_from_a_converted_models_are_refused(tmp_path):
    """Loading into a model already converted with other settings is refused as
    load_state_dict refuses it."""
    path = _saved(tmp_path, "int4")
    with pytest.raises(ValueError, match=r"'0\._extra_state'.*saved from"):
        sparqle.load(_converted("int4-64"), path)


def test_non_persistent_buffers_on_the_meta_device_are_refused(tmp_path):
    sparqle.save(_swin("window_attention"), tmp_path / "swin.safetensors")
    with torch.device("meta"):
        target = swin.TinySwin()
    with pytest.raises(ValueError, match=r"buffer 'layers\.0\.blocks\.0\.\S+' is on the meta device and not "
                                         r"in the state_dict"):
        sparqle.load(target, tmp_path / "swin.safetensors")


def test_bad_arguments(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparqle.save({"0.weight": torch.zeros(2)}, path)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparqle.load({}, path)
    with pytest.raises(ValueError, match=r"'0\.qweight' is on the meta device"):
        sparqle.save(sparqle.convert(_float(), "int8").to("meta"), path)
    model = _float()
    model.register_module("extra", _WithExtraState())
    with pytest.raises(TypeError, match=r"'extra\._extra_state' holds a dict, not a tensor"):
        sparqle.save(model, path)
    assert not path.exists()


class _WithExtraState(nn.Module):
    def get_extra_state(self):
        return {"step": 3}

    def set_extra_state(self, state):
        pass
