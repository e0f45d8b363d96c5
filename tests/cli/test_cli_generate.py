import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scribelm import LM, Transformer
from scribelm.cli import main
from scribelm.cli.chat import INTERRUPTED, ChatSession
from scribelm.errors import ScribeError
from tests.conftest import tiny_config
from tests.test_generate import as_byte_tokens, scripted_lm

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random") / "model"
    LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size)).eval(), tokenizer).save(path)
    return path


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, tokenizer):
    """Says 'Hi there 你好' (byte by byte) then <|end|> after a one-token prompt."""
    path = tmp_path_factory.mktemp("scripted") / "model"
    script = as_byte_tokens(tokenizer, "Hi there 你好") + [tokenizer.token_to_id("<|end|>")]
    scripted_lm(tokenizer, script).save(path)
    return path


def test_generate_streams_text(random_dir, capsys):
    assert main(["generate", str(random_dir), "It was", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    lm = __import__("scribelm").load(random_dir)
    assert out == lm.generate("It was", max_new_tokens=12, temperature=0) + "\n"


def test_generate_json_with_logprobs_and_stop(scripted_dir, tokenizer, capsys):
    bos = tokenizer.bos_token
    assert main(["generate", str(scripted_dir), "", "--json", "--temperature", "0", "--logprobs", "2",
                 "--stop", "there"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == "Hi " and data["finish_reason"] == "stop" and data["stop_reason"] == "there"
    assert data["prompt_tokens"] == 1 and bos
    assert len(data["token_ids"]) == len("Hi there") == len(data["logprobs"])
    first = data["logprobs"][0]
    assert first["token"] == "H" and first["logprob"] > -0.01 and len(first["top_logprobs"]) == 2
    assert first["top_logprobs"][0]["token_id"] == first["token_id"]


def test_generate_beams_and_show_probs(random_dir, capsys):
    assert main(["generate", str(random_dir), "It was", "--beams", "3", "-n", "2", "--max-new-tokens", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["choices"]) == 2 and data["choices"][0]["score"] >= data["choices"][1]["score"]
    assert main(["generate", str(random_dir), "It was", "--show-probs", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "top candidates" in lines[0]
    assert len([line for line in lines[1:] if line.startswith(" ")]) == 4  # one line per generated token
    assert "text:" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--temperature", "nan"], "temperature is NaN"),
        (["--top-p", "1.5"], "top_p must be in"),
        (["--top-k", "-1"], "top_k must be >= 0"),
    ],
)
def test_generate_bad_flags_are_one_line_errors(random_dir, capsys, flags, message):
    assert main(["generate", str(random_dir), "It was", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_generate_prompt_longer_than_context(random_dir, capsys):
    assert main(["generate", str(random_dir), "It was the best of times " * 40]) == 2
    assert "context" in capsys.readouterr().err
    assert main(["generate", str(random_dir) + "-missing", "x"]) == 2


# ----------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def talker_dir(tmp_path_factory, tokenizer):
    """A model that never stops talking: every position predicts a letter."""
    path = tmp_path_factory.mktemp("talker") / "model"
    scripted_lm(tokenizer, as_byte_tokens(tokenizer, "abcdefgh" * 8)).save(path)
    return path


def test_chat_session_commands_and_interrupt(talker_dir, tmp_path):
    lm = __import__("scribelm").load(talker_dir)
    session = ChatSession(lm, system="be brief", settings={"temperature": 0, "max_new_tokens": 30})
    written = []
    reply = session.respond("x", written.append)
    assert reply == "".join(written) and len(reply) == 30
    assert session.history[-1] == {"role": "assistant", "content": reply}

    # Ctrl-C while the answer streams: the answer stops, the session goes on
    def interrupting_write(delta):
        written.append(delta)
        if len(written) == 3:
            raise KeyboardInterrupt

    written.clear()
    partial = session.respond("again", interrupting_write)
    assert written[-1] == " " + INTERRUPTED
    assert session.history[-1]["content"] == partial == "".join(written[:3])
    assert session.history[-2] == {"role": "user", "content": "again"}
    assert session.command("/system terse") == (True, "system prompt set")
    assert session.messages()[0] == {"role": "system", "content": "terse"}
    keep, message = session.command(f"/save {tmp_path / 'c.json'}")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["messages"] == session.messages() and keep
    assert session.command("/reset") == (True, "conversation cleared")
    assert session.messages() == [{"role": "system", "content": "terse"}]
    with pytest.raises(ScribeError, match="unknown command /frobnicate"):
        session.command("/frobnicate")
    assert session.command("/exit")[0] is False


def test_chat_drops_oldest_turns_to_fit_context(tokenizer):
    torch.manual_seed(0)
    lm = LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=64)).eval(), tokenizer)
    session = ChatSession(lm, system="s", settings={"temperature": 0, "max_new_tokens": 4})
    for i in range(7):
        session.respond(f"message number {i}", lambda d: None)
        assert len(tokenizer.encode_chat(session.messages())) <= 64
    assert session.messages()[0]["role"] == "system"
    assert session.history[-2]["content"] == "message number 6"
    assert not any(m["content"] == "message number 0" for m in session.history)
    with pytest.raises(ScribeError, match="does not fit the model's context"):
        session.respond("long " * 80, lambda d: None)


def test_chat_piped_stdin(talker_dir, tmp_path, monkeypatch, capsys):
    script = "hello\n/system short\n/save " + str(tmp_path / "chat.json") + "\n/reset\nhi\n/nope\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", str(talker_dir), "--temperature", "0", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    saved = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[1]["content"] == "hello"
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0] == saved[2]["content"] and len(lines[0]) == 5 and set(lines[0]) <= set("abcdefgh")
    assert "conversation cleared" in err and "error: unknown command /nope" in err


def test_chat_sigint_stops_answer_not_chat(talker_dir, tmp_path):
    # the talker never stops on its own: with --slide the window moves on forever
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "scribelm.cli", "chat", str(talker_dir), "--temperature", "0",
         "--max-new-tokens", "100000000", "--slide"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.time() + 60
        while len(seen) < 200 and time.time() < deadline:  # wait until the answer is streaming
            if select.select([proc.stdout], [], [], 1)[0]:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert len(seen) >= 200, seen
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(f"/save {tmp_path / 'after.json'}\n".encode())
        proc.stdin.flush()  # communicate() closes stdin: the chat then ends at end of input
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert INTERRUPTED.encode() in seen + rest
    saved = json.loads((tmp_path / "after.json").read_text())["messages"]
    assert saved[0] == {"role": "user", "content": "go"}
    assert saved[1]["role"] == "assistant" and len(saved[1]["content"]) >= 100
    assert set(saved[1]["content"]) <= set("abcdefgh")


def test_generate_reads_prompt_from_stdin(random_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("It was"))
    assert main(["generate", str(random_dir), "-", "--max-new-tokens", "5", "--temperature", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    lm = __import__("scribelm").load(random_dir)
    assert data["text"] == lm.generate("It was", max_new_tokens=5, temperature=0)
    assert data["prompt_tokens"] == len(lm.tokenizer.encode("It was"))


def test_generate_stats_reports_speed(random_dir, capsys):
    assert main(["generate", str(random_dir), "It was", "--max-new-tokens", "6", "--temperature", "0", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "tokens/s" not in captured.out  # the text stays clean for pipes
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("prefill: ") and "; decode: 5 tokens at " in lines[0] and "GB/s of weights" in lines[0]
    assert lines[1] == "6 tokens, finish reason: length"


def test_weight_bytes_per_token_counts_what_a_step_reads():
    from scribelm.inspect.decode_traffic import weight_bytes_per_token
    from scribelm.quant import quantize_model

    tied = Transformer(tiny_config(tie_embeddings=True))
    untied = Transformer(tiny_config(tie_embeddings=False))
    table = tied.token_embedding.weight
    everything = sum(p.numel() * p.element_size() for p in untied.parameters())
    # Untied: the embedding table is read one row at a time, the unembedding in full.
    assert weight_bytes_per_token(untied) == everything - table.numel() * table.element_size()
    # Tied: the one shared table is read in full by the unembedding, and counted once.
    assert weight_bytes_per_token(tied) == sum(p.numel() * p.element_size() for p in tied.parameters())
    # int8 blocks and unembedding: about a quarter of the float bytes.
    quantized = quantize_model(Transformer(tiny_config(tie_embeddings=True)), 8, unembedding=True)
    assert 0.2 < weight_bytes_per_token(quantized) / weight_bytes_per_token(tied) < 0.35


# ----------------------------------------------------------------------------- first use: flags and messages


def _unavailable_devices():
    from scribelm.devices import available_devices

    have = available_devices()
    return ["tpu"] + [d for d in ("cuda", "mps") if d not in have]


@pytest.mark.parametrize("verb", [["generate", "MODEL", "x"], ["chat", "MODEL"],
                                  ["finetune", "lora", "MODEL", "--data", "d.jsonl", "-o", "out"], ["serve", "MODEL"]])
def test_a_device_this_build_lacks_is_one_line_naming_the_devices_it_has(random_dir, capsys, verb):
    for device in _unavailable_devices():
        args = [str(random_dir) if a == "MODEL" else a for a in verb] + ["--device", device]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"'{device}'" in err and "this PyTorch build" in err
        assert "has: cpu" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_library_load_refuses_a_missing_device_and_takes_auto(random_dir):
    from scribelm.devices import DeviceError, available_devices

    with pytest.raises(DeviceError, match="this PyTorch build"):
        __import__("scribelm").load(random_dir, device="tpu")
    lm = __import__("scribelm").load(random_dir, device="auto")
    assert str(lm.device).split(":")[0] == ([d for d in available_devices() if d != "cpu"] or ["cpu"])[0]


def test_help_says_sampling_defaults_come_from_the_model(random_dir, tmp_path, capsys):
    from scribelm.cli import build_parser

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens N most tokens to generate (at least 1); default: the model's generation.json, else 256" \
        in help_text
    assert "--temperature T 0 = greedy, higher = more random; default: the model's generation.json, else 1.0" in help_text
    for verb in (["generate", "m", "p"], ["chat", "m"]):  # unset flags are None, so generation.json wins
        args = build_parser().parse_args(verb)
        assert args.max_new_tokens is None and args.temperature is None and args.top_k is None
    # generation.json's settings apply when no flag is given
    model = tmp_path / "with-defaults"
    shutil.copytree(random_dir, model)
    (model / "generation.json").write_text(json.dumps({"max_new_tokens": 7, "temperature": 0}))
    assert main(["generate", str(model), "It was", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["token_ids"]) == 7 and data["finish_reason"] == "length"
    assert data["text"] == __import__("scribelm").load(random_dir).generate("It was", max_new_tokens=7, temperature=0)


def test_threads_flag_sets_torch_threads(random_dir, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["generate", str(random_dir), "It", "--max-new-tokens", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        capsys.readouterr()
        assert main(["chat", str(random_dir), "--threads", "0"]) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_busy_machine_note_suggests_fewer_threads():
    from scribelm.cli.generate import busy_machine_note

    assert busy_machine_note(0.1, 2, 2) is None  # idle
    assert busy_machine_note(None, 2, 2) is None  # no load average on this system
    assert busy_machine_note(6.0, 16, 8) is None  # busy, but cores to spare
    note = busy_machine_note(1.0, 2, 2)  # one other job on a 2-core machine
    assert note.startswith("note: the machine looks busy (load average 1.0 on 2 cores, 2 threads here)")
    assert note.endswith("try --threads 1")
    assert busy_machine_note(3.0, 2, 1).endswith("expect lower speeds than on an idle machine")


def test_max_new_tokens_zero_is_a_clear_error(random_dir, capsys):
    for verb in (["generate", str(random_dir), "x"], ["chat", str(random_dir)]):
        assert main(verb + ["--max-new-tokens", "0"]) == 2
        assert capsys.readouterr().err == "error: --max-new-tokens must be at least 1, got 0\n"


def test_a_long_prompt_error_names_the_cli_flag(random_dir, capsys):
    assert main(["generate", str(random_dir), "It was the best of times " * 40]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt is ") and "prompt 0" not in err
    assert "--slide" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(random_dir), "It was the best of times " * 40, "--slide", "--max-new-tokens", "2"]) == 0


def test_chat_on_a_base_model_says_it_is_not_chat_tuned(talker_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(talker_dir), "--temperature", "0", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "note: " in err and "was not fine-tuned on conversations" in err
    tuned = tmp_path / "tuned"
    shutil.copytree(talker_dir, tuned)
    (tuned / "generation.json").write_text(json.dumps({"chat_tuned": True}))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(tuned), "--temperature", "0", "--max-new-tokens", "3"]) == 0
    assert "not fine-tuned" not in capsys.readouterr().err


def test_chat_answer_starts_without_blank_lines(tokenizer):
    prompt_length = len(tokenizer.encode_chat([{"role": "user", "content": "x"}]))
    script = as_byte_tokens(tokenizer, "a" * (prompt_length - 1) + "\n\nHi") + [tokenizer.token_to_id("<|end|>")]
    session = ChatSession(scripted_lm(tokenizer, script), settings={"temperature": 0})
    written = []
    assert session.respond("x", written.append) == "Hi"
    assert "".join(written) == "Hi" and session.history[-1]["content"] == "Hi"
