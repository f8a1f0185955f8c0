"""Channel permutation for N:M sparsity (sparqle.permutation.permute_channels): the search's
known answer, the pairs found in small Hugging Face models, the function kept, heads kept
apart, the kept score raised, a permuted and converted model through save and load, and
bad arguments. The accuracy on all-MiniLM-L6-v2 is in docs/calibration.md and
tests/test_accuracy.py."""
import copy
import random

import pytest
import torch

import sparqle
from sparqle.permutation import _kept, _search, permute_channels


def test_the_search_finds_the_known_best_order():
    """Rows whose four large channels sit in one group of 2:4: the unpermuted pattern keeps
    two of them a row (score 9 + 9 + 1 + 1), any order that splits them two and two keeps
    all four (36 a row), the best there is; one head of 8 binds channels 0-7 and 8-15."""
    score = torch.tensor([[9.0, 9, 9, 9, 1, 1, 1, 1] * 2] * 3)
    assert _kept(score, 2, 4) == 3 * 2 * 20
    for head in (None, 8):
        p = _search(score, 2, 4, head, random.Random(0))
        assert sorted(p.tolist()) == list(range(16))
        assert _kept(score[:, p], 2, 4) == 3 * 2 * 36
        if head is not None:
            assert all(p[j] // head == j // head for j in range(16)), p


EXPECTED = {
    "llama": [("self_attn.o_proj", ("self_attn.v_proj",)), ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"))],
    "llama-gqa": [("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"))],
    "bert": [("attention.output.dense", ("attention.self.value",)), ("output.dense", ("intermediate.dense",))],
}


@pytest.mark.parametrize("name", ["llama", "llama-gqa", "bert"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_the_pairs_the_function_and_the_kept_score(hf_models, name, calibrated):
    """The named pairs of each block (v -> o only with as many key/value heads as query
    heads), permuted within each 16-wide head where heads bind; the model's output is
    what it was (float32 rounding); no pair's kept score falls and the 4:8 ones rise."""
    model = copy.deepcopy(hf_models[name])
    tokens = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(tokens)[0]
    run = (lambda m: m(tokens)) if calibrated else None
    done = permute_channels(model, 4, 8, calibrate=run)
    blocks = "model.layers" if name.startswith("llama") else "encoder.layer"
    prefix = lambda i, path: f"{blocks}.{i}.{path}"  # noqa: E731
    order = [(prefix(i, t), tuple(prefix(i, s) for s in sources)) for i in range(2) for t, sources in EXPECTED[name]]
    assert [(p.target, p.sources) for p in done] == order
    for p in done:
        assert p.kept_after > p.kept_before, p
        if "o_proj" in p.target or "attention.output" in p.target:
            assert all(p.permutation[j] // 16 == j // 16 for j in range(64)), p.permutation
        assert not torch.equal(p.permutation, torch.arange(len(p.permutation)))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], reference, rtol=1e-4, atol=1e-4)


def test_a_permuted_conversion_saves_and_loads(hf_models, tmp_path):
    """Permute, convert to 2:4 with calibration, save; the float model loaded from the file
    gives the same outputs (the sources' permuted rows travel in the converted layers)."""
    model = copy.deepcopy(hf_models["bert"])
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(6))
    run = lambda m: m(tokens)  # noqa: E731
    permute_channels(model, 2, 4, calibrate=run)
    sparqle.convert(model, "2:4", calibrate=run, method="sparsegpt")
    sparqle.save(model, tmp_path / "model.safetensors")
    loaded = sparqle.load(copy.deepcopy(hf_models["bert"]), tmp_path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)


def test_the_same_seed_gives_the_same_permutation(hf_models):
    first, second = (permute_channels(copy.deepcopy(hf_models["bert"]), 2, 4) for _ in range(2))
    assert all(torch.equal(a.permutation, b.permutation) for a, b in zip(first, second, strict=True))


def test_bad_arguments_and_nothing_to_permute(hf_models):
    model = copy.deepcopy(hf_models["bert"])
    with pytest.raises(ValueError, match="n:m = 3:4 is not supported"):
        permute_channels(model, 3, 4)
    with pytest.raises(TypeError, match="calibrate must be a callable"):
        permute_channels(model, 2, 4, calibrate="text")
    with pytest.raises(TypeError, match="seed must be an int"):
        permute_channels(model, 2, 4, seed=True)
    with pytest.warns(UserWarning, match="no pair of layers to permute"):
        assert permute_channels(torch.nn.Sequential(torch.nn.Linear(8, 8)), 2, 4) == []
    with pytest.warns(UserWarning, match="no pair of layers to permute"):
        assert permute_channels(model, 2, 4, filter=lambda name, m: False) == []
