import pytest
import torch

from loralab.data.layout import collate_packed
from loralab.data.prompts import Encoded
from loralab.model.mlp import use_lean_swiglu
from loralab.model.norm import use_lean_rmsnorm
from loralab.model.rebuild import rebuild_attention_inputs
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec, lora_modules
from loralab.train.compile import compile_blocks, decoder_blocks
from loralab.train.loss import loss_sum
from tinymodels import tiny_llama


def test_decoder_blocks_finds_the_repeated_layers():
    model = tiny_llama(num_hidden_layers=3)
    blocks = decoder_blocks(model)
    assert blocks == list(model.model.layers) and len(blocks) == 3
    assert decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


@pytest.mark.parametrize("lean", [False, True], ids=["stock", "lean"])
def test_compiled_blocks_train_like_eager_ones(lean):
    """Dynamo's tracing (the 'eager' backend: fast, no code generation) over LoRA-wrapped blocks
    gives the eager loss and gradients, on packed batches of two different lengths; also with the
    lean norms, SwiGLU and rebuilt attention inputs that io/models.load_weights switches on."""
    def run(compiled):
        model = tiny_llama(seed=5).float()
        if lean:
            use_lean_rmsnorm(model), use_lean_swiglu(model), rebuild_attention_inputs(model)
        inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
        for _, m in lora_modules(model):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
        if compiled:
            assert compile_blocks(model, backend="eager") == 2
        model.train()
        out = []
        g = torch.Generator().manual_seed(1)
        for lengths in ((9, 4, 6), (13, 3)):
            ex = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
            batch = collate_packed([Encoded(e, [-100] + e[1:]) for e in ex], pad_id=0)
            s, n = loss_sum(model, batch)
            (s / n).backward()
            out.append(float(s.detach()))
        return out, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    (l0, g0), (l1, g1) = run(False), run(True)
    assert l1 == l0 or all(abs(a - b) < 1e-5 * abs(a) for a, b in zip(l0, l1))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)
