"""Fixtures the training tests share."""

import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer, corpus):
    from scribelm.data import prepare

    root = tmp_path_factory.mktemp("data")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(f"{i}. {line}" for i, line in enumerate(corpus)))
    prepare([text], root / "shards", tokenizer, val_fraction=0.1)
    return root / "shards"
