"""Does the trained model stop? The share of held-out generations that end on a stop token (the
tokenizer's EOS or the chat template's end of turn) within a budget.

A fine-tune whose targets never showed the model where to stop generates until max_new_tokens
every time, which a loss curve does not reveal. Task evaluations already count it (exact_match's
`stopped`: within eval.max_new_tokens); for runs on a data file, the validation examples are
generated here, each with a budget of its own reference reply's length plus eval.max_new_tokens.
"""
from __future__ import annotations

from ..data.formats import Example
from ..data.prompts import render_prompt
from .metrics import generate


def stop_check(model, tokenizer, examples: list[Example], *, template: str = "auto", system_prompt="default",
               slack: int = 8, batch_size: int = 32) -> dict:
    """Greedy generations for each example's prompt; `stopped` counts those that ended on a stop
    token within len(reference reply) + slack new tokens."""
    prompts = [render_prompt(ex, tokenizer, template=template, system_prompt=system_prompt) for ex in examples]
    budgets = [len(tokenizer.encode(ex.answer, add_special_tokens=False)) + slack for ex in examples]
    gens = generate(model, tokenizer, prompts, batch_size=batch_size, stop_at_newline=False, budgets=budgets)
    return {"stopped": sum(g.stopped for g in gens), "n": len(gens), "held_out": "validation",
            "budget": f"reply length + {slack} tokens"}


def task_stops(results: dict, max_new_tokens: int) -> dict | None:
    """The same count over exact_match results (task name -> result), or None without any."""
    if not results:
        return None
    return {"stopped": sum(r["stopped"] for r in results.values()), "n": sum(r["n"] for r in results.values()),
            "held_out": ",".join(results) if len(results) <= 4 else f"{len(results)} tasks",
            "budget": f"{max_new_tokens} tokens"}
