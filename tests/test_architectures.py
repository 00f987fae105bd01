"""Every supported architecture (pipeline/architectures.py) runs layer by layer exactly as its
own forward, and compresses end to end; anything else is refused in one line.

Tiny random models (hidden 64, 2-4 layers) are built from each family's config. Families
with sliding-window and global layers get a window of 8 tokens and 24- or 32-token inputs,
so that a layer given another layer type's mask or rotary embeddings changes the logits.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pipeline
from pipeline.architectures import SUPPORTED, attn_implementation, head_postprocess
from pipeline.errors import UserError
from pipeline.layerwise import Batch, LayerwiseModel
from pipeline.model_io import ModelSource, build_skeleton

SW = ["sliding_attention", "full_attention"]


def tiny_config(arch: str, vocab: int):
    """A tiny config of the family; 4 layers (sliding, global, sliding, global) where layer types differ."""
    import transformers as tf
    c = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=1,
             initializer_range=0.1)
    four = dict(num_hidden_layers=4, sliding_window=8, layer_types=SW * 2)
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh")
    if arch == "llama":
        return tf.LlamaConfig(**c, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**c, sliding_window=8)
    if arch == "ministral":
        return tf.MinistralConfig(**c | four, head_dim=16)
    if arch == "qwen2":  # layers >= max_window_layers slide; tied embeddings, q/k/v biases
        return tf.Qwen2Config(**c | dict(num_hidden_layers=3), use_sliding_window=True, sliding_window=8,
                              max_window_layers=1, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**c | dict(num_hidden_layers=3), head_dim=16, use_sliding_window=True,
                              sliding_window=8, max_window_layers=1)
    if arch == "gemma":
        return tf.GemmaConfig(**c, head_dim=16, hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":  # both soft-cappings small enough to matter on random weights
        return tf.Gemma2Config(**c | four, **gemma, attn_logit_softcapping=5.0, final_logit_softcapping=2.0)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**c | four, **gemma, final_logit_softcapping=2.0)
    if arch == "phi3":
        return tf.Phi3Config(**c)
    if arch == "olmo":
        return tf.OlmoConfig(**c)
    if arch == "olmo2":
        return tf.Olmo2Config(**c)
    if arch == "cohere":
        return tf.CohereConfig(**c, logit_scale=0.25)
    if arch == "cohere2":
        return tf.Cohere2Config(**c | four, logit_scale=0.25)
    if arch == "granite":
        return tf.GraniteConfig(**c, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                logits_scaling=4.0)
    if arch == "starcoder2":
        return tf.Starcoder2Config(**c, sliding_window=8)
    raise ValueError(arch)


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_tokenizer):
    """tiny_model(arch) -> folder of a random tiny model (seed 0), 40 KB shards, with the tokenizer."""
    def build(arch: str) -> Path:
        if arch not in _BUILT:
            from transformers import AutoModelForCausalLM
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tiny_tokenizer)))
            folder = tmp_path_factory.mktemp(arch)
            model.save_pretrained(str(folder), max_shard_size="40KB")
            tiny_tokenizer.save_pretrained(str(folder))
            _BUILT[arch] = folder
        return _BUILT[arch]
    return build


_REFERENCE: dict[tuple[Path, tuple], torch.Tensor] = {}


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward, with the attention implementation the pipeline builds with."""
    key = (folder, tuple(ids.flatten().tolist()))
    if key not in _REFERENCE:
        from transformers import AutoConfig, AutoModelForCausalLM
        impl = attn_implementation(AutoConfig.from_pretrained(str(folder)))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=impl)
        with torch.no_grad():
            _REFERENCE[key] = model.eval()(ids).logits
    return _REFERENCE[key]


def layerwise_logits(lw: LayerwiseModel, batches: list[Batch]) -> torch.Tensor:
    """Every layer in turn, then the head: dense logits [N, L, V]."""
    for i in range(len(lw.layers)):
        with lw.layer(i) as layer:
            batches = lw.run_layer(layer, batches)
    rows: dict[int, torch.Tensor] = {}
    lw.map_logits(batches, lambda row, logits: rows.__setitem__(row, logits))
    return torch.stack([rows[r] for r in sorted(rows)])


def dense_lw(folder: Path) -> LayerwiseModel:
    src = ModelSource(str(folder))
    return LayerwiseModel(build_skeleton(src.config), src, torch.float32)


def windows(vocab: int, n: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_logits(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


ARCHS = sorted(SUPPORTED)


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_logits_equal_the_models_forward(tiny_model, tiny_tokenizer, arch):
    folder = tiny_model(arch)
    ids = windows(len(tiny_tokenizer))
    ref = reference_logits(folder, ids)
    lw = dense_lw(folder)
    got = layerwise_logits(lw, lw.embed(ids, batch_size=2))  # batches of 2 and 1 windows
    assert_same_logits(got, ref)
    print(f"{arch}: max relative logit difference {rel_diff(got, ref):.2e}")
    if head_postprocess(lw.model.config) is not None:  # the head's post-processing is needed: without it, not equal
        lw._post = None
        raw = layerwise_logits(lw, lw.embed(ids, batch_size=2))
        assert rel_diff(raw, ref) > 1e-2


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "cohere2", "qwen2", "ministral"])
def test_layer_zero_arguments_for_every_layer_would_be_wrong(tiny_model, tiny_tokenizer, arch):
    """The former behaviour (layer 0's mask and rotary embeddings reused by every layer) gives
    other logits on sliding/global models, so the test above has teeth."""
    folder = tiny_model(arch)
    ids = windows(len(tiny_tokenizer))
    ref = reference_logits(folder, ids)
    lw = dense_lw(folder)
    batches = [Batch(b.hidden, (b.inputs[0],) * len(b.inputs)) for b in lw.embed(ids, batch_size=2)]
    old = layerwise_logits(lw, batches)
    print(f"{arch}: layer-0 arguments for every layer: max relative logit difference {rel_diff(old, ref):.2e}")
    assert rel_diff(old, ref) > 1e-2


def test_layer_types_get_their_own_shared_arguments(tiny_model, tiny_tokenizer):
    """Layers of one attention type get the same mask and rotary objects (shared, not copied),
    the two types different ones; the real layers are back in place after embed, even when
    the forward fails; a recorder shows the attributes of the layer it stands in for."""
    from pipeline.layerwise import _Capture, _Recorder
    lw = dense_lw(tiny_model("gemma3_text"))
    layers = list(lw.layers)
    (b,) = lw.embed(windows(len(tiny_tokenizer), n=2), batch_size=2)
    assert all(m is l for m, l in zip(lw.layers, layers))
    assert b.inputs[0] is b.inputs[2] and b.inputs[1] is b.inputs[3] and b.inputs[0] is not b.inputs[1]
    k0, k1 = b.inputs[0][1], b.inputs[1][1]
    assert k0["position_embeddings"] is not k1["position_embeddings"]
    assert k0["attention_mask"] is not k1["attention_mask"]
    assert k0["position_ids"] is k1["position_ids"]
    assert not {"cache", "past_key_values"} & set(k0)
    with pytest.raises(IndexError):  # a token id past the vocabulary: the embedding fails
        lw.embed(torch.full((1, 4), 10**6), batch_size=1)
    assert all(m is l for m, l in zip(lw.layers, layers))
    rec = _Recorder(layers[1], 1, _Capture(4), last=False)
    assert rec.self_attn is layers[1].self_attn and rec.self_attn.layer_type == "full_attention"
    assert Batch(b.hidden).inputs == ()  # a head-only batch


def test_supported_checkpoints_need_no_key_conversion():
    """The pipeline reads shards by module name: transformers must not rename a supported
    family's checkpoint keys on load (it does for gpt_neox: embed_out -> lm_head)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    for model_type in SUPPORTED:
        assert get_checkpoint_conversion_mapping(model_type) is None, model_type
        assert get_checkpoint_conversion_mapping(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]) is None, model_type


_COMPRESSED: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="module")
def compressed(tiny_model, tmp_path_factory, text_file):
    """compressed(arch, method="svd-llm") -> checkpoint folder of the tiny model at ratio 0.4."""
    def build(arch: str, method: str = "svd-llm") -> Path:
        if (arch, method) not in _COMPRESSED:
            from pipeline.config import from_dict
            run = tmp_path_factory.mktemp(f"{arch}-{method}")
            cfg = from_dict({"model": str(tiny_model(arch)), "output": str(run / "run"),
                             "data": {"source": str(text_file), "calib_samples": 8, "seq_len": 32, "eval_samples": 2,
                                      "batch_size": 4},
                             "compress": {"method": method, "ratio": 0.4},
                             "run": {"threads": 1, "shard_size_mb": 0.05, "eval_dense": False},
                             "ray": {"enabled": False}})
            report = pipeline.compress(cfg, progress=False)
            assert report["achieved_ratio"]["linear"] >= 0.35
            _COMPRESSED[arch, method] = run / "run" / "checkpoint"
        return _COMPRESSED[arch, method]
    return build


@pytest.mark.parametrize("arch", ARCHS)
def test_compresses_end_to_end(compressed, arch):
    from pipeline.checkpoint import compressed_skeleton
    ckpt = str(compressed(arch))
    model = pipeline.load_compressed(ckpt).eval()
    ids = windows(model.config.vocab_size, n=2, length=32)
    with torch.no_grad():
        loaded = model(ids).logits
    src = ModelSource(ckpt)
    lw = LayerwiseModel(compressed_skeleton(src.config), src, torch.float32)
    expected = layerwise_logits(lw, lw.embed(ids, batch_size=2))
    assert torch.isfinite(loaded).all()
    assert_same_logits(loaded, expected)
    print(f"{arch}: compressed checkpoint, load_compressed vs layer by layer: max relative logit difference "
          f"{rel_diff(loaded, expected):.2e}")


#: run in a child process whose sys.path holds no trace of this project: load each checkpoint
#: with plain transformers, save its logits on fixed windows, and generate a few tokens
PLAIN_LOAD = """
import importlib.util, json, sys
root = sys.argv[1]
sys.path = [p for p in sys.path if p not in ("", root, root + "/")]
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                 and "editable" not in str(getattr(f, "__name__", "")).lower()]
for mod in ("pipeline", "soco", "cluster"):
    assert importlib.util.find_spec(mod) is None, f"{mod} is importable"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for ckpt, ids_file, out_file in json.loads(sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = model(ids).logits
    prompt = tok("The history of", return_tensors="pt").input_ids
    new = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("LowRankLinear", "Linear")})
    torch.save({"logits": logits, "new_tokens": new, "class": type(model).__name__, "kinds": kinds}, out_file)
"""


@pytest.mark.slow
def test_plain_transformers_loads_every_checkpoint(compressed, tmp_path):
    """Every architecture (and a LoRAP checkpoint with narrowed MLPs) loads with
    `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` where this project is
    not importable, gives load_compressed's logits, and generates."""
    import json
    import subprocess
    import sys
    cases = [(arch, "svd-llm") for arch in ARCHS] + [("llama", "lorap")]
    jobs, expected = [], {}
    for arch, method in cases:
        ckpt = compressed(arch, method)
        model = pipeline.load_compressed(str(ckpt)).eval()
        ids = windows(model.config.vocab_size, n=2, length=32)
        with torch.no_grad():
            expected[arch, method] = model(ids).logits
        torch.save(ids, tmp_path / f"{arch}-{method}.ids")
        jobs.append((str(ckpt), str(tmp_path / f"{arch}-{method}.ids"), str(tmp_path / f"{arch}-{method}.out")))
    root = str(Path(pipeline.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, root, json.dumps(jobs)], capture_output=True, text=True,
                       timeout=900, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    for (arch, method), (_, _, out) in zip(cases, jobs):
        got = torch.load(out)
        assert got["class"].startswith("Soco") and got["class"].endswith("ForCausalLM"), got["class"]
        assert "LowRankLinear" in got["kinds"] or method == "lorap"
        assert got["new_tokens"].numel() == 4
        assert_same_logits(got["logits"], expected[arch, method])
        print(f"{arch} {method}: plain transformers vs load_compressed: max relative logit difference "
              f"{rel_diff(got['logits'], expected[arch, method]):.2e}")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gemma3", "bert", "gpt_neox"])
def test_unsupported_model_type_is_refused_in_one_line(model_type):
    from transformers import AutoConfig
    config = AutoConfig.for_model(model_type)
    with pytest.raises(UserError) as e:
        build_skeleton(config)
    msg = str(e.value)
    assert "\n" not in msg and f"'{model_type}'" in msg and "llama" in msg and "gemma3_text" in msg
