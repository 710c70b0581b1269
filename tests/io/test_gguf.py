"""GGUF out: the files read back with the gguf package's own reader, and the merged model loaded by
transformers' own GGUF loader computing the merged HF model's logits.

Tolerances (max |logit difference| / max |logit|, per outtype, transformers' loader dequantizing to
fp32): f32 2e-6, f16 6e-3, bf16 4e-2, q8_0 0.15 (measured on this model: 4.8e-7, 2.9e-3, 1.7e-2,
6.7e-2). The model's q/k weights are scaled up 8x so attention is sharp (and rounding errors grow
with it): one q/k projection in the wrong row order moves the logits by 165%, far beyond any
tolerance (checked below).
"""
import json

import numpy as np
import pytest
import torch

from loralab.cli import main
from loralab.errors import UserError
from loralab.io.gguf import rope_row_order, tokenizer_pre_name
from loralab.peft.adapters import save_adapter
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec, lora_modules
from tiny_tokenizer import make_tiny_bpe_tokenizer
from tinymodels import tiny_llama

TOLERANCE = {"f32": 2e-6, "f16": 6e-3, "bf16": 4e-2, "q8_0": 0.15}
TEXT = "Question: What is 17 minus 14?\nAnswer: 3<|im_end|>"


def _spec_for(name: str) -> LoraSpec:
    """Per-module rank and alpha, and rsLoRA: everything llama.cpp's single alpha cannot express."""
    if "q_proj" in name:
        return LoraSpec(r=4, alpha=16, use_rslora=True)
    if "mlp" in name:
        return LoraSpec(r=2, alpha=3, use_rslora=True)
    return LoraSpec(r=4, alpha=8, use_rslora=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = make_tiny_bpe_tokenizer()
    base = tiny_llama(0, vocab_size=len(tok) + 5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)  # 5 embedding rows past the vocabulary: padding tokens
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)  # sharp attention: the q/k row order shows in the logits
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = tiny_llama(0, vocab_size=len(tok) + 5)
    model.load_state_dict(base.state_dict())
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    inject(model, names, _spec_for)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.2)
    save_adapter(model, root / "adapter", base_model_name_or_path=str(root / "base"))
    assert main(["export", str(root / "adapter"), "--gguf", str(root / "lora.gguf")]) == 0
    for outtype in TOLERANCE:
        assert main(["export", str(root / "adapter"), "--merged-gguf", str(root / f"merged-{outtype}.gguf"),
                     "--outtype", outtype]) == 0
    return root, tok, model


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_rope_row_order_pairs_each_heads_two_halves():
    order = rope_row_order(8, 2).tolist()  # 2 heads of 4 rows: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
    assert order == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.arange(12 * 3).view(12, 3)
    assert torch.equal(w[rope_row_order(12, 1)][1], w[6])  # row 1 of llama.cpp's = the second half's row 0


def test_the_adapter_gguf_reads_back_as_llama_cpp_expects(exported):
    import gguf

    root, _, model = exported
    reader = gguf.GGUFReader(root / "lora.gguf")
    fields = _fields(reader)
    assert (fields["general.architecture"], fields["general.type"], fields["adapter.type"]) == ("llama", "adapter",
                                                                                                "lora")
    alpha = fields["adapter.lora.alpha"]
    assert alpha == json.loads((root / "adapter" / "adapter_config.json").read_text())["lora_alpha"]
    tensors = {t.name: t for t in reader.tensors}
    modules = dict(lora_modules(model))
    assert len(tensors) == 2 * len(modules)
    to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
    for name, m in modules.items():
        layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        key = f"blk.{layer}.{to_gguf[rest]}.weight"
        a, b = tensors[key + ".lora_a"], tensors[key + ".lora_b"]
        # GGUF lists dimensions fastest first: A is (in, r) there, B (r, out), as llama.cpp checks
        assert [int(x) for x in a.shape] == [m.in_features, m.r] and [int(x) for x in b.shape] == [m.r, m.out_features]
        A = torch.from_numpy(np.array(a.data)).view(m.r, m.in_features)
        B = torch.from_numpy(np.array(b.data)).view(m.out_features, m.r)
        delta = B @ A * (alpha / m.r)  # what llama.cpp adds: alpha / rank, rank = A's rows
        if "q_proj" in name or "k_proj" in name:  # back from llama.cpp's row order
            heads = 4 if "q_proj" in name else 2
            delta = delta[torch.argsort(rope_row_order(m.out_features, heads))]
        torch.testing.assert_close(delta, m.delta_weight(), atol=1e-6, rtol=1e-5)


def test_the_merged_gguf_reads_back_with_its_tokenizer(exported):
    import gguf

    root, tok, _ = exported
    reader = gguf.GGUFReader(root / "merged-q8_0.gguf")
    f = _fields(reader)
    assert (f["general.type"], f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("model", "gpt2", "gpt-2")
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.vocab_size"] == len(tok) + 5 and len(f["tokenizer.ggml.tokens"]) == len(tok) + 5
    types = f["tokenizer.ggml.token_type"]
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3  # <|endoftext|>, <|im_start|>, <|im_end|>
    assert types[10] == gguf.TokenType.NORMAL and types[-5:] == [gguf.TokenType.UNUSED] * 5
    assert f["tokenizer.ggml.tokens"][-1] == f"[PAD{len(tok) + 4}]"
    assert f["tokenizer.ggml.eos_token_id"] == 2 and f["tokenizer.ggml.add_bos_token"] is False
    assert len(f["tokenizer.ggml.merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert f["tokenizer.chat_template"] == tok.chat_template
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in kinds  # the tiny model's head is not tied


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_transformers_gguf_loader_gives_the_merged_models_logits(exported, outtype):
    from transformers import AutoModelForCausalLM

    from loralab.inference import merged_model

    root, tok, _ = exported
    merged, _, _ = merged_model(str(root / "adapter"))
    loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file=f"merged-{outtype}.gguf", dtype=torch.float32)
    ids = torch.tensor([tok.encode(TEXT, add_special_tokens=False)])
    with torch.no_grad():
        want, got = merged(ids).logits, loaded(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= TOLERANCE[outtype], (outtype, err)
    if outtype == "f32":  # a wrong q/k row order would be far outside every tolerance
        for name, p in loaded.named_parameters():
            if "q_proj" in name:
                with torch.no_grad():
                    p.copy_(p[rope_row_order(p.shape[0], 4)])
                break
        with torch.no_grad():
            wrong = loaded(ids).logits
        assert ((wrong - want).abs().max() / want.abs().max()).item() > 5 * max(TOLERANCE.values())


def test_transformers_reads_the_merged_ggufs_tokenizer_as_ours(exported):
    from transformers import AutoTokenizer

    root, tok, _ = exported
    theirs = AutoTokenizer.from_pretrained(root, gguf_file="merged-f16.gguf")
    text = "Hello, world! What is 123 plus 45?\n<|im_start|>assistant\n168<|im_end|>"
    assert theirs.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_pre_tokenizer_names():
    bpe = lambda digits: json.loads(make_tiny_bpe_tokenizer(digits=digits).backend_tokenizer.to_str())
    assert tokenizer_pre_name(bpe(False)) == "gpt-2"
    assert tokenizer_pre_name(bpe(True)) == "smollm"  # digits one by one, then GPT-2's regex
    with pytest.raises(UserError, match="llama.cpp has no pre-tokenizer matching"):
        tokenizer_pre_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_export_refuses_to_overwrite_and_needs_an_output(exported, capsys):
    root, _, _ = exported
    before = (root / "lora.gguf").read_bytes()
    assert main(["export", str(root / "adapter"), "--gguf", str(root / "lora.gguf")]) == 2
    assert "lora.gguf: exists" in capsys.readouterr().err
    assert (root / "lora.gguf").read_bytes() == before
    assert main(["export", str(root / "adapter")]) == 2
    assert "give --gguf OUT.gguf" in capsys.readouterr().err


def test_a_qwen2_model_exports_without_the_row_permutation(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = make_tiny_bpe_tokenizer(digits=True)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    assert main(["export", "--model", str(tmp_path / "qwen"), "--merged-gguf", str(tmp_path / "q.gguf"),
                 "--outtype", "f32"]) == 0
    import gguf

    fields = _fields(gguf.GGUFReader(tmp_path / "q.gguf"))
    # transformers rebuilds a qwen2 folder's tokenizer with Qwen2's own split regex: llama.cpp's "qwen2"
    assert (fields["general.architecture"], fields["tokenizer.ggml.pre"]) == ("qwen2", "qwen2")
    assert "blk.0.attn_q.bias" in {t.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32)
    ids = torch.tensor([tok.encode(TEXT, add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
