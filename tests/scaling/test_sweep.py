"""A micro sweep end to end: plan, train, record, resume, fit, plot; and the inputs it refuses."""

import json
from pathlib import Path

import pytest
import yaml

from scribelm.cli import main
from scribelm.errors import ConfigError
from scribelm.scaling.analysis import analyze
from scribelm.scaling.sweep import load_sweep_config, plan_sweep, read_records, run_sweep

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sweep-micro.yaml"


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory, tokenizer, corpus):
    from scribelm.data import prepare

    root = tmp_path_factory.mktemp("sweep-data")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(f"{i}. {line}" for i, line in enumerate(corpus)))
    prepare([text], root / "shards", tokenizer, val_fraction=0.1)
    return root / "shards"


def micro_recipe(data_dir, out_dir, **changes):
    recipe = load_sweep_config(RECIPE)
    recipe["data"]["dir"] = str(data_dir)
    recipe["out_dir"] = str(out_dir)
    recipe.update(changes)
    return recipe


def test_plan_counts_tokens_from_the_budget_and_parameters_by_the_convention(micro_data, tmp_path):
    plan = plan_sweep(micro_recipe(micro_data, tmp_path / "sweep"))
    assert len(plan.runs) == 4
    for run in plan.runs:
        assert run.tokens == run.steps * 4 * 32
        assert run.flops <= run.budget < run.flops + run.flops_per_token * 4 * 32  # whole batches, within one of the budget
        assert run.N_non_embedding < run.N_total
        assert run.N > run.N_non_embedding  # the tied output layer is counted in N
    small, large = sorted({r.N for r in plan.runs})
    assert large > small
    # A shape that gets no whole batch at a budget is left out of that budget, and named.
    plan = plan_sweep(micro_recipe(micro_data, tmp_path / "sweep", budgets=[1e7, 2e8]))
    assert len(plan.runs) == 3 and len(plan.left_out) == 1 and plan.left_out[0].startswith("d1-w32 at 1e+07 FLOPs")
    with pytest.raises(ConfigError, match="numbers of training FLOPs"):
        plan_sweep(micro_recipe(micro_data, tmp_path / "sweep", budgets=["lots"]))


def test_micro_sweep_records_plots_and_resumes_without_retraining(micro_data, tmp_path, one_thread):
    out = tmp_path / "sweep"
    plan = plan_sweep(micro_recipe(micro_data, out))
    events = []

    def stop_after_two(event, info):
        events.append((event, info.get("run")))
        if event == "run_end" and sum(e == "run_end" for e, _ in events) == 2:
            raise KeyboardInterrupt  # the sweep is stopped between runs

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, progress=stop_after_two)
    first = {r["run"]: r for r in read_records(out)}
    assert len(first) == 2

    events.clear()
    records = run_sweep(plan, progress=lambda event, info: events.append((event, info.get("run"))))
    started = [run for event, run in events if event == "run_start"]
    assert sorted(e for e, run in events if e == "skip") == ["skip", "skip"]
    assert len(started) == 2 and not set(started) & set(first)
    assert len(records) == 4
    for name, record in first.items():  # finished runs were not trained again
        assert {r["run"]: r for r in records}[name] == record
    lines = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert line["D"] == line["steps"] * 4 * 32
        assert line["C"] == pytest.approx(line["D"] * line["flops_per_token"])
        assert line["val_loss"] > 0 and line["val_bpb"] > 0
        assert {"N", "N_total", "N_non_embedding", "budget", "wall_seconds"} <= set(line)  # recorded, not judged

    # A run that finished training but was not recorded is evaluated from its checkpoint, not retrained.
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    events.clear()
    again = run_sweep(plan, progress=lambda event, info: events.append((event, info)))
    finished = [info for event, info in events if event == "run_end"]
    assert len(finished) == 1 and finished[0]["resumed_from"] is not None
    assert finished[0]["steps"] == lines[3]["steps"]
    assert finished[0]["val_loss"] == pytest.approx(lines[3]["val_loss"], rel=1e-6)
    assert len(again) == 4


def test_cli_runs_the_sweep_writes_plots_and_answers_from_the_records(micro_data, tmp_path, capsys, one_thread):
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(micro_recipe(micro_data, out)))
    assert main(["sweep", "--config", str(config), "--bootstrap", "5"]) == 0
    text = capsys.readouterr().out
    assert "IsoFLOP" in text or "3 or more model sizes" in text
    assert "5 constants" in text  # four runs cannot determine five constants: said, not crashed
    for name in ("loss_vs_compute.png", "isoflop.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    fit = json.loads((out / "fit.json").read_text())
    assert fit["runs"] == 4 and fit["convention"].startswith("N = parameters in matrix multiplies")
    assert main(["sweep", "--config", str(config), "--predict", "1e5", "1e6"]) == 2  # no law from four points
    assert "5 constants" in capsys.readouterr().err


def test_a_fitted_sweep_draws_every_plot(tmp_path):
    from scribelm.scaling.analysis import write_analysis
    from scribelm.scaling.fit import BESIROGLU_2024, chinchilla_loss

    records = []
    for budget in (1e12, 1e13, 1e14):
        for n in (2e4, 6e4, 2e5, 6e5):
            d = budget / (6 * n)
            records.append({"run": f"n{n:.0e}-C{budget:.0e}", "N": n, "D": d, "C": budget, "budget": budget,
                            "val_loss": float(chinchilla_loss(n, d, **BESIROGLU_2024))})
    analysis = analyze(records, bootstrap=3)
    assert analysis.chinchilla is not None and analysis.isoflop is not None and not analysis.problems
    paths = write_analysis(analysis, tmp_path)
    assert {p.name for p in paths} == {"fit.json", "loss_vs_compute.png", "isoflop.png", "contours.png",
                                       "predicted_vs_measured.png"}


def test_bad_sweeps_are_refused_up_front(micro_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="too small for even the smallest shape"):
        plan_sweep(micro_recipe(micro_data, tmp_path / "a", budgets=[1e3, 2e8]))
    huge = {"depths": [96], "widths": [65536], "head_dim": 128}
    with pytest.raises(ConfigError, match=r"needs about [\d.]+ GiB"):
        plan_sweep(micro_recipe(micro_data, tmp_path / "b", shapes=huge))
    with pytest.raises(ConfigError, match="max_steps cannot be set"):
        plan_sweep(micro_recipe(micro_data, tmp_path / "c", train={"max_steps": 10}))
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(micro_recipe(micro_data, tmp_path / "d", budgets=[10.0])))
    assert main(["sweep", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: budget 10 FLOPs is too small") and err.count("\n") == 1
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_parallel_runs_record_what_one_at_a_time_records(micro_data, tmp_path, one_thread):
    shapes = {"list": [[1, 16]], "head_dim": 16, "mlp_ratio": 2}
    one = run_sweep(plan_sweep(micro_recipe(micro_data, tmp_path / "one", shapes=shapes)))
    two = run_sweep(plan_sweep(micro_recipe(micro_data, tmp_path / "two", shapes=shapes), parallel=2))
    assert [r["run"] for r in one] == [r["run"] for r in two] and len(two) == 2
    for a, b in zip(one, two):
        assert (a["steps"], a["D"]) == (b["steps"], b["D"])
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    assert len(read_records(tmp_path / "two")) == 2


def test_predict_and_optimal_answer_from_recorded_runs(tmp_path, capsys):
    from scribelm.scaling.fit import BESIROGLU_2024, chinchilla_loss

    out = tmp_path / "sweep"
    out.mkdir()
    lines = []
    for budget in (1e12, 1e13, 1e14):
        for n in (2e4, 6e4, 2e5, 6e5):
            d = budget / (6 * n)
            lines.append({"run": f"n{n:.0e}-C{budget:.0e}", "N": n, "D": d, "C": budget, "budget": budget,
                          "val_loss": float(chinchilla_loss(n, d, **BESIROGLU_2024))})
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"data": {"dir": "unused"}, "shapes": {"list": [[1, 16]]}, "budgets": [1e12],
                                      "out_dir": str(out)}))
    assert main(["sweep", "--config", str(config), "--predict", "1e5", "1e7", "--optimal", "1e15", "--bootstrap", "5"]) == 0
    text = capsys.readouterr().out
    expected = float(chinchilla_loss(1e5, 1e7, **BESIROGLU_2024))
    import re

    predicted = float(re.search(r"predicted loss for N = 100.00K, D = 10.00M: ([\d.]+)", text).group(1))
    assert predicted == pytest.approx(expected, rel=2e-3)  # noise-free records: the fit is the law itself
    assert "compute-optimal at 1e+15 FLOPs (C = 6ND)" in text and "tokens per parameter" in text
    assert main(["sweep", "--config", str(config), "--optimal", "-1"]) == 2
