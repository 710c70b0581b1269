"""The stop check: a generation counts as stopped only when a stop token (EOS / end of turn) came
first, within its budget."""
import torch

from loralab.data.formats import Example
from loralab.eval.metrics import exact_match, generate
from loralab.eval.stops import stop_check, task_stops
from tiny_tokenizer import make_tiny_tokenizer
from tinymodels import tiny_llama


def _always_token_zero(tok):
    """A model whose logits are all zero (final norm zeroed): greedy always picks token id 0."""
    model = tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


def test_stopped_only_when_a_stop_token_comes_first():
    tok = make_tiny_tokenizer()                  # stop tokens: <|im_end|> (2); token 0 is <|endoftext|>
    model = _always_token_zero(tok)
    (g,) = generate(model, tok, ["Q:"], max_new_tokens=3)
    assert not g.stopped                         # id 0 forever: ran out of budget
    tok.eos_token = "<|endoftext|>"              # now id 0 is the EOS: the first token stops it
    (g,) = generate(model, tok, ["Q:"], max_new_tokens=3)
    assert g.stopped and g.text == ""


def test_exact_match_and_stop_check_count_stops():
    tok = make_tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"
    model = _always_token_zero(tok)
    exs = [Example(prompt="Q: 1+1?\nA:", response=" 2"), Example(prompt="Q: 2+2?\nA:", response=" 4")]
    r = exact_match(model, tok, exs, template="raw", max_new_tokens=4)
    assert r["stopped"] == 2 and r["correct"] == 0
    assert task_stops({"2da": r}, 4) == {"stopped": 2, "n": 2, "held_out": "2da", "budget": "4 tokens"}
    chat = [Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])]
    assert stop_check(model, tok, exs + chat, template="auto", slack=2)["stopped"] == 3
    tok.eos_token = "<|im_end|>"                 # id 0 is no stop token any more
    assert stop_check(model, tok, exs + chat, template="auto", slack=2) == {
        "stopped": 0, "n": 3, "held_out": "validation", "budget": "reply length + 2 tokens"}
