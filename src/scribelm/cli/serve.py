"""`scribe serve MODEL...`: an OpenAI-compatible API and a chat page for one or more models."""

from __future__ import annotations

import os
import socket

from scribelm.cli.common import add_speculative_arguments, console, err_console


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API with a web chat page")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint directory, Hugging Face directory or store name; NAME=MODEL serves it under NAME; "
                        "MODEL+ADAPTER adds LoRA adapters (a `scribe finetune lora` result) without merging")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("SCRIBE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $SCRIBE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 429 (default 64)")
    p.add_argument("--max-context", type=int, default=8192,
                   help="positions per sequence: the KV cache holds max-batch x this many (default 8192, or the model's context if smaller)")
    p.add_argument("--idle-unload", type=float, default=900.0,
                   help="unload a model after this many idle seconds; loaded again on the next request (0: never; default 900)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (default 1 MiB)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one torch.compile graph (compiled when the model loads; for "
                        "GPUs: on a CPU the default step is faster)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--store", help="model store directory (default: $SCRIBE_MODELS_DIR or ~/.cache/scribelm/models)")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN[,ORIGIN...]",
                   help="web origins (e.g. https://app.example) whose pages may call the API, with CORS; '*' allows any. "
                        "Without it only the server's own chat page and localhost pages may. On a loopback --host only "
                        "localhost and these origins' host names are answered (against DNS rebinding)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers before its connection is closed (default 10)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="MiB of recent prompts' keys/values kept per model, so prompts that start the same way "
                        "(a resent conversation) prefill only what is new (0: off; default 256)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled between two decode steps, so a long prompt does not stall the "
                        "streams already running (0: each prompt whole; default 256)")
    p.add_argument("--chat-template", metavar="NAME_OR_FILE",
                   help="chat template for models that have none: chatml, llama3, mistral, or a Jinja file "
                        "(rendered sandboxed; a model's own template is always preferred)")
    p.add_argument("--rag", action="append", default=[], metavar="NAME=INDEX",
                   help="answer from a retrieval index (`scribe rag add`): every chat model gains the variant "
                        "MODEL+rag:NAME, whose answers carry the sources they cite; repeatable")
    p.add_argument("--rag-k", type=int, default=5, help="passages retrieved per question (default 5)")
    p.add_argument("--rag-mode", default="hybrid", choices=["bm25", "dense", "hybrid"],
                   help="how passages are retrieved (default hybrid)")
    add_speculative_arguments(p, "guess several tokens per sequence and check them in one pass: the same output "
                              "(greedy) or distribution (sampling); usage reports accepted and rejected guesses as "
                              "completion_tokens_details")
    p.add_argument("--quiet", action="store_true", help="no access log line per request (model loads and errors are still logged)")
    p.set_defaults(handler=run)


def served_models(specs: list[str], store=None) -> tuple[dict[str, str], dict[str, str]]:
    """MODEL arguments -> ({served name: directory}, {served name: LoRA adapter directory}).

    NAME=MODEL serves MODEL under NAME; MODEL+ADAPTER puts the adapters of a `scribe finetune
    lora` run (or a peft adapter) on MODEL without merging, served as NAME or as
    MODEL-RUN; a store name is served under that name."""
    from pathlib import Path

    from scribelm.adapters.lora import read_any_adapter_config
    from scribelm.errors import ScribeError
    from scribelm.store import check_name, gguf_file, is_model_directory, resolve_model_path

    models: dict[str, str] = {}
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep:
            name, target = "", spec
        adapter = None
        if "+" in target and not Path(target).expanduser().is_dir():  # store names have no '+'
            target, _, adapter = target.rpartition("+")
            if not target or not adapter:
                raise ScribeError(f"{spec!r}: write MODEL+ADAPTER with both parts, e.g. my-model+runs/lora/adapter")
        path = resolve_model_path(target, store)
        if not is_model_directory(path) and gguf_file(path) is None:
            raise ScribeError(f"{path} is not a model directory (it needs config.json and *.safetensors weights)")
        if not name:
            name = target if not Path(target).expanduser().is_dir() else Path(path).resolve().name
            if Path(target).expanduser().is_file():  # a GGUF file: served under its name, less ".gguf"
                name = Path(target).stem
            if adapter is not None:
                adapter_path = Path(adapter).expanduser().resolve()
                run = adapter_path.parent if adapter_path.name == "adapter" else adapter_path
                name = f"{name}-{run.name}"
        name = check_name(name)
        if name in models:
            raise ScribeError(f"two models would be served as {name!r}; name them with NAME=MODEL")
        models[name] = str(path)
        if adapter is not None:
            read_any_adapter_config(adapter)  # refused now, not at the first request
            adapters[name] = str(Path(adapter).expanduser())
    return models, adapters


def run(args) -> int:
    from scribelm.errors import ScribeError

    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ScribeError(f"scribe serve needs {' and '.join(missing)}: pip install 'scribelm[serve]'")
    import uvicorn
    from scribelm.serve.api import create_app
    from scribelm.serve.engine import ModelPool
    from scribelm.serve.http_limits import server_limits
    from scribelm.serve.preflight import check_model_files
    from scribelm.store import ModelStore

    if not args.prefix_cache_mb >= 0:
        raise ScribeError("--prefix-cache-mb must be 0 (off) or a positive number of MiB")
    if args.max_batch < 1 or args.max_queue < 1 or args.max_context < 1:
        raise ScribeError("--max-batch, --max-queue and --max-context must be at least 1")
    if args.prefill_chunk < 0:
        raise ScribeError("--prefill-chunk must be 0 (whole prompts) or a number of tokens")
    if not args.header_timeout > 0:
        raise ScribeError("--header-timeout must be a positive number of seconds")
    chat_template = None
    if args.chat_template:
        from scribelm.chat_templates import resolve_chat_template

        chat_template = resolve_chat_template(args.chat_template)
    models, adapters = served_models(args.models, ModelStore(args.store))
    speculation = _speculation(args, ModelStore(args.store))
    for name, path in models.items():  # a corrupt model is an error now, not at its first request
        check_model_files(name, path)
    origins = [o.strip() for value in args.allowed_origins for o in value.split(",") if o.strip()]
    served_indexes = _served_indexes(args.rag, args.rag_k, args.rag_mode) if args.rag else None
    if args.threads is not None:
        if args.threads < 1:
            raise ScribeError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # listening now, so the banner below is only printed for a port that is ours
    except OSError as err:
        sock.close()
        raise ScribeError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); pick another --port") from None
    except (OverflowError, socket.gaierror) as err:
        sock.close()
        raise ScribeError(f"cannot listen on {args.host}:{args.port} ({err}); check --host and --port") from None
    public = not _is_loopback(args.host)
    pool = ModelPool(models, max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                     idle_unload=args.idle_unload, device=args.device, adapters=adapters, compile=args.compile,
                     chat_template=chat_template, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
                     prefill_chunk=args.prefill_chunk, **speculation)
    app = create_app(pool, api_key=args.api_key, max_body_bytes=args.max_body_bytes, allowed_origins=origins, public=public,
                     rag=served_indexes)
    _log_to_stderr(args.quiet)

    port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    base = f"http://{shown_host}:{port}"
    console.print(f"serving {', '.join(models)} (OpenAI-compatible API) at [bold]{base}/v1[/bold]")
    console.print(f"chat page: [bold]{base}/[/bold]   health: {base}/health   metrics: {base}/metrics")
    if served_indexes is not None:
        shown = ", ".join(f"{name} ({len(index)} passages)" for name, index in served_indexes.indexes.items())
        console.print(f"retrieval: {shown}; ask MODEL+rag:NAME")
    if public and not args.api_key:
        err_console.print("warning: listening beyond this machine without --api-key; anyone who can reach it can use it")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **server_limits(args.header_timeout))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _served_indexes(specs: list[str], k: int, mode: str):
    """--rag NAME=INDEX arguments -> the opened indexes (a bad one stops the start, not a request)."""
    from scribelm import rag
    from scribelm.errors import ScribeError
    from scribelm.serve.rag_routes import ServedIndexes
    from scribelm.store import check_name

    indexes = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ScribeError(f"--rag {spec!r}: write NAME=INDEX, e.g. --rag docs=./my-index")
        name = check_name(name)
        if name in indexes:
            raise ScribeError(f"two retrieval indexes would be served as {name!r}")
        indexes[name] = rag.open_index(path)
    return ServedIndexes(indexes, k=k, mode=mode)


def _speculation(args, store) -> dict:
    """ModelPool's speculative options from --speculative / --draft / --num-draft."""
    from scribelm.cli.generate import speculative_method
    from scribelm.store import resolve_model_path

    method = speculative_method(args)
    if method is None:
        return {}
    draft = str(resolve_model_path(args.draft, store)) if args.draft is not None else None
    return {"speculative": method, "draft": draft, "num_draft": args.num_draft}


def _log_to_stderr(quiet: bool) -> None:
    """The server's log (model loads, one line per request, errors with their detail) goes to stderr."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("scribelm.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("scribelm.serve.access").setLevel(logging.WARNING if quiet else logging.INFO)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
