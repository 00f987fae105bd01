"""Shared fixtures: a tiny trained tokenizer and tiny random models saved as sharded safetensors.

Nothing is downloaded: the tokenizer is trained here on the bundled wiki text, and models
are built from their configs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def wiki_text() -> str:
    from pipeline.bundled import bundled_text
    return bundled_text("wiki")[:200_000]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, wiki_text) -> Path:
    p = tmp_path_factory.mktemp("data") / "wiki.txt"
    p.write_text(wiki_text)
    return p


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, wiki_text):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([wiki_text[i:i + 2000] for i in range(0, len(wiki_text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_tiny_model(folder: Path, arch: str, tokenizer, layers: int = 3, shard: str = "40KB") -> Path:
    """A random tiny model of the given architecture saved with several shards and an index."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2":  # q/k/v carry biases; tied embeddings
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder), max_shard_size=shard)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tiny_tokenizer)


def tiny_config(model: Path, output: Path, data: Path, **compress):
    from pipeline.config import from_dict
    return from_dict({"model": str(model), "output": str(output),
                      "data": {"source": str(data), "calib_samples": 16, "seq_len": 32, "eval_samples": 4,
                               "batch_size": 4},
                      "compress": {"method": "svd-llm", "ratio": 0.4, **compress},
                      "run": {"threads": 1, "shard_size_mb": 0.05}})
