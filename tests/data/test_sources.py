"""data.path as a datasets folder, Parquet or CSV file (read with the datasets library), and
data.columns naming which column holds each loralab field."""
import json

import pytest

from loralab.data.formats import load_examples
from loralab.data.sources import load_data
from loralab.errors import UserError

QA = [{"question": "What is 2 plus 2?", "answer": "4", "id": 1},
      {"question": "Name a colour.", "answer": "Blue", "id": 2}]
COLUMNS = {"instruction": "question", "output": "answer"}
EXPECTED = [[{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}],
            [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same two rows as a save_to_disk folder, a DatasetDict folder, Parquet, CSV and JSONL."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    ds = datasets.Dataset.from_list(QA)
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(root / "dict"))
    ds.to_parquet(str(root / "qa.parquet"))
    ds.to_csv(str(root / "qa.csv"), index=False)
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    return root


@pytest.mark.parametrize("name", ["saved", "dict", "qa.parquet", "qa.csv", "qa.jsonl"])
def test_every_source_gives_the_same_examples_through_data_columns(sources, name):
    examples = load_data(sources / name, COLUMNS)
    assert [e.messages for e in examples] == EXPECTED
    assert all(e.kind == "alpaca" for e in examples)
    if name != "qa.jsonl":
        assert examples[1].source == f"{sources / name} row 2"


def test_columns_in_loralab_names_need_no_mapping_and_chat_messages_survive_parquet(tmp_path):
    import datasets

    rows = [{"prompt": "Q: 1+1?\nA:", "response": " 2"}, {"prompt": "Q: 2+3?\nA:", "response": " 5"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pr.parquet"))
    assert [(e.prompt, e.response) for e in load_data(tmp_path / "pr.parquet")] == [("Q: 1+1?\nA:", " 2"),
                                                                                      ("Q: 2+3?\nA:", " 5")]
    chat = [{"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    datasets.Dataset.from_list(chat).save_to_disk(str(tmp_path / "chat"))
    (e,) = load_data(tmp_path / "chat", {"messages": "conversation"})
    assert e.messages == chat[0]["conversation"] and e.kind == "chat"


def test_an_empty_csv_cell_is_an_absent_optional_field(tmp_path):
    (tmp_path / "a.csv").write_text("instruction,input,output\nAdd,1 and 2,3\nGreet,,Hi\n")
    a, b = load_data(tmp_path / "a.csv")
    assert a.messages[0]["content"] == "Add\n\n1 and 2" and b.messages[0]["content"] == "Greet"


def test_bad_columns_name_them_and_the_columns_that_exist(sources):
    with pytest.raises(UserError) as e:
        load_data(sources / "qa.parquet", {"instruction": "questoin", "output": "answer"})
    assert str(e.value) == (f"{sources / 'qa.parquet'}: data.columns names 'questoin', not a column of the dataset "
                            "(its columns: question, answer, id)")
    with pytest.raises(UserError, match=r"qa.jsonl:1: data.columns names 'questoin', not in the record "
                                        r"\(its keys: question, answer, id\)"):
        load_examples(sources / "qa.jsonl", {"instruction": "questoin", "output": "answer"})
    with pytest.raises(UserError, match=r"none of its columns \(question, answer, id\) is a loralab field.*"
                                        r"data.columns"):
        load_data(sources / "saved")
    with pytest.raises(UserError, match="data.columns' names unknown field 'question'"):
        load_data(sources / "saved", {"question": "question"})


def test_a_broken_parquet_file_is_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(UserError, match=r"bad.parquet: cannot read it with datasets"):
        load_data(tmp_path / "bad.parquet")


def test_numbers_in_a_table_become_text_and_booleans_are_refused(tmp_path):
    """A CSV's cells are text as written (no 42.0, no 7 for 007); a Parquet number column trains as
    text; a Parquet boolean is still refused in one line."""
    import datasets

    (tmp_path / "qa.csv").write_text("question,answer\nWhat is 6 x 7?,42\nHalf of 5?,2.5\nA code?,007\n")
    got = load_data(tmp_path / "qa.csv", {"prompt": "question", "response": "answer"})
    assert [(e.prompt, e.response) for e in got] == [("What is 6 x 7?", "42"), ("Half of 5?", "2.5"),
                                                     ("A code?", "007")]
    datasets.Dataset.from_list([{"q": "1+1?", "a": 2}, {"q": "1/2?", "a": 0.5}]).to_parquet(str(tmp_path / "n.parquet"))
    assert [e.response for e in load_data(tmp_path / "n.parquet", {"prompt": "q", "response": "a"})] == ["2.0", "0.5"]
    datasets.Dataset.from_list([{"q": "1+1?", "a": 2}]).to_parquet(str(tmp_path / "i.parquet"))
    assert [e.response for e in load_data(tmp_path / "i.parquet", {"prompt": "q", "response": "a"})] == ["2"]
    datasets.Dataset.from_list([{"q": "Is 2 even?", "a": True}]).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(UserError) as e:
        load_data(tmp_path / "b.parquet", {"prompt": "q", "response": "a"})
    assert str(e.value) == f"{tmp_path / 'b.parquet'} row 1: 'response' must be a string, got bool"
