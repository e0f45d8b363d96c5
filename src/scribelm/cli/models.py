"""`scribe models list|add|rm|show`: the local model store."""

from __future__ import annotations

import json

from rich.table import Table

from scribelm.cli.common import console, human_bytes, human_count, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="the local model store: list, add, remove and show models by name")
    p.add_argument("--store", help="store directory (default: $SCRIBE_MODELS_DIR or ~/.cache/scribelm/models)")
    verbs = p.add_subparsers(dest="models_verb", metavar="ACTION")

    ls = verbs.add_parser("list", help="the stored models")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    ls.set_defaults(handler=run_list)

    add = verbs.add_parser("add", help="copy (or link) a checkpoint or Hugging Face directory, or a GGUF file, into the store")
    add.add_argument("name", help="the name to serve it under")
    add.add_argument("path", help="model directory or GGUF file")
    add.add_argument("--link", action="store_true", help="store a link to the directory instead of a copy")
    add.add_argument("--force", action="store_true",
                     help="replace a model already stored under this name (the old one stays until the new one is complete)")
    add.set_defaults(handler=run_add)

    rm = verbs.add_parser("rm", help="remove a model from the store (a linked directory is left alone)")
    rm.add_argument("name")
    rm.set_defaults(handler=run_rm)

    show = verbs.add_parser("show", help="config, size, parameters, quantization and chat template of a model")
    show.add_argument("name", help="store name, model directory or GGUF file")
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(handler=run_show)

    p.set_defaults(handler=run_list, json=False)


def _store(args):
    from scribelm.store import ModelStore

    return ModelStore(args.store)


def run_list(args) -> int:
    store = _store(args)
    infos = []
    for name in store.names():
        try:
            infos.append(store.info(name).to_dict())
        except Exception as err:  # one broken entry must not hide the others
            infos.append({"name": name, "error": str(err)})
    if getattr(args, "json", False):
        print_json(infos)
        return 0
    if not infos:
        console.print(f"no models in {store.root}; add one with `scribe models add NAME PATH`")
        return 0
    table = Table(show_edge=False, title=str(store.root))
    for column in ("name", "format", "parameters", "size", "quantization", "source"):
        table.add_column(column, justify="right" if column in ("parameters", "size") else "left")
    for info in infos:
        if "error" in info:
            table.add_row(info["name"], "[red]broken[/red]", "", "", "", info["error"])
            continue
        table.add_row(
            info["name"], info["format"], human_count(info["parameters"]), human_bytes(info["size_bytes"]),
            info["quantization"], f"link → {info['path']}" if info["linked"] else "copy",
        )
    console.print(table)
    return 0


def run_add(args) -> int:
    store = _store(args)
    entry = store.add(args.name, args.path, link=args.link, overwrite=args.force)
    console.print(f"{'linked' if args.link else 'copied'} {args.path} as [bold]{args.name}[/bold] ({entry})")
    return 0


def run_rm(args) -> int:
    store = _store(args)
    store.remove(args.name)
    console.print(f"removed {args.name} from {store.root}")
    return 0


def run_show(args) -> int:
    from scribelm.store import describe_model, resolve_model_path

    store = _store(args)
    if args.name in store:
        info = store.info(args.name)
    else:
        info = describe_model(resolve_model_path(args.name, store))
    data = info.to_dict()
    if args.json:
        print_json(data)
        return 0
    console.print(f"[bold]{info.name}[/bold]  {info.path}{'  (link)' if info.linked else ''}")
    console.print(f"format        {info.format}")
    console.print(f"parameters    {info.parameters:,} ({human_count(info.parameters)})")
    console.print(f"size on disk  {human_bytes(info.size_bytes)}")
    console.print(f"quantization  {info.quantization}")
    console.print("config        " + json.dumps(info.config, ensure_ascii=False))
    console.print("chat template " + (repr(info.chat_template) if info.chat_template else
                                      "none (serve and chat take --chat-template chatml|llama3|mistral|FILE)"))
    return 0
