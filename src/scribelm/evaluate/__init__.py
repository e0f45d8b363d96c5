"""Evaluation: the numbers the field trusts, computed the way lm-evaluation-harness does.

    from scribelm.evaluate import evaluate, load_tasks, loglikelihood
    loglikelihood(lm, [("The capital of France is", " Paris")])   # [(logprob, is_greedy)]
    rolling_loglikelihood(lm, [document])                          # perplexity, bits per byte
    generate_until(lm, [("Q: 2+2?\\nA:", {"until": ["\\n"]})])      # ["4"]
    results = evaluate(lm, load_tasks(["kjv_bpb", "my_task.yaml"]), limit=200)

Parts: `scoring` (the model's three answers, batched, shared prefixes),
`metrics` (acc, acc_norm, EM/F1, perplexities, standard errors), `tasks`
(lm-eval task YAML and local data), `runner` (tasks -> metrics), `remote`
(a model behind an OpenAI-compatible completions server), `table` (the
results as lm-eval's table and as JSON).
"""

from scribelm.evaluate.metrics import normalize_answer, squad_exact_match, squad_f1
from scribelm.evaluate.runner import LocalBackend, TaskResult, evaluate
from scribelm.evaluate.scoring import RollingScore, generate_until, loglikelihood, rolling_loglikelihood
from scribelm.evaluate.tasks import Task, TaskError, load_tasks

__all__ = [
    "LocalBackend", "RollingScore", "Task", "TaskError", "TaskResult", "evaluate", "generate_until", "load_tasks",
    "loglikelihood", "normalize_answer", "rolling_loglikelihood", "squad_exact_match", "squad_f1",
]
