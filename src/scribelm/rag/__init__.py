"""Retrieval-augmented generation: index your documents, retrieve, answer with citations.

    from scribelm import rag
    index = rag.build_index("my-index", sources=["docs/"])          # create or update (embedder "minilm")
    index = rag.open_index("my-index")                              # refuses another embedder
    hits = index.search("how do I reset it?", k=5, mode="hybrid")   # "bm25" | "dense" | "hybrid"
    messages, used = rag.grounded_messages(question, hits, lm)      # numbered sources + cite instruction
    answer = lm.chat(messages)
    rag.cited_sources(answer, used)                                 # the hits it cited as [n]
    rag.rerank(question, hits, lm)                                  # optional: by log p(question | passage)

Files: ingest (reading files), chunking, bm25, dense (embeddings + faiss), fusion (RRF),
store/index (the index directory), prompt (grounded messages, citations), rerank, evaluate
(recall / MRR / nDCG), kjv_eval (the bundled evaluation set).
"""

from scribelm.rag.prompt import SYSTEM_PROMPT, cited_sources, grounded_messages
from scribelm.rag.rerank import rerank
from scribelm.rag.store.index import MODES, AddReport, Chunk, Hit, Index, add, build_index, open_index

__all__ = ["MODES", "SYSTEM_PROMPT", "AddReport", "Chunk", "Hit", "Index", "add", "build_index", "cited_sources",
           "grounded_messages", "open_index", "rerank"]
