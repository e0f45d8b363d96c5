"""Looking inside the model: parameter counts, named activations (hooks), logit lens, explain pages.

    from scribelm.inspect import run_with_cache, run_with_hooks, hook_names
    logits, cache = run_with_cache(lm, "The cat sat")      # TransformerLens names
    cache["blocks.0.attn.hook_pattern"]                     # (batch, head, query, key)
"""

from scribelm.inspect.hooks import HookPoint, hook_names, hooks_attached, run_with_cache, run_with_hooks

__all__ = ["HookPoint", "hook_names", "hooks_attached", "run_with_cache", "run_with_hooks"]
