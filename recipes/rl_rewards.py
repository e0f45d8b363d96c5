"""Reward functions for the RL demonstration (`recipes/rl_demo.py`), usable from the command line:

    scribe finetune grpo MODEL --prompts prompts.jsonl --reward recipes/rl_rewards.py:ends_a_sentence -o runs/grpo
"""


def ends_a_sentence(prompt: str, completion: str) -> float:
    """1 when the completion finishes a sentence (holds a full stop), else 0: easy to state and to check."""
    return 1.0 if "." in completion else 0.0
