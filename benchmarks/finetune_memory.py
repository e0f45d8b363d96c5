"""Memory and speed of fine-tuning: full SFT vs LoRA vs QLoRA, and scribelm LoRA vs peft.

    python benchmarks/finetune_memory.py                      # CPU, a ~30M-parameter Llama-style model
    python benchmarks/finetune_memory.py --device cuda --d-model 2048 --layers 16 --vocab 32000

Part 1 trains the same scribelm model three ways for a few steps on random
tokens: all weights (AdamW), LoRA on attention q/v, and QLoRA (NF4 base +
the same adapters). Part 2 builds one random-init Hugging Face
LlamaForCausalLM, copies its weights into a scribelm model (logits checked
equal), and trains LoRA on q/v with `peft` and with scribelm side by side.

Each configuration runs in its own process, so its peak memory is its own:
on CUDA `torch.cuda.max_memory_allocated`, on CPU the peak resident set size
(reset once the model is built, so the peak is the training steps') minus
the resident size just before the model was built; so it counts weights,
gradients, optimizer state and activations. Throughput is
training tokens per second of the fastest step after warm-up (robust to a
busy machine). Ratios are printed against
full SFT (part 1) and against peft (part 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size since start or since the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Give freed memory back to the OS, then restart the peak count (Linux: clear_refs 5)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def scribe_config(args):
    from scribelm.config import ModelConfig

    return ModelConfig(
        vocab_size=args.vocab, context_length=args.seq, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads, n_kv_heads=args.heads, d_mlp=args.d_model * 8 // 3 // 64 * 64 or 64,
        activation="swiglu", norm="rmsnorm", norm_bias=False, position="rope", qkv_bias=False,
        attn_out_bias=False, mlp_bias=False, tie_embeddings=False, norm_eps=1e-6,
    )


def hf_model(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.context_length, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_config)


def copy_hf_into_scribe(hf, model) -> None:
    """Llama names -> scribelm names (the two models compute the same function)."""
    hf_state = hf.state_dict()
    names = {"model.embed_tokens.weight": "token_embedding.weight", "model.norm.weight": "final_norm.weight",
             "lm_head.weight": "unembedding.weight"}
    for i in range(model.config.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        names.update({
            p + "self_attn.q_proj.weight": q + "attention.q.weight", p + "self_attn.k_proj.weight": q + "attention.k.weight",
            p + "self_attn.v_proj.weight": q + "attention.v.weight", p + "self_attn.o_proj.weight": q + "attention.o.weight",
            p + "mlp.gate_proj.weight": q + "mlp.gate.weight", p + "mlp.up_proj.weight": q + "mlp.up.weight",
            p + "mlp.down_proj.weight": q + "mlp.down.weight", p + "input_layernorm.weight": q + "attention_norm.weight",
            p + "post_attention_layernorm.weight": q + "mlp_norm.weight",
        })
    model.load_state_dict({names[k]: v for k, v in hf_state.items() if k in names}, strict=True)


def worker(args) -> dict:
    """One configuration in this process: build, train a few steps, measure."""
    from scribelm.adapters import LoRAConfig, apply_lora, quantize_base, storage_bytes
    from scribelm.model import Transformer

    torch.manual_seed(0)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    config = scribe_config(args)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    dtype = getattr(torch, args.dtype)
    logits_check = None
    if args.mode in ("peft", "scribe-lora-hf"):
        # Both sides build both models (so both peaks include the same transient), check they agree, keep one.
        hf = hf_model(config).to(dtype)
        with torch.device("meta"):
            scribe = Transformer(config)
        scribe = scribe.to_empty(device="cpu").to(dtype)
        copy_hf_into_scribe(hf, scribe)
        with torch.no_grad():
            ids = torch.randint(0, config.vocab_size, (1, 16))
            logits_check = float((hf(input_ids=ids).logits.float() - scribe(ids).float()).abs().max())
        if args.mode == "peft":
            from peft import LoraConfig, get_peft_model

            del scribe
            model = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"])).to(device)
            forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
        else:
            del hf
            model = scribe
            apply_lora(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets="attention-qv"))
            model = model.to(device)
            forward = model
    else:
        model = Transformer(config).to(dtype)
        if args.mode == "qlora":
            quantize_base(model, "nf4", 64)
        if args.mode in ("lora", "qlora"):
            apply_lora(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets="attention-qv"))
        model = model.to(device)
        forward = model
    model.train()
    # The peak is taken over training only: building the model (e.g. full precision before
    # quantizing, or two models for the peft comparison) is not what is compared.
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    frozen_bytes = storage_bytes(model, frozen_only=True)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(args.steps + args.warmup)]
    times = []
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        logits = forward(batch[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()) - before
    return {
        # the fastest timed step: on a shared machine the others mostly measure the neighbours
        "mode": args.mode, "peak_bytes": peak, "tokens_per_s": args.batch * args.seq / min(times),
        "trainable": sum(p.numel() for p in trainable), "frozen_bytes": frozen_bytes, "final_loss": float(loss),
        "logits_max_diff_vs_hf": logits_check,
    }


def run_mode(mode: str, args) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", mode]
    for key in ("device", "dtype", "d_model", "layers", "heads", "vocab", "seq", "batch", "steps", "warmup", "rank", "threads"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    # A fixed mmap threshold makes glibc hand large freed buffers straight back to the OS, so the
    # resident size follows live memory instead of the allocator's high-water mark.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on a shared machine)")
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    from scribelm.model import Transformer

    config = scribe_config(args)
    with torch.device("meta"):
        n_params = Transformer(config).num_parameters()
    print(f"model: {n_params / 1e6:.1f}M parameters (d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}), "
          f"batch {args.batch} x {args.seq} tokens, {args.dtype} on {args.device}, {args.steps} timed steps, "
          f"LoRA rank {args.rank} on q,v; peak memory of the training steps in MiB, above the process before the model was built")
    print(f"bf16 size of the weights: {mib(2 * n_params).strip()} MiB")
    print()
    print(f"{'method':<22}{'peak MiB':>10}{'x full':>8}{'frozen MiB':>12}{'trainable':>12}{'tokens/s':>10}{'x full':>8}")
    results = {m: run_mode(m, args) for m in ("full", "lora", "qlora")}
    full = results["full"]
    for mode, r in results.items():
        print(f"{mode:<22}{mib(r['peak_bytes']):>10}{r['peak_bytes'] / full['peak_bytes']:>8.2f}{mib(r['frozen_bytes']):>12}"
              f"{r['trainable']:>12,}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / full['tokens_per_s']:>8.2f}")
    q = results["qlora"]
    print(f"QLoRA frozen base: {q['frozen_bytes'] / (2 * n_params):.3f} x its bf16 size")
    if args.skip_peft:
        return
    print()
    print("LoRA on an identical Hugging Face LlamaForCausalLM (random init), q/v, same rank and batches:")
    print(f"{'implementation':<22}{'peak MiB':>10}{'x peft':>8}{'trainable':>12}{'tokens/s':>10}{'x peft':>8}{'loss':>9}")
    pair = {"peft": run_mode("peft", args), "scribelm LoRA": run_mode("scribe-lora-hf", args)}
    base = pair["peft"]
    for name, r in pair.items():
        print(f"{name:<22}{mib(r['peak_bytes']):>10}{r['peak_bytes'] / base['peak_bytes']:>8.2f}{r['trainable']:>12,}"
              f"{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base['tokens_per_s']:>8.2f}{r['final_loss']:>9.4f}")
    print(f"scribelm vs transformers logits on the copied weights: max |difference| "
          f"{pair['scribelm LoRA']['logits_max_diff_vs_hf']:.2e}")


if __name__ == "__main__":
    main()
