"""The data's memory before it is made (memory/data_size.py): the measured bytes per generated
example against tracemalloc's count of a real generation, the encoded estimate against the deep size
of the real encoding, and each refusal with a mocked room."""
import sys
import tracemalloc

import pytest

from loralab.config import load_config
from loralab.data.formats import Example
from loralab.data.prompts import encode_all
from loralab.data.tasks import make_task
from loralab.errors import UserError
from loralab.memory import data_size as D
from loralab.memory import preflight as P

MiB = 2**20


def _room(monkeypatch, n):
    monkeypatch.setattr(P, "cpu_room", lambda *a: P.Room(n, "MemAvailable"))


@pytest.mark.parametrize("task", ["2da", "5da", "1dc"])
def test_bytes_per_generated_example_scale_to_a_larger_generation(task):
    """Measured on 512 examples, the per-example peak predicts a generation 8x larger to 25%."""
    per = D.generated_bytes_per_example(task, 7)
    assert 150 < per < 2000
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        made = make_task(task, 8 * D.SAMPLE, 0, 7)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert len(made[0]) == 8 * D.SAMPLE
    assert peak == pytest.approx(per * 8 * D.SAMPLE, rel=0.25)


def test_encoded_estimate_is_near_the_real_encodings_size(tiny_tokenizer):
    cfg = load_config(None, ["data.template=raw", "data.max_seq_len=64"])
    examples = make_task("3da", 3000, 0, 1)[0] + [Example(prompt="Add " + "1+" * 80 + "1 =", response=" 81")] * 50
    est = D.encoded_estimate(examples, tiny_tokenizer, cfg)
    real, _ = encode_all(examples, tiny_tokenizer, template="raw", max_seq_len=64)
    assert est["tokens"] == pytest.approx(sum(len(e.input_ids) for e in real), rel=0.15)  # long ones capped at 64
    assert est["bytes"] == pytest.approx(D.encoded_bytes(real), rel=0.2)


def test_encoded_bytes_counts_lists_and_distinct_ints():
    from loralab.data.prompts import IGNORE_INDEX, Encoded

    ids = [1000 + i for i in range(10)]  # above the interpreter's cached small ints: one object each
    e = Encoded(input_ids=ids, labels=[IGNORE_INDEX] * 5 + ids[5:])  # labels share the ids' objects
    expected = (sys.getsizeof(e) + sys.getsizeof(e.__dict__) + sys.getsizeof(e.input_ids) + sys.getsizeof(e.labels)
                + sum(map(sys.getsizeof, ids)) + sys.getsizeof(IGNORE_INDEX))
    assert D.encoded_bytes([e]) == expected
    assert D.encoded_bytes([e, e]) == expected  # an object counted once


def test_generation_refused_before_generating_with_the_most_that_can_be(monkeypatch):
    _room(monkeypatch, 64 * MiB)
    cfg = load_config(None, ["data.tasks=[5da]", "data.n_train=100000000", "eval.n=100"])
    with pytest.raises(UserError) as e:
        D.check_generation(cfg, {"5da": 100_000_000}, ["5da"])
    assert "generating 100,000,100 examples of 5da" in str(e.value) and "64.00 MiB available" in str(e.value)
    most = int(str(e.value).split("data.n_train=")[1].split(" ")[0].replace(",", ""))
    D.check_generation(load_config(None, []), {"5da": most}, ["5da"])  # the count it names passes
    D.check_generation(load_config(None, ["train.preflight=warn"]), {"5da": 100_000_000}, ["5da"])  # not checked


def test_a_file_is_refused_from_its_size_alone(monkeypatch, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n' * 30_000)
    size = data.stat().st_size
    cfg = load_config(None, [f"data.path={data}"])
    _room(monkeypatch, int(size * D.READ_WHOLE_FACTOR))
    D.check_generation(cfg, {}, [])
    _room(monkeypatch, int(size * D.READ_WHOLE_FACTOR) - 1)
    with pytest.raises(UserError, match=r"'data.path': .*d.jsonl is .* reading it whole takes at least"):
        D.check_generation(cfg, {}, [])


def test_encoded_refused_with_the_examples_that_fit(monkeypatch, tiny_tokenizer):
    from loralab.prepare import Datasets

    cfg = load_config(None, ["data.template=raw"])
    data = Datasets(make_task("2da", 2000, 0, 1)[0], [], {})
    need = D.encoded_estimate(data.train, tiny_tokenizer, cfg)["bytes"]
    _room(monkeypatch, need)
    D.check_encoded(cfg, data, tiny_tokenizer)
    _room(monkeypatch, need // 2)
    with pytest.raises(UserError, match=r"tokenized data: 2,000 examples .* about [\d,]+ examples fit") as e:
        D.check_encoded(cfg, data, tiny_tokenizer)
    assert 900 < int(str(e.value).split("about ")[1].split(" ")[0].replace(",", "")) <= 1000


def test_with_a_data_file_the_evaluation_tasks_are_still_sized(monkeypatch, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    _room(monkeypatch, 64 * MiB)
    cfg = load_config(None, [f"data.path={data}", "eval.tasks=[5da]", "eval.n=100000000"])
    with pytest.raises(UserError, match="generating 100,000,000 examples of 5da .* lower data.n_train and eval.n"):
        D.check_generation(cfg, {}, ["5da"])
