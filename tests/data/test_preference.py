"""Preference records (data/preference.py): TRL's standard, conversational and implicit-prompt forms, every
source with data.columns, one-line errors naming file and line or row; encoding and collation."""
import json

import pytest

from loralab.data.formats import fingerprint
from loralab.data.preference import PAIRS, collate_pairs, encode_pairs, load_preferences, parse_preference
from loralab.data.prompts import IGNORE_INDEX
from loralab.errors import UserError

ROWS = [{"q": "What is 2 plus 2?", "good": " 4", "bad": " 5"},
        {"q": "What is 7 minus 3?", "good": " 4", "bad": " 10"}]
COLUMNS = {"prompt": "q", "chosen": "good", "rejected": "bad"}
USER = [{"role": "user", "content": "Hi?"}]
GOOD = [{"role": "assistant", "content": "Hello."}]
BAD = [{"role": "assistant", "content": "Go away."}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("pref-sources")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(root / "saved"))
    ds.to_parquet(str(root / "p.parquet"))
    ds.to_csv(str(root / "p.csv"), index=False)
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "p.json").write_text(json.dumps(ROWS, indent=1))
    return root


@pytest.mark.parametrize("name", ["saved", "p.parquet", "p.csv", "p.jsonl", "p.json"])
def test_every_source_through_data_columns(sources, name):
    pairs = load_preferences(sources / name, COLUMNS)
    assert [(p.chosen.prompt, p.chosen.response, p.rejected.response) for p in pairs] == \
        [(r["q"], r["good"], r["bad"]) for r in ROWS]
    assert pairs[0].chosen.prompt == pairs[0].rejected.prompt


def test_conversational_and_implicit_prompt_give_the_same_pair():
    explicit = parse_preference({"prompt": USER, "chosen": GOOD, "rejected": BAD}, "f:1")
    implicit = parse_preference({"chosen": USER + GOOD, "rejected": USER + BAD}, "f:2")
    assert explicit.chosen.messages == implicit.chosen.messages == USER + GOOD
    assert explicit.rejected.messages == implicit.rejected.messages == USER + BAD
    assert fingerprint([explicit]) == fingerprint([implicit])
    assert fingerprint([explicit]) != fingerprint([parse_preference({"prompt": USER, "chosen": BAD,
                                                                     "rejected": GOOD}, "f:3")])


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"},
     "f.jsonl:3: a preference record needs 'chosen' and 'rejected' (missing 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "f.jsonl:3: missing 'prompt'"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "f.jsonl:3: 'chosen' is empty"),
    ({"prompt": "q", "chosen": 4, "rejected": "b"}, "f.jsonl:3: 'chosen' must be a string"),
    ({"prompt": USER, "chosen": USER, "rejected": BAD}, "f.jsonl:3: 'chosen' must end with a non-empty assistant"),
    ({"prompt": USER, "chosen": [{"role": "bot", "content": "x"}], "rejected": BAD},
     "f.jsonl:3: chosen[0]: unknown role"),
    ({"chosen": GOOD, "rejected": BAD}, "f.jsonl:3: 'chosen' and 'rejected' share no leading prompt"),
    (["not", "an", "object"], "f.jsonl:3: expected a JSON object"),
])
def test_bad_records_are_one_line_naming_the_line(record, message):
    with pytest.raises(UserError) as e:
        parse_preference(record, "f.jsonl:3")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_row_in_a_table_names_its_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"},
                                {"prompt": "q", "chosen": "a", "rejected": ""}]).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(UserError, match=r"x\.parquet row 2: 'rejected' is empty"):
        load_preferences(tmp_path / "x.parquet")


def test_bad_line_in_jsonl_and_unknown_column_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{bad\n")
    with pytest.raises(UserError, match=r"p\.jsonl:2: malformed JSON"):
        load_preferences(f)
    with pytest.raises(UserError, match="data.columns' names unknown field 'output'"):
        load_preferences(f, {"output": "chosen"})


def test_encoding_and_collation(tiny_tokenizer):
    pairs = [parse_preference({"prompt": r["q"], "chosen": r["good"], "rejected": r["bad"]}, f"f:{i}")
             for i, r in enumerate(ROWS)]
    enc, stats = encode_pairs(pairs, tiny_tokenizer, template="raw")
    assert stats["n_kept"] == 2 and stats["n_end_with_stop"] == 2
    batch = collate_pairs(enc, tiny_tokenizer.pad_token_id)
    assert int(batch[PAIRS]) == 2 and batch["input_ids"].shape[0] == 4
    rows = [tiny_tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in batch["labels"].tolist()]
    assert rows == [" 4<|im_end|>", " 4<|im_end|>", " 5<|im_end|>", " 10<|im_end|>"]
    assert enc[1].input_ids == enc[1].rejected.input_ids  # the longer row stands for the pair's length


def test_a_pair_truncated_away_is_dropped(tiny_tokenizer):
    pairs = [parse_preference({"prompt": "x" * 50, "chosen": " a", "rejected": " b"}, "f:1"),
             parse_preference({"prompt": "q", "chosen": " a", "rejected": " b"}, "f:2")]
    enc, stats = encode_pairs(pairs, tiny_tokenizer, template="raw", max_seq_len=20)
    assert len(enc) == 1 and stats["n_dropped"] == 1 and stats["first_dropped"] == "f:1"


def test_chat_pairs_learn_only_the_answers(tiny_tokenizer):
    pair = parse_preference({"prompt": USER, "chosen": GOOD, "rejected": BAD}, "f:1")
    enc, _ = encode_pairs([pair], tiny_tokenizer)
    learned = [tiny_tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX])
               for e in (enc[0].chosen, enc[0].rejected)]
    assert learned == ["Hello.<|im_end|>", "Go away.<|im_end|>"]


def test_a_preference_file_under_sft_says_which_objective(tmp_path):
    from loralab.data.sources import load_data

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(UserError, match=r"p\.jsonl:1: a preference record .* train.objective=dpo or orpo"):
        load_data(f)
