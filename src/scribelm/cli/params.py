"""`scribe params PRESET_OR_MODEL [--json]`: where the parameters are."""

from __future__ import annotations

from rich.table import Table

from scribelm.cli.common import console, human_bytes, human_count, print_json, resolve_config


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="parameter breakdown, FLOPs and memory of a preset or model")
    p.add_argument("model", help="preset name (e.g. gpt3-175b), checkpoint directory, config.json or GGUF file")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    from scribelm.inspect.params import parameter_breakdown

    config = resolve_config(args.model)
    b = parameter_breakdown(config)
    if args.json:
        print_json(b)
        return 0
    c = config
    console.print(
        f"[bold]{c.name}[/bold]: {f'{c.encoder_layers} encoder + ' if c.encoder_layers else ''}{c.n_layers} "
        f"{'decoder ' if c.encoder_layers else ''}layers, width {c.d_model}, {c.n_heads} heads of {c.head_dim}"
        f" ({c.n_kv_heads} key/value heads), MLP {c.d_mlp} ({c.activation}), vocab {c.vocab_size}, context {c.context_length}"
    )
    table = Table(show_edge=False)
    table.add_column("parameters")
    table.add_column("count", justify="right")
    table.add_column("per layer", justify="right")
    table.add_column("share", justify="right")
    for row in b["rows"]:
        if row["name"] == "biases":
            table.add_row("[bold]weight matrices[/bold]", f"[bold]{b['weight_matrices']:,}[/bold]", "", f"{100 * b['weight_matrices'] / b['total']:.2f}%", end_section=True)
        table.add_row(row["name"], f"{row['count']:,}", f"{row['per_layer']:,}" if row["per_layer"] else "", f"{100 * row['count'] / b['total']:.2f}%")
    if not any(r["name"] == "biases" for r in b["rows"]):
        table.add_row("[bold]weight matrices[/bold]", f"[bold]{b['weight_matrices']:,}[/bold]", "", f"{100 * b['weight_matrices'] / b['total']:.2f}%", end_section=True)
    table.add_row("[bold]total[/bold]", f"[bold]{b['total']:,}[/bold]", f"{b['per_layer']:,}", "100.00%")
    console.print(table)
    f = b["train_flops_per_token"]
    console.print(
        f"total {human_count(b['total'])} parameters ({human_count(b['non_embedding'])} without embeddings); "
        f"{b['per_layer']:,} per layer"
    )
    if c.n_experts:
        console.print(
            f"active per token: {human_count(b['active'])} of {human_count(b['total'])} "
            f"({c.experts_per_token} of {c.n_experts} experts{', plus the shared expert' if c.d_shared_expert else ''})"
        )
    console.print(
        f"training FLOPs per token: 6N = {f['6n']:.3e} + attention {f['attention']:.3e} = {f['total']:.3e}"
        f" (N = {b['matmul_params']:,} parameters in matmuls, context {c.context_length})"
    )
    w = b["weights_bytes"]
    console.print(
        "weights in memory: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in w.items())
    )
    kv = b["kv_cache_bytes_per_token"]
    console.print(
        f"KV cache per token: {human_bytes(kv['bf16'])} bf16 ({human_bytes(kv['fp32'])} fp32); "
        f"a full {c.context_length}-token context: {human_bytes(kv['bf16'] * c.context_length)} bf16"
    )
    return 0
