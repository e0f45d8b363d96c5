"""Serving: many users, one process, models behind the API their tools already speak.

    registry.py   the model store's former place (it is `scribelm.store`)
    engine.py     continuous batching over a slot KV cache; `ModelPool` of lazily loaded models
    api.py        the OpenAI-compatible FastAPI app (`create_app(pool)`), auth, the generation routes
    requests.py   a request body -> chat messages, prompt ids, SamplingSettings; refused fields
    responses.py  engine events -> OpenAI's responses, stream chunks and log-probs
    embeddings.py POST /v1/embeddings over LM.embed; EmbeddingModel stands in for an encoder's engine
    rag_routes.py MODEL+rag:NAME: chat answered from a retrieval index, with its sources; /v1/rag/search
    scoring.py    log-probabilities of a prompt's own tokens (echo + logprobs: an evaluation backend)
    prefix_cache.py  keys/values of recent prompts, reused by prompts that start the same way
    ollama.py     Ollama's API (/api/tags, /api/show, /api/generate, /api/chat) on the same engines
    schema.py     the request bodies as Pydantic models: validation and the OpenAPI schema
    json_body.py  request bodies to JSON with bounded depth and number sizes
    errors.py     ApiError: every error in OpenAI's JSON shape
    metrics.py    Prometheus text, labelled by route template
    access.py     one log line and one metrics count per request
    origins.py    which Host and Origin headers are answered (cross-site, DNS rebinding)
    preflight.py  start-up checks of the served models' files
    http_limits.py  a deadline for request headers (uvicorn protocol)
    static/       the chat page served at /

    from scribelm.serve.engine import ModelPool
    from scribelm.serve.api import create_app
    app = create_app(ModelPool({"my-chat": "path/to/model"}), api_key="secret")   # run with uvicorn

The engine and the API need the `serve` extra (fastapi, uvicorn).
"""
