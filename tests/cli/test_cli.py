import subprocess
import sys

import pytest


def scribe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scribelm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    "args, message",
    [
        (["params", "gpt5"], "neither a preset"),
        (["tokenizer", "encode", "/nonexistent", "hi"], "no tokenizer found"),
        (["tokenizer", "train", "/nonexistent.txt", "-o", "/tmp/x"], "training input not found: /nonexistent.txt"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message):
    result = scribe(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_binary_training_file_refused(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\x00\x01\x02" * 100)
    result = scribe("tokenizer", "train", f, "-o", tmp_path / "tok")
    assert result.returncode == 2 and "looks binary" in result.stderr


def test_not_json_tokenizer(tmp_path):
    f = tmp_path / "tokenizer.json"
    f.write_text("garbage")
    result = scribe("tokenizer", "encode", f, "hello")
    assert result.returncode == 2 and "not a valid JSON tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_tokenizer_train_and_encode(tmp_path, corpus):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(corpus))
    result = scribe("tokenizer", "train", f, "--vocab-size", 320, "-o", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    result = scribe("tokenizer", "encode", tmp_path / "tok", "the earth 🎉")
    assert result.returncode == 0
    assert " tokens, 14 bytes" in result.stdout and "<0xF0>" in result.stdout
    result = scribe("tokenizer", "encode", tmp_path / "tok", "héllo", "--json")
    import json

    data = json.loads(result.stdout)
    result = scribe("tokenizer", "decode", tmp_path / "tok", *data["ids"])
    assert result.stdout.strip() == "héllo"


def test_help_lists_verbs():
    result = scribe("--help")
    assert result.returncode == 0 and "params" in result.stdout and "tokenizer" in result.stdout


def test_tokenizer_train_reads_folders_as_prepare_does(tmp_path, corpus):
    import json

    from scribelm.cli import main
    from scribelm.data.prepare import find_input_files
    from scribelm.tokenizer import Tokenizer

    folder = tmp_path / "corpus"
    (folder / "part").mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(corpus[:50]))
    (folder / "part" / "b.md").write_text("\n".join(corpus[50:]))
    (folder / ".hidden.txt").write_text("never read " * 50)
    assert main(["tokenizer", "train", str(folder), "--vocab-size", "320", "-o", str(tmp_path / "tok")]) == 0
    assert [p.name for p in find_input_files([folder])] == ["a.txt", "b.md"]
    from_files = Tokenizer.train([folder / "a.txt", folder / "part" / "b.md"], 320)
    assert Tokenizer.load(tmp_path / "tok").encode(corpus[0]) == from_files.encode(corpus[0])
    # the library takes folders too, and JSONL files give their text field (not the JSON around it)
    assert Tokenizer.train([folder], 320).encode(corpus[1]) == from_files.encode(corpus[1])
    jsonl = tmp_path / "docs" / "d.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(corpus)))
    tok = Tokenizer.train([jsonl.parent], 320)
    assert tok.backend.get_vocab() == Tokenizer.train(list(dict.fromkeys(corpus)), 320).backend.get_vocab()  # the documents
    # an empty folder or a binary file inside one: one line, before any training
    (tmp_path / "empty").mkdir()
    result = scribe("tokenizer", "train", tmp_path / "empty", "-o", tmp_path / "x")
    assert result.returncode == 2 and "holds no files" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    (folder / "blob.txt").write_bytes(b"\x00\x01" * 50)
    result = scribe("tokenizer", "train", folder, "-o", tmp_path / "x")
    assert result.returncode == 2 and "looks binary" in result.stderr and "Traceback" not in result.stderr
