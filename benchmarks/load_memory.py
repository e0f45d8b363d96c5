"""Peak resident memory of loading a model, against its weights' size, beside `transformers`.

A ~500 MB model (fp32) is made here, written as a Hugging Face directory, and
loaded in a fresh subprocess by `scribelm.load` and by
`transformers.AutoModelForCausalLM.from_pretrained`. Each child reports its
resident memory after imports (baseline), its peak after loading, and its
peak after one forward pass (which touches every weight). The ratio that
matters is (peak - baseline) / weights: how many copies of the weights
loading needs. safetensors maps the file, so scribelm's should be about 1
after the forward pass (pages are read in as they are used); about 70 MB of
the load step is a one-off import of torch's meta-device kernels, not weights.

    python benchmarks/load_memory.py                  # Llama-shaped and GPT-2 (124M) models
    python benchmarks/load_memory.py --family llama   # one of them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import torch
torch.set_num_threads(2)
loader, path = sys.argv[1], sys.argv[2]
if loader == "scribelm":
    import scribelm
    load = lambda: scribelm.load(path).model
else:
    import transformers
    transformers.logging.set_verbosity_error()
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path).eval()
base = status("VmRSS")
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
after_load = status("VmHWM")
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
after_forward = status("VmHWM")
print(json.dumps({"base": base, "load_peak": after_load, "forward_peak": after_forward, "seconds": seconds}))
"""

FAMILIES = {
    # ~122M parameters: 490 MB in fp32
    "llama": dict(vocab_size=32000, context_length=2048, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=4, d_mlp=2816,
                  activation="swiglu", norm="rmsnorm", norm_bias=False, position="rope", qkv_bias=False,
                  attn_out_bias=False, mlp_bias=False, tie_embeddings=True, name="llama"),
    "gpt2": "gpt2-124m",  # 124M parameters: 498 MB in fp32 (GPT-2's fused, transposed Conv1D weights)
}


def make_model(family: str, out: Path) -> int:
    import torch

    import scribelm
    from scribelm.config import ModelConfig

    spec = FAMILIES[family]
    config = ModelConfig.from_preset(spec) if isinstance(spec, str) else ModelConfig(**spec)
    torch.manual_seed(0)
    model = scribelm.Transformer(config).eval()
    scribelm.LM(model=model, tokenizer=None).save(out, format="hf")
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def measure(loader: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, loader, str(path)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default="both")
    args = parser.parse_args()
    families = list(FAMILIES) if args.family == "both" else [args.family]
    mb = 2**20
    print(f"{'model':<8} {'loader':<13} {'weights':>9} {'baseline':>9} {'load peak':>10} {'+forward':>9} "
          f"{'load/weights':>13} {'+fwd/weights':>13} {'total/weights':>14} {'load s':>7}")
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / family
            weights = make_model(family, path)
            rows = {}
            for loader in ("scribelm", "transformers"):
                r = measure(loader, path)
                rows[loader] = r
                load_ratio = (r["load_peak"] - r["base"]) / weights
                forward_ratio = (r["forward_peak"] - r["base"]) / weights
                print(f"{family:<8} {loader:<13} {weights / mb:>7.0f}MB {r['base'] / mb:>7.0f}MB {r['load_peak'] / mb:>8.0f}MB "
                      f"{r['forward_peak'] / mb:>7.0f}MB {load_ratio:>13.2f} {forward_ratio:>13.2f} "
                      f"{r['forward_peak'] / weights:>14.2f} {r['seconds']:>7.2f}")
            ours, peer = rows["scribelm"], rows["transformers"]
            ratio = (ours["forward_peak"] - ours["base"]) / max(peer["forward_peak"] - peer["base"], 1)
            print(f"{family:<8} scribelm/transformers peak memory above baseline (load + forward): {ratio:.2f}x")


if __name__ == "__main__":
    main()
