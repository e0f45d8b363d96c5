"""ranx, the reference for fusion and retrieval metrics, run in a child process.

ranx compiles its functions with numba on first use, which takes a minute per process
on a small machine; its pure-Python code (NUMBA_DISABLE_JIT=1) gives the same numbers
in milliseconds for the few queries a test has. A child process keeps that setting
away from everything else the test session imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json, sys
from ranx import Qrels, Run, evaluate, fuse
task = json.load(sys.stdin)
out = {}
if "fuse" in task:
    out["fuse"] = [fuse([Run(r) for r in runs], method="rrf", params={"k": task["k"]}).to_dict() for runs in task["fuse"]]
if "evaluate" in task:
    out["evaluate"] = [{m: float(v) for m, v in evaluate(Qrels(e["qrels"]), Run(e["run"]), e["metrics"]).items()}
                       for e in task["evaluate"]]
json.dump(out, sys.stdout)
"""


def ranx(task: dict) -> dict:
    """{"fuse": [[run, run], ...], "k": 60} and/or {"evaluate": [{"qrels", "run", "metrics"}]} -> ranx's answers."""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(task), capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)
