"""`scribe serve --rag NAME=INDEX`: MODEL+rag:NAME answers from a real retrieval index (BM25 +
MiniLM + faiss), through the official `openai` client, with the sources it saw and cited."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from scribelm import rag
from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from scribelm.serve.rag_routes import ServedIndexes
from tests.serving import ServeProcess, ServerThread, run_scribe_serve, save_tiny_models

DOCUMENTS = {
    "lighthouse.txt": "The lighthouse keeper of Port Quill is named Ada Fenwick. She has kept the light for forty years.",
    "bread.md": "Bread rises because yeast produces carbon dioxide gas while the dough ferments.",
    "river.txt": "The river Wend floods every spring when the snow melts in the northern hills.",
    "chess.txt": "In chess the knight moves in an L shape: two squares one way and one square sideways.",
}
QUESTION = "Who keeps the lighthouse of Port Quill?"
CONTEXT = 1024


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-serve")
    (root / "docs").mkdir()
    for name, text in DOCUMENTS.items():
        (root / "docs" / name).write_text(text + "\n", encoding="utf-8")
    rag.build_index(root / "index", [root / "docs"])
    return root / "index"


@pytest.fixture(scope="module")
def index(index_dir):
    return rag.open_index(index_dir)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("rag-models"), tokenizer, context_length=CONTEXT, text_only=True)["alpha"]


@pytest.fixture(scope="module")
def server(model_path, index):
    pool = ModelPool({"alpha": model_path}, max_batch=4, max_queue=16)
    with ServerThread(create_app(pool, rag=ServedIndexes({"docs": index}, k=3))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_variant_sends_the_grounded_prompt_and_returns_its_sources(client, index, model_path, tokenizer):
    import scribelm

    lm = scribelm.load(model_path)
    hits = index.search(QUESTION, 3, "hybrid")
    assert hits[0].chunk.source.endswith("lighthouse.txt")
    messages, used = rag.grounded_messages(QUESTION, hits, lm, max_context_tokens=CONTEXT - 12)
    assert "[1] (" in messages[-1]["content"] and "Ada Fenwick" in messages[-1]["content"]
    served = client.chat.completions.create(model="alpha+rag:docs", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=12, temperature=0)
    plain = client.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0)
    assert served.model == "alpha+rag:docs"
    assert served.choices[0].message.content == plain.choices[0].message.content
    assert served.usage.prompt_tokens == plain.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    sources = served.choices[0].message.sources
    assert [s["id"] for s in sources] == [h.chunk.id for h in used]
    assert [s["number"] for s in sources] == list(range(1, len(used) + 1))
    first = sources[0]
    assert first["source"].endswith("lighthouse.txt") and first["text"] == used[0].chunk.text
    assert (first["start"], first["end"], first["page"]) == (used[0].chunk.start, used[0].chunk.end, None)
    assert first["scores"] == pytest.approx(used[0].scores) and first["score"] == pytest.approx(used[0].score)
    cited = {id(h) for h in rag.cited_sources(served.choices[0].message.content, used)}
    assert [s["cited"] for s in sources] == [id(h) in cited for h in used]


def test_cited_sources_are_marked(client):
    """An answer held to a grammar that cites [1]: that source, and only it, is marked cited."""
    schema = {"type": "string", "enum": ["Ada Fenwick keeps it [1]."]}
    r = client.chat.completions.create(
        model="alpha+rag:docs", messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert json.loads(r.choices[0].message.content) == "Ada Fenwick keeps it [1]."
    assert [s["cited"] for s in r.choices[0].message.sources] == [True] + [False] * (len(r.choices[0].message.sources) - 1)


def test_streamed_answer_ends_with_a_sources_chunk(client):
    args = dict(model="alpha+rag:docs", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"alpha+rag:docs"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    with_sources = [c for c in chunks if getattr(c, "sources", None)]
    assert len(with_sources) == 1 and with_sources[0].choices == []
    assert with_sources[0].sources == whole.choices[0].message.sources
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_earlier_turns_and_the_clients_system_message_are_kept(client, index, model_path):
    import scribelm

    lm = scribelm.load(model_path)
    earlier = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hello."}]
    question = "How does a knight move in chess?"
    hits = index.search(question, 3, "hybrid")
    assert hits[0].chunk.source.endswith("chess.txt")
    conversation = [{"role": "system", "content": "Be brief."}, *earlier, {"role": "user", "content": question}]
    served = client.chat.completions.create(model="alpha+rag:docs", messages=conversation, max_tokens=8, temperature=0)
    shown, used = rag.grounded_messages(question, hits, lm)
    expected = [{"role": "system", "content": shown[0]["content"] + "\n\nBe brief."}, *earlier, shown[-1]]
    plain = client.chat.completions.create(model="alpha", messages=expected, max_tokens=8, temperature=0)
    assert served.usage.prompt_tokens == plain.usage.prompt_tokens
    assert served.choices[0].message.content == plain.choices[0].message.content
    assert [s["id"] for s in served.choices[0].message.sources] == [h.chunk.id for h in used]


def test_passages_that_do_not_fit_are_dropped_whole(client, index, model_path, tokenizer):
    """max_tokens leaves room for the best passage only: the others are dropped whole."""
    import scribelm

    lm = scribelm.load(model_path)
    hits = index.search(QUESTION, 3, "hybrid")
    with_best = len(tokenizer.encode_chat(rag.grounded_messages(QUESTION, hits[:1], lm, max_context_tokens=CONTEXT)[0]))
    r = client.chat.completions.create(model="alpha+rag:docs", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=CONTEXT - with_best, temperature=0)
    assert [s["text"] for s in r.choices[0].message.sources] == [hits[0].chunk.text]
    assert r.usage.prompt_tokens == with_best


def test_models_list_the_variants_and_search_returns_the_hits(server, client, index):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["alpha", "alpha+rag:docs"]
    card = client.models.retrieve("alpha+rag:docs")
    assert card.model_extra["rag"] == "docs" and card.model_extra["root"] == "alpha"
    r = httpx.post(server.url + "/v1/rag/search", json={"index": "docs", "query": "why does bread rise", "k": 2, "mode": "bm25"})
    assert r.status_code == 200
    assert r.json()["data"] == json.loads(json.dumps([h.to_dict() for h in index.search("why does bread rise", 2, "bm25")]))


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "alpha+rag:nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "no retrieval index 'nope'"),
    ({"model": "beta+rag:docs", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
    ({"model": "alpha+rag:docs", "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400, "n", "'n' must be 1"),
    ({"model": "alpha+rag:docs", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     400, "messages", "the last message must be the user's question"),
    ({"model": "alpha+rag:docs", "messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT},
     400, "messages", "no room for a prompt"),
    ({"model": "alpha+rag:docs", "messages": [{"role": "user", "content": "hi"}], "tools_x": 1}, 400, "tools_x", "Unrecognized"),
])
def test_bad_rag_requests_are_openai_shaped_errors(server, body, status, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"index": "nope", "query": "x"}, "index"), ({"index": "docs", "query": " "}, "query"),
    ({"index": "docs", "query": "x", "k": 0}, "k"), ({"index": "docs", "query": "x", "mode": "magic"}, "mode"),
    ({"index": "docs", "query": "x", "top": 3}, "top"),
])
def test_bad_searches_are_openai_shaped_errors(server, body, param):
    r = httpx.post(server.url + "/v1/rag/search", json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param


def test_scribe_serve_rag(model_path, index_dir, tmp_path):
    with ServeProcess(f"alpha={model_path}", "--rag", f"docs={index_dir}", "--rag-k", "2") as served:
        assert any("retrieval: docs (4 passages)" in line for line in served.stdout_lines)
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="alpha+rag:docs", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=4, temperature=0)
        assert len(r.choices[0].message.sources) == 2 and r.choices[0].message.sources[0]["source"].endswith("lighthouse.txt")
    (tmp_path / "empty").mkdir()
    failed = run_scribe_serve(f"alpha={model_path}", "--rag", f"docs={tmp_path / 'empty'}")
    assert failed.returncode == 2 and "error:" in failed.stderr and "Traceback" not in failed.stderr
    failed = run_scribe_serve(f"alpha={model_path}", "--rag", "docs")
    assert failed.returncode == 2 and "write NAME=INDEX" in failed.stderr


@pytest.mark.slow
def test_chat_page_toggle_shows_the_sources_under_each_answer(server, tmp_path):
    import os
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
    from tests.serve.test_serve_browser import CHROMIUM_ARGS

    chromium = os.environ.get("SCRIBE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("the browser test needs Debian's chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 800})
        try:
            page = context.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length === 1")
            assert page.locator("#model option").all_inner_texts() == ["alpha"]  # the variants are the toggle
            assert page.locator("#rag-box").is_visible()
            assert page.locator("#rag-index option").all_inner_texts() == ["docs"]
            page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
            page.fill("#max-tokens", "8")
            page.check("#rag-on")
            page.fill("#prompt", QUESTION)
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
            answer = page.locator(".msg.assistant").nth(0)
            assert "alpha+rag:docs" in answer.locator(".meta").inner_text()
            sources = answer.locator(".sources .source summary").all_inner_texts()
            assert len(sources) == 3 and sources[0].startswith("[1] ") and "lighthouse.txt, characters 0-" in sources[0]
            answer.locator(".sources summary").first.click()
            assert "Ada Fenwick" in answer.locator(".sources .passage").first.inner_text()
            # toggled off: a plain answer, no sources; the first answer keeps its own
            page.uncheck("#rag-on")
            page.fill("#prompt", "And the river?")
            page.press("#prompt", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length === 2", timeout=60_000)
            second = page.locator(".msg.assistant").nth(1)
            assert second.locator(".sources").count() == 0 and "rag" not in second.locator(".meta").inner_text()
            assert page.locator(".msg.assistant").nth(0).locator(".sources .source").count() == 3
            page.reload()  # the conversation, its sources and the toggle survive a reload
            page.wait_for_selector(".msg.assistant .sources")
            assert page.locator(".msg.assistant").nth(0).locator(".sources .source").count() == 3
        finally:
            context.close()
