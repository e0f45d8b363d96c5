"""Greedy and beam-search generation equal `transformers`' generate on the same
(random-init) weights, imported through `scribelm.load` of a Hugging Face directory."""

import pytest
import torch

import scribelm
from scribelm.generate import BatchGeneration, beam_search
from scribelm.sampling import SamplingSettings

transformers = pytest.importorskip("transformers")


def _pair(hf, path, sharpen: float):
    with torch.no_grad():  # sharper distributions than the 0.02-std init, so near-ties cannot decide
        hf.get_output_embeddings().weight.mul_(sharpen)
    hf.save_pretrained(path)
    return hf, scribelm.load(path).model


def llama_pair(path, sharpen=30.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )).eval()
    return _pair(hf, path, sharpen)


def gpt2_pair(path, sharpen=30.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    bos_token_id=None, eos_token_id=None)).eval()
    return _pair(hf, path, sharpen)


@pytest.mark.parametrize("build", [llama_pair, gpt2_pair], ids=["llama", "gpt2"])
def test_greedy_and_beam_equal_transformers(build, tmp_path):
    hf, ours = build(tmp_path / "hf")
    prompts = [[5, 17, 3, 44], [9, 9, 2, 70, 61, 8, 1]]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
            theirs_beam = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      num_beams=3, pad_token_id=0)[0, len(prompt):].tolist()
        mine = BatchGeneration(ours, None, [prompt], SamplingSettings(temperature=0, max_new_tokens=16)).run()[0]
        assert mine.token_ids == theirs
        mine_beam = beam_search(ours, None, prompt, SamplingSettings(num_beams=3, max_new_tokens=6))[0]
        assert mine_beam.token_ids == theirs_beam
        expected.append(theirs)
    # and batched (left padding) gives the same rows
    both = BatchGeneration(ours, None, prompts, SamplingSettings(temperature=0, max_new_tokens=16)).run()
    assert [c.token_ids for c in both] == expected


@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_with_eos_equals_transformers(early_stopping, tmp_path):
    hf, ours = llama_pair(tmp_path / "hf", sharpen=10.0)
    prompt = [5, 17, 3, 44]
    greedy = BatchGeneration(ours, None, [prompt], SamplingSettings(temperature=0, max_new_tokens=12)).run()[0].token_ids
    eos = greedy[2]  # a token the model likes, so that hypotheses do finish
    ids = torch.tensor([prompt])
    for length_penalty in (1.0, 0.5):
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, num_beams=3,
                              num_return_sequences=3, eos_token_id=eos, pad_token_id=eos, early_stopping=early_stopping,
                              length_penalty=length_penalty, output_scores=True, return_dict_in_generate=True)
        theirs = []
        for row in out.sequences[:, len(prompt):].tolist():
            theirs.append(row[: row.index(eos) + 1] if eos in row else row)
        mine = beam_search(ours, None, prompt, SamplingSettings(
            num_beams=3, num_return_sequences=3, max_new_tokens=10, stop_token_ids=[eos],
            early_stopping=early_stopping, length_penalty=length_penalty))
        assert any(t[-1] == eos for t in theirs)  # some hypotheses did finish on EOS
        assert [c.token_ids for c in mine] == theirs
        assert [c.score for c in mine] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
