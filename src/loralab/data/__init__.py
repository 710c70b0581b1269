"""Training data: file readers (formats), synthetic tasks, rendering with loss masks (prompts), batching.

Kept free of re-exports so importing one submodule does not pull in the others (tasks and formats
import no tokenizer code; prompts and batching need torch/transformers only where they use them).
"""
