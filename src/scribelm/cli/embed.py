"""`scribe embed MODEL TEXT...`: one embedding vector per text, as JSON lines.

    scribe embed path/to/all-MiniLM-L6-v2 "a cat" "a dog"        # {"text": ..., "embedding": [...]} per line
    scribe embed my-model - < lines.txt --pooling last           # one text per stdin line
    scribe embed MODEL "a cat" "a dog" "stocks fell" --similarity  # the cosine similarity matrix instead

Pooling follows the model directory's sentence-transformers config when it has one, else
mean for encoders and last-token for decoders (see `scribelm.embed`).
"""

from __future__ import annotations

import json
import sys

from scribelm.cli.common import console
from scribelm.embed import POOLINGS
from scribelm.errors import ScribeError


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="sentence embeddings of texts (encoders such as MiniLM, or any model)")
    p.add_argument("model", help="checkpoint directory, Hugging Face / sentence-transformers directory or store name")
    p.add_argument("texts", nargs="+", help="texts to embed; '-' reads one text per line from stdin")
    p.add_argument("--pooling", choices=POOLINGS, default=None, help="default: the model's sentence config, "
                   "else mean (encoders) or last (decoders)")
    p.add_argument("--no-normalize", action="store_true", help="keep the raw pooled vectors (default: unit length)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--similarity", action="store_true", help="print the cosine similarity matrix of the texts")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=run)


def run(args) -> int:
    import torch.nn.functional as F

    from scribelm.lm import load

    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else list(args.texts)
    if not texts:
        raise ScribeError("no texts to embed")
    lm = load(args.model, device=args.device)
    vectors = lm.embed(texts, pooling=args.pooling, normalize=not args.no_normalize, batch_size=args.batch_size)
    if args.similarity:
        unit = F.normalize(vectors, dim=-1)
        for text, row in zip(texts, (unit @ unit.T).tolist()):
            console.print(" ".join(f"{v:6.3f}" for v in row) + f"  {text[:60]}", markup=False, highlight=False)
        return 0
    for text, vector in zip(texts, vectors.tolist()):
        sys.stdout.write(json.dumps({"text": text, "embedding": vector}, ensure_ascii=False) + "\n")
    return 0
