from loralab.model.prefix_cache import full_attention_only
from tinymodels import tiny_llama


def test_full_attention_only_refuses_sliding_windows():
    model = tiny_llama(seed=0)
    assert full_attention_only(model.config)
    model.config.layer_types = ["full_attention", "sliding_attention"] * (model.config.num_hidden_layers // 2)
    model.config.sliding_window = 64
    assert not full_attention_only(model.config)
