"""quantize_ / prune_ / sparsify_ on real Hugging Face models built from tiny configs (no
downloads): GPT-2 (Conv1D layers, tied lm_head), Llama (tied and untied, an FFN width that block
sizes do not divide), BERT (MLM decoder tied, classification head); save_pretrained ->
from_pretrained round trips keep the compressed layers and the logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import bigkernels as bk  # noqa: E402
from bigkernels.nn import QuantLinear, SparseLinear  # noqa: E402
from bigkernels.nn import _layers  # noqa: E402
from conftest import assert_close  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 96


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(seed=0, tied=True, ffn=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=ffn, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32,
                                   tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert_config():
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=VOCAB, max_position_embeddings=32)


def ids(seed=1, shape=(2, 9)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def param_bytes(model):
    """Bytes of the model's distinct tensors (a tied weight counted once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


GPT2_LINEARS = [f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                           "mlp.c_proj")]


# ----- layer selection on real models ---------------------------------------------------------
def test_gpt2_conv1d_layers_are_quantised_and_the_tied_head_left_alone(caplog):
    model = gpt2()
    x = ids()
    ref = logits(model, x)
    before = param_bytes(model)
    with caplog.at_level("INFO", logger="bigkernels"):
        bk.quantize_(model, mode="w8a16")
    assert "quantize_: 8 layers -> QuantLinear(w8a16)" in caplog.text
    assert "left alone: lm_head (weight tied to transformer.wte)" in caplog.text
    assert [fqn for fqn, m in model.named_modules() if isinstance(m, QuantLinear)] == GPT2_LINEARS
    assert model.lm_head.weight is model.transformer.wte.weight and param_bytes(model) < before
    got = logits(model, x)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    # asking for the tied head alone: warned, still tied, no memory grown
    model = gpt2()
    with pytest.warns(UserWarning) as caught:
        bk.quantize_(model, filter_fn=lambda m, fqn: fqn == "lm_head")
    assert "lm_head (weight tied to transformer.wte: replacing it would untie it" in str(caught[0].message)
    assert model.lm_head.weight is model.transformer.wte.weight and param_bytes(model) == before


def test_gpt2_conv1d_pruned_along_inputs_kept_zero_and_sparsified():
    model = gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    bk.prune_(model, pattern="2:4")
    for fqn in GPT2_LINEARS:
        layer = model.get_submodule(fqn)
        assert layer.weight_mask.shape == layer.weight.shape  # Conv1D layout [in, out]
        groups = (_layers.linear_weight(layer) != 0).reshape(layer.weight.shape[1], -1, 4).sum(-1)
        assert int(groups.max()) == 2  # 2 of every 4 *inputs*
    assert torch.equal(model.transformer.wte.weight, wte) and not hasattr(model.lm_head, "weight_mask")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        model(ids(), labels=ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    c_fc = model.transformer.h[0].mlp.c_fc
    assert (c_fc.weight[~c_fc.weight_mask] == 0).all()
    x = ids(2)
    ref = logits(model, x)
    bk.sparse.sparsify_(model)
    assert all(isinstance(model.get_submodule(f), SparseLinear) for f in GPT2_LINEARS)
    assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5, what="GPT-2 2:4 sparsified")


@pytest.mark.parametrize("tied", [True, False])
def test_llama_prune_defaults_and_block_sizes_that_do_not_divide_the_ffn(tied):
    model = llama(tied=tied, ffn=88)  # 88 = 5.5 blocks of 16, as Llama-2's 688 is of 64
    with pytest.warns(UserWarning, match=r"left unpruned, their shape does not fit pattern='block': "
                                         r"model.layers.0.mlp.gate_proj \(block_size 16 does not divide"):
        bk.prune_(model, sparsity=0.5, pattern="block", block_size=16)
    pruned = {fqn for fqn, m in model.named_modules() if hasattr(m, "weight_mask")}
    assert pruned == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    assert (model.model.embed_tokens.weight != 0).all() and (model.lm_head.weight != 0).all()
    x = ids()
    ref = logits(model, x)
    bk.sparse.sparsify_(model)
    assert isinstance(model.model.layers[1].self_attn.k_proj, SparseLinear)
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5, what="Llama block-sparsified")


def test_bert_heads_are_left_alone():
    mlm = transformers.BertForMaskedLM(bert_config()).eval()
    words = mlm.bert.embeddings.word_embeddings.weight.detach().clone()
    bk.prune_(mlm, sparsity=0.5)
    assert not hasattr(mlm.cls.predictions.decoder, "weight_mask")  # output head, tied to the word embeddings
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight, words)
    pruned = {fqn for fqn, m in mlm.named_modules() if hasattr(m, "weight_mask")}
    assert len(pruned) == 13 and "cls.predictions.transform.dense" in pruned
    clf = transformers.BertForSequenceClassification(bert_config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        bk.prune_(clf, sparsity=0.5)
    assert not hasattr(clf.classifier, "weight_mask")  # the layer that produces the logits
    assert hasattr(clf.bert.encoder.layer[1].output.dense, "weight_mask")
    bk.quantize_(mlm, mode="w8a8")
    assert type(mlm.cls.predictions.decoder) is nn.Linear  # tied: never replaced
    assert isinstance(mlm.cls.predictions.transform.dense, QuantLinear)


# ----- save_pretrained -> from_pretrained ----------------------------------------------------
def _compress(model, variant):
    if variant == "w8a16":
        bk.quantize_(model, mode="w8a16")
    elif variant == "w8a8+smoothquant":
        bk.quantize_(model, mode="w8a8", calibration_data=[ids(7), ids(8)])
    elif variant == "pruned":
        bk.prune_(model, pattern="2:4")
    else:
        kw = {"2:4": {}, "unstructured": dict(sparsity=0.7), "block": dict(sparsity=0.5, block_size=16)}[variant]
        bk.prune_(model, pattern=variant, **kw)
        bk.sparse.sparsify_(model)
    return model


def _layer_types(model):
    return {fqn: (type(m).__name__, getattr(m, "mode", None), getattr(m, "pattern", None),
                  getattr(m, "smooth_scale", None) is not None, hasattr(m, "weight_mask"))
            for fqn, m in model.named_modules() if _layers.is_linear_like(m) or _layers.compressed_type(m)}


VARIANTS = ["w8a16", "w8a8+smoothquant", "2:4", "unstructured", "block", "pruned"]


@pytest.mark.parametrize("arch", ["gpt2", "llama-tied"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_from_pretrained_round_trip(arch, variant, tmp_path, force_linear_dispatch):
    force_linear_dispatch("kernel")
    model = _compress(gpt2() if arch == "gpt2" else llama(), variant)
    x = ids(3)
    ref = logits(model, x)
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert saved["quant_method"] == "bigkernels" and len(saved["layers"]) == (8 if arch == "gpt2" else 14)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _layer_types(loaded) == _layer_types(model)
    assert torch.equal(logits(loaded, x), ref), variant
    head, emb = (loaded.lm_head, loaded.transformer.wte if arch == "gpt2" else loaded.model.embed_tokens)
    assert head.weight is emb.weight  # still tied
    if variant == "pruned":  # masks restored and kept through training, pattern known to sparsify_
        layer = dict(loaded.named_modules())[next(iter(saved["layers"]))]
        opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
        loaded(x, labels=x).loss.backward()
        opt.step()
        assert (layer.weight[~layer.weight_mask] == 0).all()
        bk.sparse.sparsify_(loaded)
        assert all(m.pattern == "2:4" for m in loaded.modules() if isinstance(m, SparseLinear))


def test_round_trip_twice_dtype_and_fine_tuning(tmp_path, force_linear_dispatch):
    force_linear_dispatch("kernel")
    model = _compress(llama(tied=False), "w8a8+smoothquant")
    model.save_pretrained(tmp_path / "a")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # a loaded model saves again
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    layer = again.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.compute_dtype == torch.bfloat16
    assert layer.weight_scale.dtype == torch.float32 and layer.smooth_scale.dtype == torch.float32
    assert isinstance(again.lm_head, QuantLinear)  # untied: quantised like every other layer
    x = ids(4)
    assert_close(logits(again, x).float(), logits(model, x), rtol=0.1, atol=0.1, what="bf16 load")
    loaded.half()  # transformers refuses .half() on "quantized" models; these layers follow it
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.float16


def test_load_errors_name_what_is_wrong(tmp_path):
    model = _compress(gpt2(), "w8a16")
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.load(open(path))
    layers = config["quantization_config"]["layers"]
    layers["transformer.h.0.attn.c_attn"]["type"] = "CodebookLinear"
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="compressed layers of type CodebookLinear, unknown to this bigkernels"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    layers["transformer.h.0.attn.c_attn"]["type"] = "QuantLinear"
    layers["transformer.h.7.attn.c_attn"] = layers.pop("transformer.h.0.attn.c_attn")
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="compressed layer 'transformer.h.7.attn.c_attn', which this model"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_model_quantised_by_another_method_is_not_recorded_over():
    model = gpt2()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.warns(UserWarning, match="already quantised by 'gptq'"):
        bk.quantize_(model, mode="w8a16")
    assert model.config.quantization_config == {"quant_method": "gptq", "bits": 4}


def test_import_bigkernels_does_not_import_transformers():
    code = textwrap.dedent("""
        import sys
        import bigkernels
        assert "transformers" not in sys.modules, "import bigkernels imported transformers"
        from bigkernels import integrations
        assert any(isinstance(f, integrations._AfterImport) for f in sys.meta_path)
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(bk.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_registration_after_import_hook_and_when_already_imported(tmp_path, monkeypatch):
    """The post-import hook on a throwaway module: the callback runs once the module has run, the
    module keeps its own loader, the hook removes itself. Then the other path: transformers'
    table already imported when bigkernels installs (here, this process), registered at once."""
    from bigkernels import integrations
    from transformers.quantizers import auto

    (tmp_path / "bk_probe_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = integrations._AfterImport("bk_probe_module", lambda: seen.append(sys.modules["bk_probe_module"].VALUE))
    sys.meta_path.insert(0, hook)
    try:
        import bk_probe_module
    finally:
        hook.remove()
        sys.modules.pop("bk_probe_module", None)
    assert seen == [42] and hook not in sys.meta_path
    assert not isinstance(bk_probe_module.__loader__, integrations._Loader)
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "bigkernels")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "bigkernels")
    integrations.install()
    assert auto.AUTO_QUANTIZER_MAPPING["bigkernels"].__name__ == "BigkernelsHfQuantizer"
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["bigkernels"].__name__ == "BigkernelsConfig"
