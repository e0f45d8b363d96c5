"""`scribe serve` serves a T5: `/v1/completions` through the real `openai` client answers what
`LM.generate` answers (the prompt to the encoder, the completion from the decoder), greedy,
seeded with several choices, and streamed; what it cannot do is refused with a 400.
`scribe generate` streams a T5's text too."""

import openai
import pytest
import torch

import scribelm
from scribelm.cli import main
from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from scribelm.serve.seq2seq_engine import Seq2SeqEngine
from tests.serving import ServerThread

PROMPTS = ["In the beginning God created the heaven", "Call me Ishmael."]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer):
    """A random transformers T5 v1.1 over the test tokenizer; special tokens' head rows are zero,
    so greedy decoding writes text rather than ending at once."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                      relative_attention_max_distance=20, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                      tie_word_embeddings=False)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        model.lm_head.weight[sorted(tokenizer.special_ids | {0, 1})] = 0.0
    path = tmp_path_factory.mktemp("t5serve") / "t5"
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


def test_completions_equal_lm_generate(t5_dir):
    lm = scribelm.load(t5_dir)
    pool = ModelPool({"t5": str(t5_dir)}, max_batch=4)
    with ServerThread(create_app(pool)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert isinstance(pool.get("t5"), Seq2SeqEngine)
        greedy = client.completions.create(model="t5", prompt=PROMPTS, max_tokens=16, temperature=0)
        sampled = client.completions.create(model="t5", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9,
                                            seed=3, n=2)
        streamed = client.completions.create(model="t5", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True)
        pieces = [c.choices[0].text for c in streamed if c.choices]
        echoed = client.completions.create(model="t5", prompt=PROMPTS[1], max_tokens=0, echo=True)
        with pytest.raises(openai.BadRequestError, match="encoder-decoder"):
            client.completions.create(model="t5", prompt=PROMPTS[0], max_tokens=4, echo=True, logprobs=1)
    expected = lm.generate(PROMPTS, max_new_tokens=16, temperature=0)
    assert all(expected) and [c.text for c in sorted(greedy.choices, key=lambda c: c.index)] == expected
    assert greedy.usage.prompt_tokens == sum(len(lm.tokenizer.backend.encode(p).ids) for p in PROMPTS)
    drawn = lm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, num_return_sequences=2)
    assert [c.text for c in sorted(sampled.choices, key=lambda c: c.index)] == drawn
    assert len(pieces) > 1 and "".join(pieces) == expected[1]
    assert echoed.choices[0].text == PROMPTS[1] and echoed.choices[0].finish_reason == "length"


def test_scribe_generate_streams_what_lm_generate_writes(t5_dir, capsys):
    lm = scribelm.load(t5_dir)
    capsys.readouterr()
    for flags, settings in ((["--temperature", "0"], dict(temperature=0)),
                            (["--temperature", "0.9", "--top-k", "20", "--seed", "5"], dict(temperature=0.9, top_k=20, seed=5))):
        assert main(["generate", str(t5_dir), PROMPTS[0], "--max-new-tokens", "12", *flags]) == 0
        assert capsys.readouterr().out == lm.generate(PROMPTS[0], max_new_tokens=12, **settings) + "\n"
