"""The llama.cpp peer's child process: results come back, and a crash is judged —
a skip with its reason only when llama.cpp also crashes on its own control file,
a failure otherwise, never a pass. Real child processes killed by real signals."""

import signal

import numpy as np
import pytest

from tests import llama_peer
from tests.llama_peer import crash, echo, own_file, run


def test_results_come_back_in_order():
    values = run([echo({"a": [1, 2]}), echo(array=[[1.5, -2.0]]), echo("text")])
    assert values[0] == {"a": [1, 2]} and values[2] == "text"
    np.testing.assert_array_equal(values[1], np.array([[1.5, -2.0]], dtype=np.float32))


def test_crash_is_a_skip_with_its_reason_when_llama_cpp_crashes_on_its_own_file():
    with pytest.raises(pytest.skip.Exception) as skipped:
        run([echo(1), crash()], control=[echo(), own_file(crash())])
    reason = str(skipped.value)
    assert "killed by SIGSEGV during job 1" in reason
    assert "also crashes (SIGSEGV)" in reason and "a file it wrote itself" in reason
    assert llama_peer.cpu_flags() in reason  # the CPU it happened on


def test_crash_fails_when_llama_cpp_runs_its_own_file():
    with pytest.raises(pytest.fail.Exception) as failed:
        run([crash(signal.SIGABRT, "GGML_ASSERT(ne % 32 == 0) failed")], control=[echo(), own_file(echo())])
    message = str(failed.value)
    assert "killed by SIGABRT during job 0 (crash): GGML_ASSERT(ne % 32 == 0) failed" in message
    assert "the file's fault" in message


def test_crash_fails_when_the_control_fails_before_llama_cpp_s_own_file():
    # The control's own first step (our F32 source) crashing proves nothing about llama.cpp.
    with pytest.raises(pytest.fail.Exception, match="before reaching llama.cpp's own file"):
        run([crash()], control=[crash(), own_file(echo())])


def test_an_error_in_the_child_fails_with_its_message():
    with pytest.raises(pytest.fail.Exception, match=r"exited with status 1 during job 0 \(unheard-of x\): ValueError: unknown job"):
        run([{"op": "unheard-of", "path": "x", "options": {}}], control=[])


def test_child_result_reports_the_signal_and_the_running_job():
    outcome = llama_peer.run_child([echo(), echo(), crash(signal.SIGBUS)])
    assert outcome.results is None and outcome.signal == signal.SIGBUS and outcome.running == 2


def test_the_control_is_llama_cpp_s_own_file_and_computes_what_its_source_does(tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    jobs = llama_peer.control_jobs("Q8_0", tmp_path)
    assert [job.get("own_file", False) for job in jobs] == [False] * 4 + [True] * 3
    # Where llama.cpp crashes on its own Q8_0 file, this is a skip that says so.
    results = run(jobs)
    types = {tensor.tensor_type.name for tensor in gguf.GGUFReader(jobs[0]["target"]).tensors}
    assert "Q8_0" in types  # quantized by llama.cpp, from the F32 file
    for source, own in zip(results[1:4], results[4:], strict=True):
        assert source.shape == own.shape and source.shape[1] == 512
        assert 1e-6 < np.linalg.norm(own - source) / np.linalg.norm(source) < 0.05
