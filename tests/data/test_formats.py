import json

import pytest

from loralab.data.formats import Example, load_examples
from loralab.errors import UserError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def jsonl(*records):
    return "\n".join(json.dumps(r) for r in records) + "\n"


def test_alpaca_json_list_becomes_chat_messages_with_line_sources(tmp_path):
    p = write(tmp_path, "a.json", '[\n  {"instruction": "Add", "input": "1 and 2", "output": "3"},\n'
                                  '  {"instruction": "Greet", "input": "", "output": "Hi"}\n]\n')
    a, b = load_examples(p)
    assert a.messages == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    assert b.messages == [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hi"}]
    assert (a.source, b.source) == (f"{p}:2", f"{p}:3")


def test_alpaca_jsonl_and_chat_jsonl(tmp_path):
    p = write(tmp_path, "d.jsonl", jsonl(
        {"instruction": "Say yes", "output": "yes"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a", "name": "bot"}]}))
    a, b = load_examples(p)
    assert a.messages[-1] == {"role": "assistant", "content": "yes"} and a.source == f"{p}:1"
    assert b.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]  # extra keys dropped
    assert b.source == f"{p}:2"


def test_prompt_response_completion_and_text_records(tmp_path):
    p = write(tmp_path, "r.jsonl", jsonl({"prompt": "Q:", "response": " A"}, {"prompt": "X", "completion": "Y"},
                                         {"text": "free text"}) + "\n\n")
    a, b, c = load_examples(p)
    assert (a.prompt, a.response, a.messages) == ("Q:", " A", None)
    assert (b.prompt, b.response) == ("X", "Y")
    assert (c.prompt, c.response) == ("", "free text")


def test_plain_text_blocks(tmp_path):
    p = write(tmp_path, "t.txt", "first line\nsecond line\n\n\n  \nthird block\n")
    a, b = load_examples(p)
    assert a == Example(response="first line\nsecond line", source=f"{p}:1")
    assert b == Example(response="third block", source=f"{p}:6")


def test_json_extension_holding_jsonl_is_read_as_jsonl(tmp_path):
    p = write(tmp_path, "x.json", jsonl({"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}))
    assert [e.response for e in load_examples(p)] == ["b", "d"]


BAD = [
    # (file name, content, line, words the message must contain)
    ("e.jsonl", "", 1, "empty"),
    ("w.jsonl", "  \n\n", 1, "empty"),
    ("m.jsonl", jsonl({"prompt": "a", "response": "b"}) + '{"prompt": "a", \n', 2, "malformed JSON"),
    ("i.jsonl", jsonl({"prompt": "a", "response": "b"}, {"input": "x", "output": "y"}), 2, "missing 'instruction'"),
    ("o.jsonl", jsonl({"instruction": "x"}), 1, "missing 'output'"),
    ("k.jsonl", jsonl({"question": "x", "answer": "y"}), 1, "'messages'"),
    ("r.jsonl", "\n" + jsonl({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}),
     2, "unknown role 'tool' (allowed: system, user, assistant)"),
    ("c.jsonl", jsonl({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}),
     1, "must be a string"),
    ("n.jsonl", jsonl({"messages": [{"role": "user", "content": "x"}]}), 1, "no assistant turn"),
    ("ea.jsonl", jsonl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}),
     1, "empty"),
    ("eo.jsonl", jsonl({"instruction": "x", "output": ""}), 1, "'output' is empty"),
    ("er.jsonl", jsonl({"prompt": "x", "response": "  "}), 1, "'response' is empty"),
    ("so.jsonl", jsonl({"instruction": "x", "output": 3}), 1, "'output' must be a string"),
    ("l.jsonl", jsonl(["not", "an", "object"]), 1, "expected a JSON object"),
    ("ml.jsonl", jsonl({"messages": "hi"}), 1, "non-empty list"),
    ("a.json", '[\n{"instruction": "x", "output": "y"},\n{"instruction": "x"}\n]', 3, "missing 'output'"),
    ("b.json", '[\n{"instruction": "x", "output": "y"}\n{"instruction": "x"}]', 3, "expected ','"),
    ("c.json", '[\n{"instruction": "x", "output": "y"},\n{"instruction": \n]', 4, "malformed JSON"),
    ("d.json", "[]", 1, "no records"),
    ("f.json", '"just a string"', 1, "JSON list"),
]


@pytest.mark.parametrize("name,content,line,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_line(tmp_path, name, content, line, words):
    p = write(tmp_path, name, content)
    with pytest.raises(UserError) as err:
        load_examples(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert words in msg and "\n" not in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such data file") as err:
        load_examples(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value)
    with pytest.raises(UserError, match="is a directory"):
        load_examples(tmp_path)


def test_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"bin.jsonl:2: not UTF-8"):
        load_examples(p)


def test_first_error_is_reported(tmp_path):
    p = write(tmp_path, "two.jsonl", jsonl({"instruction": "x"}, {"messages": []}))
    with pytest.raises(UserError, match=r"two.jsonl:1: missing 'output'"):
        load_examples(p)


def test_a_line_separator_inside_a_jsonl_string_is_not_a_line_break(tmp_path):
    # JSON allows a raw U+2028 in a string; str.splitlines() would cut the record there
    p = tmp_path / "sep.jsonl"
    p.write_text('{"prompt": "a\u2028b", "response": "c"}\n{"text": "d\x85e"}\n', encoding="utf-8")
    examples = load_examples(p)
    assert [(e.prompt, e.response, e.source) for e in examples] == [("a\u2028b", "c", f"{p}:1"),
                                                                    ("", "d\x85e", f"{p}:2")]


@pytest.mark.parametrize("content,why", [("[" * 100_000, "nested too deeply"),
                                         ('{"text": ' + "1" * 5000 + "}", "Exceeds the limit (4300 digits)")],
                         ids=["deep", "huge-number"])
def test_json_that_python_cannot_decode_is_one_line(content, why, tmp_path):
    for name, text in (("a.jsonl", '{"text": "ok"}\n' + content + "\n"), ("a.json", '[{"text": "ok"},\n' + content)):
        p = write(tmp_path, name, text)
        with pytest.raises(UserError) as e:
            load_examples(p)
        assert str(e.value).startswith(f"{p}:2: malformed JSON ({why}")
