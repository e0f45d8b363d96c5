"""Serving: many users, one process, models behind the API their tools already speak.

    registry.py   the local model store (`scribe models`), `resolve_model_path(name_or_path)`
    engine.py     continuous batching over a slot KV cache; `ModelPool` of lazily loaded models
    api.py        the OpenAI-compatible FastAPI app (`create_app(pool)`), metrics, errors, auth
    static/       the chat page served at /

    from scribelm.serve.engine import ModelPool
    from scribelm.serve.api import create_app
    app = create_app(ModelPool({"my-chat": "path/to/model"}), api_key="secret")   # run with uvicorn

The registry needs nothing beyond scribelm; the engine and the API need the
`serve` extra (fastapi, uvicorn).
"""
