"""Greedy generation equals `transformers`' generate on the same (random-init) weights.

The weight mapping here is deliberately small and local: it copies a Llama and
a GPT-2 state dict into a scribelm `Transformer`."""

import pytest
import torch

from scribelm import ModelConfig, Transformer
from scribelm.generate import BatchGeneration, beam_search
from scribelm.sampling import SamplingSettings

transformers = pytest.importorskip("transformers")


def llama_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )).eval()
    cfg = ModelConfig(vocab_size=96, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64,
                      activation="swiglu", norm="rmsnorm", norm_bias=False, position="rope", qkv_bias=False,
                      attn_out_bias=False, mlp_bias=False, tie_embeddings=False)
    sd = hf.state_dict()
    mapped = {"token_embedding.weight": sd["model.embed_tokens.weight"], "final_norm.weight": sd["model.norm.weight"],
              "unembedding.weight": sd["lm_head.weight"]}
    names = {"self_attn.q_proj": "attention.q", "self_attn.k_proj": "attention.k", "self_attn.v_proj": "attention.v",
             "self_attn.o_proj": "attention.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
             "mlp.down_proj": "mlp.down", "input_layernorm": "attention_norm", "post_attention_layernorm": "mlp_norm"}
    for i in range(2):
        for theirs, mine in names.items():
            mapped[f"blocks.{i}.{mine}.weight"] = sd[f"model.layers.{i}.{theirs}.weight"]
    ours = Transformer(cfg).eval()
    ours.load_state_dict(mapped, strict=True)
    return hf, ours


def gpt2_pair():
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    bos_token_id=None, eos_token_id=None)).eval()
    cfg = ModelConfig(vocab_size=96, context_length=64, d_model=32, n_layers=2, n_heads=4, activation="gelu_tanh",
                      norm="layernorm", position="learned", tie_embeddings=True)
    sd = hf.state_dict()
    mapped = {"token_embedding.weight": sd["transformer.wte.weight"], "position_embedding.weight": sd["transformer.wpe.weight"],
              "final_norm.weight": sd["transformer.ln_f.weight"], "final_norm.bias": sd["transformer.ln_f.bias"],
              "unembedding.weight": sd["transformer.wte.weight"]}
    for i in range(2):
        p = f"transformer.h.{i}."
        q, k, v = sd[p + "attn.c_attn.weight"].t().chunk(3, dim=0)  # Conv1D stores (in, out)
        qb, kb, vb = sd[p + "attn.c_attn.bias"].chunk(3)
        mapped.update({
            f"blocks.{i}.attention.q.weight": q, f"blocks.{i}.attention.k.weight": k, f"blocks.{i}.attention.v.weight": v,
            f"blocks.{i}.attention.q.bias": qb, f"blocks.{i}.attention.k.bias": kb, f"blocks.{i}.attention.v.bias": vb,
            f"blocks.{i}.attention.o.weight": sd[p + "attn.c_proj.weight"].t(), f"blocks.{i}.attention.o.bias": sd[p + "attn.c_proj.bias"],
            f"blocks.{i}.mlp.up.weight": sd[p + "mlp.c_fc.weight"].t(), f"blocks.{i}.mlp.up.bias": sd[p + "mlp.c_fc.bias"],
            f"blocks.{i}.mlp.down.weight": sd[p + "mlp.c_proj.weight"].t(), f"blocks.{i}.mlp.down.bias": sd[p + "mlp.c_proj.bias"],
            f"blocks.{i}.attention_norm.weight": sd[p + "ln_1.weight"], f"blocks.{i}.attention_norm.bias": sd[p + "ln_1.bias"],
            f"blocks.{i}.mlp_norm.weight": sd[p + "ln_2.weight"], f"blocks.{i}.mlp_norm.bias": sd[p + "ln_2.bias"],
        })
    ours = Transformer(cfg).eval()
    ours.load_state_dict({k: v.contiguous() for k, v in mapped.items()}, strict=True)
    return hf, ours


@pytest.mark.parametrize("build", [llama_pair, gpt2_pair], ids=["llama", "gpt2"])
def test_greedy_and_beam_equal_transformers(build):
    torch.manual_seed(0)
    hf, ours = build()
    with torch.no_grad():  # sharper distributions than the 0.02-std init, so ties cannot decide
        hf.get_output_embeddings().weight.mul_(30)
        ours.unembedding.weight.copy_(hf.get_output_embeddings().weight)
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
def test_beam_search_with_eos_equals_transformers(early_stopping):
    torch.manual_seed(0)
    hf, ours = llama_pair()
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(10)
        ours.unembedding.weight.copy_(hf.get_output_embeddings().weight)
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
