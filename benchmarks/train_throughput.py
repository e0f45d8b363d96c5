"""Training throughput: scribelm against Hugging Face transformers, same shape, same loop.

    python benchmarks/train_throughput.py                      # CPU, small shape
    python benchmarks/train_throughput.py --compile            # also torch.compile both sides
    python benchmarks/train_throughput.py --device cuda --d-model 768 --layers 12 --heads 12 --seq 1024 --batch 8 --bf16

Two pairs, each the same architecture built twice:
  GPT-2 style  scribelm.Transformer (gelu_tanh, LayerNorm, learned positions, biases, tied)  vs GPT2LMHeadModel
  Llama style  scribelm.Transformer (SwiGLU, RMSNorm, RoPE, no biases)                      vs LlamaForCausalLM
Both sides run the same plain PyTorch step (forward + cross-entropy, backward, fused AdamW),
the same batches and the same thread count. Steps of the two models are interleaved so a busy
machine slows both alike; the fastest step of each (the one least disturbed by other jobs) is reported,
with the median beside it. MFU = achieved training FLOP/s
(6N + attention, from scribelm.inspect.params) over a measured matmul peak (CPU) or the
datasheet peak (GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scribelm.config import ModelConfig
from scribelm.inspect.params import flops_per_token
from scribelm.model import Transformer
from scribelm.train.flops import measure_peak_flops


def scribe_configs(a) -> dict[str, ModelConfig]:
    common = dict(vocab_size=a.vocab, context_length=a.seq, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads)
    return {
        "gpt2": ModelConfig(**common, activation="gelu_tanh", norm="layernorm", position="learned", qkv_bias=True,
                            attn_out_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5),
        "llama": ModelConfig(**common, n_kv_heads=a.heads, d_mlp=a.d_mlp, activation="swiglu", norm="rmsnorm", norm_bias=False,
                             position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False, tie_embeddings=False,
                             norm_eps=1e-5),
    }


def hf_model(kind: str, c: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.d_model, n_layer=c.n_layers,
                         n_head=c.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                         tie_word_embeddings=True)
        return GPT2LMHeadModel(cfg).train()
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.context_length,
                      rms_norm_eps=c.norm_eps, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    return LlamaForCausalLM(cfg).train()


def make_step(model, is_hf: bool, autocast):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = model

    def step(ids, targets):
        with autocast():
            if is_hf:
                logits = forward(input_ids=ids, use_cache=False).logits
            else:
                logits = forward(ids)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-mlp", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warmup steps)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    p.add_argument("--only", choices=["gpt2", "llama"], help="one pair only")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.bf16 else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if a.bf16 else torch.autocast(device.type, enabled=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    peak = measure_peak_flops(device, dtype)
    print(f"device {device} ({torch.get_num_threads()} threads), batch {a.batch}×{a.seq}, d_model {a.d_model}, "
          f"{a.layers} layers, {a.heads} heads, vocab {a.vocab}, {'bf16' if a.bf16 else 'fp32'}; "
          f"peak for MFU {peak / 1e9:.0f} GFLOP/s")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(device) for _ in range(4)]
    tokens = a.batch * a.seq
    variants = [False, True] if a.compile else [False]
    rows = []
    for kind, config in scribe_configs(a).items():
        if a.only and kind != a.only:
            continue
        fpt = flops_per_token(config, a.seq)
        for compiled in variants:
            torch.manual_seed(0)
            ours = Transformer(config).to(device).train()
            theirs = hf_model(kind, config).to(device)
            if compiled:
                ours, theirs = torch.compile(ours), torch.compile(theirs)
            steps = {"scribelm": make_step(ours, False, autocast), "transformers": make_step(theirs, True, autocast)}
            times = {name: [] for name in steps}
            for i in range(a.steps + 2):
                for name, step in steps.items():  # interleaved: contention hits both
                    batch = batches[i % len(batches)]
                    sync()
                    start = time.perf_counter()
                    step(batch[:, :-1], batch[:, 1:])
                    sync()
                    if i >= 2:
                        times[name].append(time.perf_counter() - start)
            result = {}
            for name, ts in times.items():
                tps = tokens / min(ts)
                result[name] = tps
                rows.append((f"{kind}{' compiled' if compiled else ''}", name, tps, tps * fpt / peak, tokens / statistics.median(ts)))
            rows.append((f"{kind}{' compiled' if compiled else ''}", "ratio scribelm/transformers",
                         result["scribelm"] / result["transformers"], None, None))
    print(f"{'shape':<16}{'implementation':<30}{'tokens/s':>12}{'MFU':>8}{'median tokens/s':>18}")
    for shape, name, value, mfu, median in rows:
        if mfu is None:
            print(f"{shape:<16}{name:<30}{value:>11.2f}x")
        else:
            print(f"{shape:<16}{name:<30}{value:>12,.0f}{100 * mfu:>7.1f}%{median:>18,.0f}")


if __name__ == "__main__":
    main()
