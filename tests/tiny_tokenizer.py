"""An offline character-level tokenizer shaped like SmolLM2-Instruct's, for data tests.

Ids: 0 <|endoftext|> (unknown), 1 <|im_start|> (bos), 2 <|im_end|> (eos and pad), then newline
and printable ASCII: 99 tokens, so it fits a tiny model with vocab_size=128 (conftest.tiny_llama,
whose eos id is 2). Character-level keeps every token boundary predictable in mask tests.
The ChatML template injects a default system turn when the first message is not a system one,
as SmolLM2's does.
"""
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are a tiny test assistant."
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    # BPE without merges = one token per character, with exact character offsets.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


_CORPUS = ["Question: What is 17 minus 14?\nAnswer: 3", "Question: What is 82 plus 77?\nAnswer: 159",
           "The quick brown fox jumps over the lazy dog.", "You are a tiny test assistant.",
           "Hello, world! How are you today? I'm fine, thanks.", "user\nassistant\nsystem\n"] * 20


def make_tiny_bpe_tokenizer(digits: bool = False, chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained on a few lines: what a GGUF
    export can carry. digits=True splits digits one by one first (SmolLM2's original pre-tokenizer).
    Ids 0-2 are the same specials as make_tiny_tokenizer's."""
    from tokenizers import pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok
