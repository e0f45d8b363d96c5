"""Answering with citations, end to end with a tiny trained model: the right document at
rank 1, the prompt the model sees, the context budget, and reading citations back."""

from __future__ import annotations

import pytest

from scribelm import rag
from scribelm.errors import ScribeError
from scribelm.rag.prompt import SYSTEM_PROMPT


@pytest.fixture(scope="module")
def answer_index(tmp_path_factory, docs, minilm, answering_lm):
    # chunk sizes counted in the answering model's tokens
    return rag.build_index(tmp_path_factory.mktemp("answer") / "index", [docs], embedder=minilm, tokenizer=answering_lm,
                           chunk_tokens=48, overlap=8)


def test_question_retrieves_its_document_and_the_model_sees_it_cited(answer_index, answering_lm):
    question = "What is the capital city of Freedonia?"
    hits = answer_index.search(question, k=4, mode="hybrid")
    assert hits[0].chunk.source.endswith("freedonia.md") and "Glorbville" in hits[0].chunk.text
    messages, used = rag.grounded_messages(question, hits, answering_lm)
    assert used == hits
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    prompt = answering_lm.tokenizer.apply_chat_template(messages)
    assert f"[1] ({hits[0].chunk.source}, characters {hits[0].chunk.start}-{hits[0].chunk.end})\n" \
           f"{hits[0].chunk.text.strip()}" in prompt
    assert prompt.index("[1] (") < prompt.index("[2] (") < prompt.index("Question: " + question)
    answer = "".join(answering_lm.chat(messages, stream=True, max_new_tokens=12, temperature=0))
    assert answer == answering_lm.chat(messages, max_new_tokens=12, temperature=0)
    assert rag.cited_sources(answer + " [1]", used)[-1] is hits[0]


def test_passages_that_do_not_fit_are_dropped_whole(answer_index, answering_lm):
    hits = answer_index.search("tomatoes basil router train harbour", k=6, mode="bm25")
    _, all_used = rag.grounded_messages("Which plant grows beside tomatoes?", hits, answering_lm)
    full = len(answering_lm.tokenizer.encode_chat(rag.grounded_messages("Which plant grows beside tomatoes?", hits,
                                                                         answering_lm)[0]))
    budget = full - 10
    messages, used = rag.grounded_messages("Which plant grows beside tomatoes?", hits, answering_lm, budget)
    assert len(used) < len(all_used) and all(h in hits for h in used)
    assert [hits.index(h) for h in used] == sorted(hits.index(h) for h in used)
    assert len(answering_lm.tokenizer.encode_chat(messages)) <= budget
    prompt = messages[1]["content"]
    for number, hit in enumerate(used, 1):
        assert f"[{number}] (" in prompt and hit.chunk.text.strip() in prompt
    for hit in hits:
        if hit not in used:
            assert hit.chunk.text.strip() not in prompt


def test_question_longer_than_the_context_is_refused(answer_index, answering_lm):
    hits = answer_index.search("router", k=2)
    with pytest.raises(ScribeError, match="the question takes .* tokens"):
        rag.grounded_messages("Why? " * 600, hits, answering_lm)
    with pytest.raises(ScribeError, match="empty"):
        rag.grounded_messages(" ", hits, answering_lm)


def test_cited_sources_reads_numbers_back(answer_index):
    used = answer_index.search("router tomatoes train", k=3, mode="bm25")
    assert len(used) == 3
    cited = rag.cited_sources("Hold the button [2]. See also [1, 3] and [2][9].", used)
    assert cited == [used[1], used[0], used[2]]
    assert rag.cited_sources("No citations here, only [0] and [x].", used) == []


def test_rerank_orders_by_the_models_loglikelihood_of_the_question(answer_index, answering_lm):
    from scribelm.evaluate.scoring import loglikelihood

    question = "Which plant grows well beside tomatoes?"
    hits = answer_index.search(question, k=4, mode="hybrid")
    reranked = rag.rerank(question, hits, answering_lm, top=3)
    assert [h.rank for h in reranked] == [1, 2, 3, 4] and reranked[3].chunk == hits[3].chunk
    assert {h.chunk for h in reranked[:3]} == {h.chunk for h in hits[:3]}
    expected = {h.chunk.id: loglikelihood(answering_lm, [(f"Passage: {h.chunk.text.strip()}\n", f"Question: {question}")])[0][0]
                for h in hits[:3]}
    for hit in reranked[:3]:
        assert hit.score == hit.scores["rerank"] == pytest.approx(expected[hit.chunk.id], abs=1e-4)
    assert [h.score for h in reranked[:3]] == sorted((h.score for h in reranked[:3]), reverse=True)
