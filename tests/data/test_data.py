import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from scribelm.data import TokenBatchLoader, normalize, prepare, read_manifest, read_split
from scribelm.data.prepare import DataError, check_tokenizer_matches, token_dtype
from scribelm.tokenizer import Tokenizer


def scribe(*args):
    return subprocess.run([sys.executable, "-m", "scribelm.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def inputs(tmp_path):
    """Text with CRLF endings, paragraphs, a duplicate, blank documents; JSONL; Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(
        "First paragraph, line one.\r\nLine two of it.\r\n\r\nSecond paragraph: café 你好.\r\n\r\n\r\n"
        "First paragraph, line one.\r\nLine two of it.\r\n".encode()  # an exact duplicate of the first
    )
    (src / "sub" / "b.md").write_text("  Old Mac classic line endings\rstill one paragraph.  \n\n   \n\nThe last one.\n")
    with open(src / "c.jsonl", "w") as f:
        for text in ["A JSON document.\nWith two lines.", "   ", "Second paragraph: café 你好.", "Another JSON text."]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
    table = pa.table({"body": ["Parquet row one.", "Parquet row two!", None, "Parquet row one."]})
    pq.write_table(table, src / "d.parquet")
    return src


EXPECTED_DOCS = [
    "First paragraph, line one.\nLine two of it.",
    "Second paragraph: café 你好.",
    "Old Mac classic line endings\nstill one paragraph.",
    "The last one.",
    "A JSON document.\nWith two lines.",
    "Another JSON text.",
]


@pytest.fixture(scope="module")
def tok():
    texts = [d for d in EXPECTED_DOCS] + ["Parquet row one.", "Parquet row two!"]
    return Tokenizer.train(texts * 5, vocab_size=300, min_frequency=2)


def decode_split(data_dir, split, tok):
    ids = np.concatenate([np.asarray(a) for a in read_split(data_dir, split)]).tolist() if read_split(data_dir, split) else []
    docs, current = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    assert current == []  # every document ends with EOS
    return docs


def test_shard_round_trip_and_dedup_counts(tmp_path, inputs, tok):
    jsonl_and_text = [inputs / "a.txt", inputs / "sub", inputs / "c.jsonl"]
    manifest = prepare(jsonl_and_text, tmp_path / "data", tok, val_fraction=0.3)
    train, val = decode_split(tmp_path / "data", "train", tok), decode_split(tmp_path / "data", "validation", tok)
    assert train and val
    # Each split keeps input order; together they are exactly the normalized, deduplicated documents.
    assert sorted(train + val) == sorted(EXPECTED_DOCS)
    assert [d for d in EXPECTED_DOCS if d in train] == train
    assert manifest["duplicates_dropped"] == 2  # the repeated paragraph and the JSON copy of a text paragraph
    assert manifest["empty_dropped"] == 1  # the whitespace-only JSON text (blank paragraphs are separators)
    assert manifest["documents"] == len(EXPECTED_DOCS)
    assert manifest["splits"]["train"]["tokens"] == sum(len(tok.encode(d)) + 1 for d in train)
    assert manifest["splits"]["train"]["text_bytes"] == sum(len(d.encode()) for d in train)
    assert manifest["tokenizer_sha256"] and manifest["dtype"] == "uint16"
    assert [s["path"] for s in manifest["sources"]] == [str(inputs / "a.txt"), str(inputs / "sub" / "b.md"), str(inputs / "c.jsonl")]
    assert Tokenizer.load(tmp_path / "data").encode("café") == tok.encode("café")


def test_parquet_column_and_jsonl_field(tmp_path, inputs, tok):
    manifest = prepare([inputs / "d.parquet"], tmp_path / "pq", tok, text_field="body", val_fraction=0.0)
    assert decode_split(tmp_path / "pq", "train", tok) == ["Parquet row one.", "Parquet row two!"]
    assert manifest["duplicates_dropped"] == 1
    with pytest.raises(DataError, match="no 'text' column"):
        prepare([inputs / "d.parquet"], tmp_path / "pq2", tok)
    with pytest.raises(DataError, match="no 'body' field"):
        prepare([inputs / "c.jsonl"], tmp_path / "j", tok, text_field="body")


def test_shards_are_deterministic_and_split_by_size(tmp_path, inputs, tok):
    def digest(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    files = [inputs / "a.txt", inputs / "sub", inputs / "c.jsonl"]
    prepare(files, tmp_path / "one", tok, shard_tokens=16)
    prepare(files, tmp_path / "two", tok, shard_tokens=16)
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    manifest = read_manifest(tmp_path / "one")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] == 16 for s in shards[:-1])


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_loader_resume_and_rank_sharding(tmp_path, tok):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Document number {i} says hello {i * 7}." for i in range(60)))
    prepare([text], tmp_path / "d", tok, val_fraction=0.1)
    loader = TokenBatchLoader(tmp_path / "d", "train", 4, 8, seed=3)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [next(it)["ids"] for _ in range(40)]  # crosses epoch boundaries
    resumed = TokenBatchLoader(tmp_path / "d", "train", 4, 8, seed=3)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert all(torch.equal(next(it2)["ids"], e) for e in expected)
    # Two ranks with 2 rows each read exactly what one process with 4 rows reads.
    whole = iter(TokenBatchLoader(tmp_path / "d", "train", 4, 8, seed=3))
    ranks = [iter(TokenBatchLoader(tmp_path / "d", "train", 2, 8, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(10):
        batch = next(whole)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p["ids"] for p in parts]), batch["ids"])
        assert torch.equal(batch["targets"][:, :-1], batch["ids"][:, 1:])
    with pytest.raises(DataError, match="same batch settings"):
        TokenBatchLoader(tmp_path / "d", "train", 2, 8).load_state_dict(state)


def test_tokenizer_and_vocab_mismatch(tmp_path, inputs, tok):
    prepare([inputs / "a.txt"], tmp_path / "d", tok)
    manifest = read_manifest(tmp_path / "d")
    other = Tokenizer.train(["completely different text"] * 10, vocab_size=280)
    with pytest.raises(DataError, match="not the one"):
        check_tokenizer_matches(manifest, other, data_dir=tmp_path / "d")
    with pytest.raises(DataError, match="vocabulary of 300 tokens but the model has vocab_size 256"):
        check_tokenizer_matches(manifest, model_vocab_size=256, data_dir=tmp_path / "d")


def _put(path, data):
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "input not found"),
        (lambda d: _put(d / "empty.txt", ""), "input file is empty"),
        (lambda d: _put(d / "img.txt", b"\x89PNG\r\n\x00\x00" * 50).parent, "img.txt looks binary"),  # a directory holding it
        (lambda d: _put(d / "bad.jsonl", '{"text": "ok"}\n{broken\n'), "bad.jsonl:2 is not valid JSON"),
        (lambda d: _put(d / "latin1.txt", "caf\xe9 au lait, na\xefve".encode("latin-1") * 10), "not UTF-8"),
    ],
)
def test_bad_input_is_one_line_and_keeps_existing_output(tmp_path, tok, make, message):
    good = tmp_path / "good.txt"
    good.write_text("Some text.\n\nMore text here.\n\nAnd a third paragraph.")
    tok.save(tmp_path / "tok")
    prepare([good], tmp_path / "out", tok)  # an earlier, good run
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    inputs_dir = tmp_path / "in"
    inputs_dir.mkdir()
    (inputs_dir / "fine.txt").write_text("A fine text file.")
    bad = make(inputs_dir)
    result = scribe("prepare", good, bad, "-o", tmp_path / "out", "--tokenizer", tmp_path / "tok", "--force")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # nothing saved is lost
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp dirs left


def test_prepare_cli_trains_tokenizer_and_reports(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["The cat sat on the mat."] * 3 + [f"Line {i} of a small corpus." for i in range(30)]))
    result = scribe("prepare", text, "-o", tmp_path / "d", "--vocab-size", 300)
    assert result.returncode == 0, result.stderr
    assert "2 duplicates" in result.stdout and "bytes/token" in result.stdout
    manifest = read_manifest(tmp_path / "d")
    assert 256 < manifest["vocab_size"] <= 300 and manifest["duplicates_dropped"] == 2


def test_normalize():
    assert normalize("  a\r\nb\rc\n\n") == "a\nb\nc"


# ----------------------------------------------------------------------------- the output never costs the user a file


def _paragraphs(n, tag):
    return "\n\n".join(f"Paragraph {i} of the {tag} text, with a few words in it." for i in range(n)) + "\n"


@pytest.fixture
def corpus_dir(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("one.txt", "two.txt"):
        (corpus / name).write_text(_paragraphs(30, name))
    return corpus


def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_into_its_own_input_is_refused_and_deletes_nothing(corpus_dir):
    before = _snapshot(corpus_dir)
    for target in (corpus_dir, corpus_dir / "data"):
        result = scribe("prepare", corpus_dir, "-o", target, "--vocab-size", 300, "--force")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "input" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = scribe("prepare", corpus_dir / "one.txt", "-o", corpus_dir, "--vocab-size", 300, "--force")
    assert result.returncode == 2 and "contains the input" in result.stderr
    assert _snapshot(corpus_dir) == before
    assert sorted(p.name for p in corpus_dir.parent.iterdir()) == ["corpus"]


def test_prepare_never_replaces_a_directory_holding_a_users_files(tmp_path, corpus_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("\\documentclass{article} my thesis")
    for force in ([], ["--force"]):
        result = scribe("prepare", corpus_dir, "-o", work, "--vocab-size", 300, *force)
        assert result.returncode == 2 and "thesis.tex" in result.stderr and "not written by scribelm" in result.stderr
    assert [p.name for p in work.iterdir()] == ["thesis.tex"]
    assert (work / "thesis.tex").read_text() == "\\documentclass{article} my thesis"


def test_prepare_replaces_its_own_output_only_with_force(tmp_path, corpus_dir, tok):
    out = tmp_path / "data"
    prepare([corpus_dir / "one.txt"], out, tok)
    assert json.loads((out / ".scribelm-output.json").read_text())["kind"] == "shards"
    first = _snapshot(out)
    tok.save(tmp_path / "tok")
    result = scribe("prepare", corpus_dir, "-o", out, "--tokenizer", tmp_path / "tok")
    assert result.returncode == 2 and "--force" in result.stderr
    assert _snapshot(out) == first
    (out / "notes.txt").write_text("mine")  # a user's file in scribelm's directory: now it is not all ours
    result = scribe("prepare", corpus_dir, "-o", out, "--tokenizer", tmp_path / "tok", "--force")
    assert result.returncode == 2 and "notes.txt" in result.stderr
    (out / "notes.txt").unlink()
    result = scribe("prepare", corpus_dir, "-o", out, "--tokenizer", tmp_path / "tok", "--force")
    assert result.returncode == 0, result.stderr
    assert read_manifest(out)["documents"] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data", "tok"]  # no temporaries


def test_a_nul_byte_far_into_a_file_is_found_with_its_line(tmp_path, tok):
    text = tmp_path / "long.txt"
    text.write_bytes(b"clean line of text\n" * 10_000 + b"a NUL \x00 here\n")  # about 190 KB before it
    with pytest.raises(DataError, match=r"looks binary \(a NUL byte on line 10001\)"):
        prepare([text], tmp_path / "out", tok)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_names_the_right_line(tmp_path, tok):
    text = tmp_path / "mixed.txt"
    lines = ["ordinary text, café\n"] * 70_000  # over 1 MiB: the bad byte is in a later chunk than the start
    lines[65_432] = "caf\xe9 in latin-1\n"
    text.write_bytes(b"".join(line.encode("latin-1" if i == 65_432 else "utf-8") for i, line in enumerate(lines)))
    with pytest.raises(DataError, match=r"not UTF-8 text \(a bad byte on line 65433\)"):
        prepare([text], tmp_path / "out", tok)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "lone \\ud800 surrogate"}', r"bad.jsonl:2: field 'text' holds an unpaired surrogate (\ud800)"),
        ('{"text": "ok", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", "bad.jsonl:2 is nested too deeply"),
        ('{"text": "a NUL \\u0000 escaped"}', r"bad.jsonl:2: field 'text' holds a NUL character"),
    ],
    ids=["lone-surrogate", "deep-nesting", "nul-escape"],
)
def test_jsonl_that_is_not_text_is_one_line_naming_the_line(tmp_path, tok, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first record"}\n' + line + "\n")
    tok.save(tmp_path / "tok")
    for tokenizer in (["--tokenizer", tmp_path / "tok"], ["--vocab-size", 300]):
        result = scribe("prepare", bad, "-o", tmp_path / "out", *tokenizer)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _can_mount_tmpfs():
    import shutil as sh

    if sh.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -Urm` to mount a small tmpfs")
def test_disk_full_is_one_line_keeps_the_previous_output_and_leaves_no_temporaries(tmp_path, tok):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(_paragraphs(20, "small"))
    large.write_text(_paragraphs(5000, "large"))
    tok.save(tmp_path / "tok")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "data"
    cli = f"{sys.executable} -m scribelm.cli prepare --tokenizer {tmp_path / 'tok'} -o {out}"
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} && {cli} {small} >/dev/null && "
        f"cp -a {out} {tmp_path / 'first'} && {cli} {large} --force; echo rc=$?; ls -A {disk}; "
        f"diff -r {out} {tmp_path / 'first'} && echo same"
    )
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True)
    assert "error: disk full while writing" in result.stderr and "Traceback" not in result.stderr
    assert f"the previous {out} is unchanged" in result.stderr
    assert result.stdout.split() == ["rc=2", "data", "same"]  # no temporaries beside it; the old shards intact
