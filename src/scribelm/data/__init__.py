"""Data: corpora in, token shards and batches out; chat and preference datasets for fine-tuning.

    from scribelm.data import prepare, TokenBatchLoader
    manifest = prepare(["corpus/"], "data/my-corpus", tokenizer)       # shards + manifest.json
    train = TokenBatchLoader("data/my-corpus", "train", batch_size=16, sequence_length=256)
"""

from scribelm.data.corpora import kjv_chapters, write_kjv_text
from scribelm.data.loader import TokenBatchLoader, TokenStream
from scribelm.data.prepare import check_tokenizer_matches, prepare, read_manifest, read_split, train_tokenizer_on
from scribelm.data.sources import DataError, find_input_files, normalize

__all__ = [
    "DataError", "TokenBatchLoader", "TokenStream", "check_tokenizer_matches", "find_input_files", "kjv_chapters",
    "normalize", "prepare", "read_manifest", "read_split", "train_tokenizer_on", "write_kjv_text",
]
