import torch

from loralab.data.formats import Example
from loralab.data.prompts import encode_all
from loralab.eval.metrics import exact_match, generate_answers
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec
from loralab.train.loss import mean_loss
from tinymodels import tiny_llama


def test_bf16_weights_come_back_bit_identical_after_cpu_decoding(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = generate_answers(model, tok, ["Question: What is 1 plus 2?\nAnswer:", "Hi"], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


def test_left_padded_batches_give_the_same_answers_as_one_by_one(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_llama(1, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = ["Question: What is 1 plus 2?\nAnswer:", "Q:", "Question: What is 33 minus 4?\nAnswer:"]
    batched = generate_answers(model, tok, prompts, batch_size=3, max_new_tokens=5, stop_at_newline=False)
    single = [generate_answers(model, tok, [p], batch_size=1, max_new_tokens=5, stop_at_newline=False)[0]
              for p in prompts]
    assert batched == single


def test_exact_match_counts_hits(tiny_tokenizer, monkeypatch):
    import loralab.eval.metrics as ev
    exs = [Example(prompt="Question: What is 1 plus 2?\nAnswer:", response=" 3"),
           Example(prompt="Question: What is 5 minus 7?\nAnswer:", response=" -2")]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: [ev.Generation(" 3\nQuestion", False),
                                                          ev.Generation(" 2", True)])
    r = exact_match(None, tiny_tokenizer, exs, template="raw")
    assert r["correct"] == 1 and r["accuracy"] == 0.5 and r["n"] == 2 and r["stopped"] == 1


def test_mean_loss_is_per_label_token(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_llama(2, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    enc, _ = encode_all([Example(prompt="ab", response="cdef"), Example(prompt="x", response="y")], tok,
                        template="raw")
    one = [mean_loss(model, [e], batch_size=1, pad_id=tok.pad_token_id) for e in enc]
    both = mean_loss(model, enc, batch_size=2, pad_id=tok.pad_token_id)
    n = [e.n_labels for e in enc]
    assert abs(both - (one[0] * n[0] + one[1] * n[1]) / sum(n)) < 1e-5


def test_generation_feeds_the_output_layer_contiguous_rows_and_removes_its_hook(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_llama(1, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    head = model.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))  # what it got
    prompts = ["Question: What is 1 plus 2?\nAnswer:", "Question: What is 33 minus 4?\nAnswer:"]
    try:
        head(torch.zeros(2, 4, head.in_features)[:, -1:])
        assert seen == [False]  # the probe sees a strided slice as it is
        seen.clear()
        answers = generate_answers(model, tok, prompts, batch_size=2, max_new_tokens=3, stop_at_newline=False)
    finally:
        probe.remove()
    assert seen and all(seen)  # the prefill's last-position slice arrives copied
    assert not head._forward_pre_hooks  # nothing left behind
    plain = [tok.decode(model.generate(**tok(p, return_tensors="pt"), max_new_tokens=3, do_sample=False,
                                       pad_token_id=tok.pad_token_id)[0, len(tok(p).input_ids):],
                        skip_special_tokens=True) for p in prompts]
    assert answers == plain  # same greedy answers as transformers' own generate


def test_a_shared_prompt_prefix_is_prefilled_once_and_answers_stay_the_same(tiny_tokenizer, monkeypatch):
    import loralab.eval.metrics as ev
    tok = tiny_tokenizer
    model = tiny_llama(3, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = ["Question: What is 1 plus 2?\nAnswer:", "Question: What is 33 minus 4?\nAnswer:",
               "Question: What is 5 plus 61?\nAnswer:", "Question: What is 7?\nAnswer:"]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    shared = ev.shared_prefix_length(ids)
    assert shared >= 5
    widths = []
    probe = model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: widths.append(tuple(args[0].shape)))
    monkeypatch.setattr(ev, "MIN_SHARED_ROWS", 1)
    try:
        once = generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=5, stop_at_newline=False)
    finally:
        probe.remove()
    longest = max(len(x) for x in ids)
    assert widths[0] == (1, shared) and widths[1] == (4, longest - shared)  # the prefix at batch 1, then the rest
    monkeypatch.setattr(ev, "MIN_SHARED_ROWS", 10**9)  # every row prefilled whole
    assert once == generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=5, stop_at_newline=False)
    single = [generate_answers(model, tok, [p], batch_size=1, max_new_tokens=5, stop_at_newline=False)[0]
              for p in prompts]
    assert once == single  # and transformers' generate, one prompt at a time


def test_a_sliding_window_model_prefills_every_row_whole(tiny_tokenizer, monkeypatch):
    import loralab.eval.metrics as ev
    tok = tiny_tokenizer
    model = tiny_llama(3, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    model.config.sliding_window = 64
    monkeypatch.setattr(ev, "MIN_SHARED_ROWS", 1)
    ids = [tok.encode(p, add_special_tokens=False) for p in ["Question: 1?", "Question: 22?"]]
    inputs = ev._batch_inputs(model, ids, tok.pad_token_id, torch.device("cpu"), share=True)
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].shape[1] == max(map(len, ids))
