import pytest

from loralab.data.formats import Example
from loralab.data.prompts import ALPACA_PREAMBLE, IGNORE_INDEX, encode, encode_all, render_prompt
from loralab.errors import UserError
from tiny_tokenizer import DEFAULT_SYSTEM, make_tiny_tokenizer

EOT = "<|im_end|>"


def chat(*turns):
    roles = ("user", "assistant")
    return Example(messages=[{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], source="d.jsonl:1")


def labelled_runs(tok, enc):
    """The decoded text of each contiguous run of labelled tokens, checking labels copy the ids."""
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tid
            cur.append(tid)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_chat_mask_token_by_token(tiny_tokenizer):
    enc = encode(chat("hi", "yo"), tiny_tokenizer)
    text = tiny_tokenizer.decode(enc.input_ids)
    expected_text = (f"<|im_start|>system\n{DEFAULT_SYSTEM}{EOT}\n<|im_start|>user\nhi{EOT}\n"
                     f"<|im_start|>assistant\nyo{EOT}\n")
    assert text == expected_text
    # Character-level tokenizer: token k is character k except the special tokens, so the expected
    # mask is exactly: "y", "o", <|im_end|> labelled, and nothing else.
    first = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    pieces = [tiny_tokenizer.decode([t]) for t in enc.input_ids]
    assert [pieces[i] for i in first] == ["y", "o", EOT]
    assert first == [len(pieces) - 4, len(pieces) - 3, len(pieces) - 2]  # the final "\n" is not learned
    assert not enc.truncated


def test_multi_turn_labels_every_assistant_turn(tiny_tokenizer):
    enc = encode(chat("hi", "yo", "and?", "more"), tiny_tokenizer)
    assert labelled_runs(tiny_tokenizer, enc) == ["yo" + EOT, "more" + EOT]


def test_assistant_text_repeated_in_user_turn_is_not_labelled(tiny_tokenizer):
    enc = encode(chat("say ok", "ok"), tiny_tokenizer)
    assert labelled_runs(tiny_tokenizer, enc) == ["ok" + EOT]
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == 3


def test_system_prompt_none_removes_injected_default(tiny_tokenizer):
    enc = encode(chat("hi", "yo"), tiny_tokenizer, system_prompt=None)
    text = tiny_tokenizer.decode(enc.input_ids)
    assert text == f"<|im_start|>user\nhi{EOT}\n<|im_start|>assistant\nyo{EOT}\n"
    assert labelled_runs(tiny_tokenizer, enc) == ["yo" + EOT]
    assert encode(chat("hi", "yo"), tiny_tokenizer, system_prompt="none").input_ids == enc.input_ids


def test_system_prompt_text_and_datas_own_system_message(tiny_tokenizer):
    text = tiny_tokenizer.decode(encode(chat("hi", "yo"), tiny_tokenizer, system_prompt="Be brief.").input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    own = Example(messages=[{"role": "system", "content": "Mine."}] + chat("hi", "yo").messages)
    for sp in (None, "Other."):
        t = tiny_tokenizer.decode(encode(own, tiny_tokenizer, system_prompt=sp).input_ids)
        assert t.startswith("<|im_start|>system\nMine.<|im_end|>") and "Other." not in t


def test_system_prompt_none_keeps_a_preamble_before_the_system_turn():
    # A Llama-3-like template: a BOS-like preamble, then turns; the default system turn is injected.
    template = ("{{ '<|endoftext|>' }}{% for m in messages %}"
                "{% if loop.first and m['role'] != 'system' %}{{ '[system]\nDEFAULT' + '<|im_end|>' }}{% endif %}"
                "{{ '[' + m['role'] + ']\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[assistant]\n' }}{% endif %}")
    tok = make_tiny_tokenizer(template)
    enc = encode(chat("hi", "yo"), tok, system_prompt=None)
    assert tok.decode(enc.input_ids) == f"<|endoftext|>[user]\nhi{EOT}[assistant]\nyo{EOT}"
    assert labelled_runs(tok, enc) == ["yo" + EOT]
    assert render_prompt(chat("hi", "yo"), tok, system_prompt=None) == f"<|endoftext|>[user]\nhi{EOT}[assistant]\n"


def test_raw_example_masks_prompt_and_learns_response_and_eos(tiny_tokenizer):
    ex = Example(prompt="Question: What is 1 plus 2?\nAnswer:", response=" 3")
    enc = encode(ex, tiny_tokenizer)
    assert tiny_tokenizer.decode(enc.input_ids) == ex.prompt + " 3" + EOT
    assert labelled_runs(tiny_tokenizer, enc) == [" 3" + EOT]
    assert enc.labels[:len(ex.prompt)] == [IGNORE_INDEX] * len(ex.prompt)


def test_plain_text_learns_every_token(tiny_tokenizer):
    enc = encode(Example(response="all of it"), tiny_tokenizer, template="chat")
    assert enc.labels == enc.input_ids
    assert tiny_tokenizer.decode(enc.input_ids) == "all of it" + EOT


def test_alpaca_template_format_and_mask(tiny_tokenizer):
    enc = encode(chat("Add 1 and 2", "3"), tiny_tokenizer, template="alpaca")
    assert tiny_tokenizer.decode(enc.input_ids) == (
        f"{ALPACA_PREAMBLE}\n\n### Instruction:\nAdd 1 and 2\n\n### Response:\n3{EOT}")
    assert labelled_runs(tiny_tokenizer, enc) == ["3" + EOT]
    none_enc = encode(chat("x", "y"), tiny_tokenizer, template="alpaca", system_prompt=None)
    none = tiny_tokenizer.decode(none_enc.input_ids)
    assert none == f"### Instruction:\nx\n\n### Response:\ny{EOT}"


def test_auto_uses_alpaca_without_chat_template():
    tok = make_tiny_tokenizer(chat_template=None)
    enc = encode(chat("q", "a"), tok)
    assert tok.decode(enc.input_ids).endswith("### Instruction:\nq\n\n### Response:\na" + EOT)
    with pytest.raises(UserError, match="data.template"):
        encode(chat("q", "a"), tok, template="chat")


def test_forcing_chat_on_a_raw_example_makes_one_exchange(tiny_tokenizer):
    ex = Example(prompt="Question: What is 2 plus 2?\nAnswer:", response=" 4")
    enc = encode(ex, tiny_tokenizer, template="chat", system_prompt=None)
    assert tiny_tokenizer.decode(enc.input_ids) == (
        f"<|im_start|>user\nQuestion: What is 2 plus 2?\nAnswer:{EOT}\n<|im_start|>assistant\n4{EOT}\n")
    assert labelled_runs(tiny_tokenizer, enc) == ["4" + EOT]


def test_bad_template_choices(tiny_tokenizer):
    with pytest.raises(UserError, match=r"d.jsonl:1: data.template=raw"):
        encode(chat("q", "a"), tiny_tokenizer, template="raw")
    with pytest.raises(UserError, match="data.template"):
        encode(chat("q", "a"), tiny_tokenizer, template="llama")


@pytest.mark.parametrize("template,system_prompt", [("auto", "default"), ("auto", None), ("alpaca", "default"),
                                                    ("chat", "Be brief."), ("raw", "default")])
def test_render_prompt_is_the_training_text_before_the_last_response(tiny_tokenizer, template, system_prompt):
    ex = Example(prompt="Q:", response=" 7") if template == "raw" else chat("hi", "yo", "again", "final")
    enc = encode(ex, tiny_tokenizer, template=template, system_prompt=system_prompt)
    text = tiny_tokenizer.decode(enc.input_ids)
    prompt = render_prompt(ex, tiny_tokenizer, template=template, system_prompt=system_prompt)
    last = " 7" if template == "raw" else "final"
    assert text.startswith(prompt) and text[len(prompt):].startswith(last)
    # Encoding the prompt alone gives the same tokens as the training sequence's start.
    ids = tiny_tokenizer.encode(prompt, add_special_tokens=False)
    assert enc.input_ids[:len(ids)] == ids


def test_render_prompt_of_a_string(tiny_tokenizer):
    no_system = render_prompt("hi", tiny_tokenizer, system_prompt=None)
    assert no_system == f"<|im_start|>user\nhi{EOT}\n<|im_start|>assistant\n"
    assert render_prompt("hi", tiny_tokenizer, template="raw") == "hi"
    assert render_prompt("hi", tiny_tokenizer, template="alpaca").endswith("### Instruction:\nhi\n\n### Response:\n")


def test_truncation_is_flagged_and_counted(tiny_tokenizer):
    long = Example(prompt="p", response="a long response here")
    short = Example(prompt="p", response="ok")
    enc = encode(long, tiny_tokenizer, max_seq_len=8)
    assert len(enc.input_ids) == len(enc.labels) == 8 and enc.truncated
    assert labelled_runs(tiny_tokenizer, enc) == ["a long "]
    out, stats = encode_all([long, short], tiny_tokenizer, max_seq_len=8)
    assert len(out) == 2 and stats["n"] == 2 and stats["n_truncated"] == 1 and stats["n_dropped"] == 0
    assert stats["n_label_tokens"] == 7 + 3


def test_examples_truncated_to_no_label_are_dropped(tiny_tokenizer):
    gone = Example(prompt="a very long prompt", response="x", source="d.jsonl:3")
    kept = Example(prompt="p", response="ok")
    out, stats = encode_all([gone, kept], tiny_tokenizer, max_seq_len=6)
    assert len(out) == 1 and out[0].labels[1:] != [IGNORE_INDEX] * 5
    assert stats["n_dropped"] == 1 and stats["n_truncated"] == 1 and stats["first_dropped"] == "d.jsonl:3"


def test_fully_masked_dataset_is_an_error(tiny_tokenizer):
    data = [Example(prompt="a very long prompt", response="x"), Example(prompt="another long one", response="y")]
    with pytest.raises(UserError, match=r"data.max_seq_len=5"):
        encode_all(data, tiny_tokenizer, max_seq_len=5)
    with pytest.raises(UserError, match="data.max_seq_len"):
        encode(data[0], tiny_tokenizer, max_seq_len=0)


def test_template_that_trims_contents_still_masks_the_right_turn():
    # Exact-position matching fails (the template trims " ok "), so the reply is searched for, and
    # only after the prompt: the "ok" inside the user turn must stay masked.
    template = ("{% for m in messages %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] | trim) + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = make_tiny_tokenizer(template)
    enc = encode(chat("say ok", " ok "), tok)
    assert tok.decode(enc.input_ids) == f"<|im_start|>user\nsay ok{EOT}\n<|im_start|>assistant\nok{EOT}\n"
    assert labelled_runs(tok, enc) == ["ok" + EOT]
    n = len(enc.input_ids)
    assert [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX] == [n - 4, n - 3, n - 2]


def test_raw_template_error_names_the_records_actual_format(tmp_path, tiny_tokenizer):
    from loralab.data.formats import load_examples

    p = tmp_path / "mine.jsonl"
    p.write_text('{"instruction": "Add 1 and 2", "output": "3"}\n'
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    alpaca, chat_record = load_examples(p)
    with pytest.raises(UserError) as e:
        encode(alpaca, tiny_tokenizer, template="raw")
    assert str(e.value) == (f"{p}:1: data.template=raw needs prompt/response or text records, this one is an "
                            "Alpaca record (instruction/output) (use data.template=auto, chat or alpaca)")
    with pytest.raises(UserError, match=r"mine.jsonl:2: .* this one is a chat record \(messages\)"):
        encode(chat_record, tiny_tokenizer, template="raw")


def test_stop_tokens_are_eos_and_the_templates_end_of_turn(tiny_tokenizer):
    from loralab.data.prompts import stop_token_ids

    assert stop_token_ids(tiny_tokenizer) == [2]  # <|im_end|> is both
    other = make_tiny_tokenizer()
    other.eos_token = "<|endoftext|>"  # a base whose EOS is not the end-of-turn token (id 0 vs 2)
    assert stop_token_ids(other) == [0, 2]
    assert stop_token_ids(make_tiny_tokenizer(chat_template=None)) == [2]


def test_a_template_that_closes_replies_with_nothing_still_learns_eos():
    from loralab.data.prompts import render_example

    tok = make_tiny_tokenizer(chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                                            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    text, spans = render_example(chat("hi", "yo"), tok, template="chat", system_prompt=None)
    assert text == "user: hi\nassistant: yo<|im_end|>\n"
    assert labelled_runs(tok, encode(chat("hi", "yo"), tok, template="chat", system_prompt=None)) == ["yo" + EOT]


def test_encode_all_counts_examples_that_learn_to_stop(tiny_tokenizer):
    exs = [Example(prompt="Q: 1+1?\nA:", response=" 2"), Example(prompt="Q:", response=" a long answer here")]
    _, stats = encode_all(exs, tiny_tokenizer, template="raw")
    assert stats["n_end_with_stop"] == 2
    _, stats = encode_all(exs, tiny_tokenizer, template="raw", max_seq_len=13)  # the second loses its EOS
    assert stats["n_kept"] == 2 and stats["n_truncated"] == 1 and stats["n_end_with_stop"] == 1
    _, stats = encode_all(exs, tiny_tokenizer, template="chat", max_seq_len=1000)
    assert stats["n_end_with_stop"] == 2  # chat: the reply's <|im_end|> is learned


def test_encoding_many_at_once_equals_one_at_a_time(tiny_tokenizer):
    examples = [chat("hi", "yo"), Example(prompt="Question: What is 1 plus 2?\nAnswer:", response=" 3"),
                chat("a longer question here", "and a long answer", "more?", "yes"),
                Example(prompt="x" * 40, response=" y")]
    for kw in ({}, {"max_seq_len": 64}, {"template": "raw", "system_prompt": None}):  # 64: cuts one, drops one
        if kw.get("template") == "raw":
            examples = [ex for ex in examples if ex.messages is None]
        together, _ = encode_all(examples, tiny_tokenizer, **kw)
        alone = [encode(ex, tiny_tokenizer, **kw) for ex in examples]
        kept = [e for e in alone if e.n_labels]
        assert kw.get("max_seq_len") is None or any(e.truncated for e in kept) and len(kept) < len(alone)
        assert [(e.input_ids, e.labels, e.truncated) for e in together] == \
            [(e.input_ids, e.labels, e.truncated) for e in kept]
