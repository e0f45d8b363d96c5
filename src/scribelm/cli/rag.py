"""`scribe rag`: index documents, search them, answer questions with citations, measure retrieval.

    scribe rag add my-index docs/ notes.md            # create or update (only new or changed files are embedded)
    scribe rag search my-index "reset the router" --k 5 --mode hybrid [--json]
    scribe rag ask my-index "How do I reset it?" --model my-model [--show-context] [--json]
    scribe rag eval my-index --queries q.jsonl --k 10 [--json]

See `scribelm.rag` for the index layout, the BM25 variant, the dense index and the prompt.
"""

from __future__ import annotations

import sys

from scribelm.cli.common import console, err_console, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("rag", help="retrieval-augmented generation: index documents, search, answer with citations")
    verbs = p.add_subparsers(dest="rag_verb", metavar="add|search|ask|eval")
    p.set_defaults(handler=lambda args: p.print_help() or 0)

    a = verbs.add_parser("add", help="create or update an index from files and folders")
    a.add_argument("index", help="the index directory")
    a.add_argument("paths", nargs="+", help="files or folders: .txt .md .jsonl .parquet .pdf (other UTF-8 text too)")
    a.add_argument("--embedder", default=None, help="'minilm' (default for a new index), a model directory or store name")
    a.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default 200)")
    a.add_argument("--overlap", type=int, default=None, help="tokens repeated between chunks (default 40)")
    a.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="count chunk sizes with this model's tokenizer (the answering model's); default the embedder's")
    a.add_argument("--device", default="cpu", help="where the embedder runs: cpu, cuda, mps, auto")
    a.add_argument("--embed-dtype", choices=("auto", "float32", "bfloat16"), default=None,
                   help="what the embedder computes in; auto (default for a new index): bfloat16 on CPUs with "
                        "native bfloat16 (AMX, AVX512-BF16), else float32. Recorded: queries embed the same way")
    a.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for embedding (default torch's: every core; 1 is faster when other jobs share them)")
    a.set_defaults(handler=run_add)

    s = verbs.add_parser("search", help="print the best chunks for a query")
    s.add_argument("index")
    s.add_argument("query")
    _search_arguments(s)
    s.add_argument("--json", action="store_true", help="a JSON list of hits, best first")
    s.add_argument("--device", default="cpu", help="where the embedder runs")
    s.set_defaults(handler=run_search)

    q = verbs.add_parser("ask", help="answer a question from the index, citing the sources")
    q.add_argument("index")
    q.add_argument("question")
    q.add_argument("--model", required=True, help="the answering model: checkpoint directory or store name")
    _search_arguments(q)
    q.add_argument("--max-context-tokens", type=int, default=None, metavar="N",
                   help="token budget of the prompt (default: the model's context minus room for the answer)")
    q.add_argument("--chat-template", metavar="NAME_OR_FILE",
                   help="chat template if the model has none: chatml, llama3, mistral, or a Jinja file")
    q.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="re-order the best N passages by the answering model's log p(question | passage)")
    q.add_argument("--show-context", action="store_true", help="print exactly what the model sees before the answer")
    q.add_argument("--json", action="store_true", help="print the answer, the cited sources and the context as JSON")
    from scribelm.cli.generate import add_sampling_arguments

    add_sampling_arguments(q)
    q.set_defaults(handler=run_ask)

    e = verbs.add_parser("eval", help="recall@k, MRR@k and nDCG@k of each search mode on labelled queries")
    e.add_argument("index")
    e.add_argument("--queries", required=True, help='JSONL: {"query": ..., "relevant": [chunk, document or path ids]}')
    e.add_argument("--k", type=int, default=10)
    e.add_argument("--mode", action="append", choices=("bm25", "dense", "hybrid"), default=None,
                   help="repeatable; default all three")
    e.add_argument("--json", action="store_true")
    e.add_argument("--device", default="cpu", help="where the embedder runs")
    e.set_defaults(handler=run_eval)


def _search_arguments(p) -> None:
    p.add_argument("--k", type=int, default=5, help="how many chunks (default 5)")
    p.add_argument("--mode", choices=("bm25", "dense", "hybrid"), default="hybrid", help="default hybrid")


def _where(chunk) -> str:
    page = f" page {chunk.page}" if chunk.page is not None else ""
    return f"{chunk.source}{page} [{chunk.start}:{chunk.end}]"


def run_add(args) -> int:
    from scribelm.cli.generate import apply_threads
    from scribelm.rag import build_index

    apply_threads(args)

    index = build_index(args.index, args.paths, embedder=args.embedder, chunk_tokens=args.chunk_tokens,
                        overlap=args.overlap, tokenizer=args.tokenizer, device=args.device,
                        embed_dtype=args.embed_dtype)
    report = index.last_report
    for path, why in report.skipped:
        err_console.print(f"skipped {path}: {why}", markup=False, soft_wrap=True)
    console.print(f"{args.index}: {len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} "
                  f"unchanged, {len(report.removed)} removed, {len(report.skipped)} skipped; {report.chunks} chunks "
                  f"({report.chunks_embedded} embedded now, {report.duplicates} duplicates dropped)", markup=False)
    return 0


def run_search(args) -> int:
    from scribelm.rag import open_index

    hits = open_index(args.index, device=args.device).search(args.query, k=args.k, mode=args.mode)
    if args.json:
        print_json([hit.to_dict() for hit in hits])
        return 0
    if not hits:
        console.print("no chunk matches", markup=False)
    for hit in hits:
        scores = "  ".join(f"{name} {value:.4f}" for name, value in hit.scores.items())
        console.print(f"{hit.rank}. {_where(hit.chunk)}  {scores}", markup=False, soft_wrap=True)
        console.print("   " + " ".join(hit.chunk.text.split())[:300], markup=False, soft_wrap=True)
    return 0


def run_ask(args) -> int:
    from scribelm.cli.generate import apply_threads, load_model, sampling_overrides
    from scribelm.generate import resolve_settings
    from scribelm.rag import cited_sources, grounded_messages, open_index

    settings = sampling_overrides(args)
    apply_threads(args)
    template = None
    if args.chat_template:
        from scribelm.chat_templates import resolve_chat_template

        template = resolve_chat_template(args.chat_template)
    index = open_index(args.index, device=args.device)
    lm = load_model(args.model, args.device, args.adapter)
    if template is not None:
        from scribelm.chat_templates import apply_fallback_template

        if apply_fallback_template(lm.tokenizer, template) == template.name and template.stop and "stop" not in settings:
            settings["stop"] = list(template.stop)
    hits = index.search(args.question, k=args.k, mode=args.mode)
    if args.rerank:
        from scribelm.rag import rerank

        hits = rerank(args.question, hits, lm, top=args.rerank)
    answer_tokens = min(resolve_settings(lm, **settings).max_new_tokens, lm.config.context_length // 2)
    messages, used = grounded_messages(args.question, hits, lm, args.max_context_tokens, answer_tokens=answer_tokens)
    if args.show_context and not args.json:
        console.print(lm.tokenizer.apply_chat_template(messages), markup=False, soft_wrap=True)
        console.print("-" * 40, markup=False)
    if args.json:
        answer = lm.chat(messages, **settings)
    else:
        answer = ""
        for delta in lm.chat(messages, stream=True, **settings):
            answer += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    cited = cited_sources(answer, used)
    if args.json:
        number = {id(hit): n for n, hit in enumerate(used, 1)}
        print_json({"answer": answer,
                    "sources": [{"number": number[id(hit)], **hit.to_dict()} for hit in cited],
                    "context": [{"number": n, **hit.to_dict()} for n, hit in enumerate(used, 1)],
                    "prompt": lm.tokenizer.apply_chat_template(messages) if args.show_context else None})
        return 0
    if len(used) < len(hits):
        err_console.print(f"note: {len(hits) - len(used)} of {len(hits)} passages did not fit the context and were left out",
                          markup=False)
    if cited:
        console.print("sources:", markup=False)
        for hit in cited:
            console.print(f"  [{used.index(hit) + 1}] {_where(hit.chunk)}", markup=False, soft_wrap=True)
    else:
        console.print(f"the answer cites none of the {len(used)} sources it was given", markup=False)
    return 0


def run_eval(args) -> int:
    from scribelm.rag import open_index
    from scribelm.rag.evaluate import evaluate, read_queries

    queries = read_queries(args.queries)
    results, _ = evaluate(open_index(args.index, device=args.device), queries, k=args.k, modes=tuple(args.mode or ("bm25", "dense", "hybrid")))
    if args.json:
        print_json({"queries": len(queries), "k": args.k, "results": results})
        return 0
    names = list(next(iter(results.values())))
    console.print(f"{len(queries)} queries", markup=False)
    console.print(f"{'mode':8}" + "".join(f"{n:>12}" for n in names), markup=False)
    for mode, row in results.items():
        console.print(f"{mode:8}" + "".join(f"{row[n]:12.4f}" for n in names), markup=False)
    return 0
