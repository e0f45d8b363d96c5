"""Task files beyond the parity cases: groups, includes, csv and text data, descriptions,
fractional limits, few-shot draws that never show a document its own answer."""

from scribelm.evaluate import load_tasks
from tests.evaluate.taskdata import write_parity_tasks, write_yaml


def test_group_files_and_includes(tmp_path):
    tasks = write_parity_tasks(tmp_path / "tasks")
    write_yaml(tasks / "capitals_group.yaml", "group: capitals\ntask: [capitals_mc0, capitals_ll]\n")
    write_yaml(tasks / "variant.yaml", "include: capitals_mc2.yaml\ntask: capitals_variant\nnum_fewshot: 0\n")
    assert [t.name for t in load_tasks(["capitals"], [tasks])] == ["capitals_mc0", "capitals_ll"]
    (variant,) = load_tasks(["capitals_variant"], [tasks])
    assert variant.output_type == "multiple_choice" and variant.requests()[0].context == "The capital of France is"


def test_csv_and_text_data_descriptions_and_limits(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer,label\nTwo plus two?,four,1\nThe sky?,blue,0\nFire?,hot,1\n")
    write_yaml(tmp_path / "qa.yaml", """task: qa
dataset_path: csv
dataset_kwargs: {data_files: {test: qa.csv}}
test_split: test
fewshot_split: test
output_type: multiple_choice
description: "Answer yes or no.\\n\\n"
doc_to_text: "{{question}} ({{answer}})"
doc_to_choice: ["no", "yes"]
doc_to_target: label
""")
    (task,) = load_tasks([str(tmp_path / "qa.yaml")])
    requests = task.requests(num_fewshot=2)
    assert requests[0].context.startswith("Answer yes or no.\n\n") and requests[0].context.endswith("Two plus two? (four)")
    for r, doc in zip(requests, task.docs):  # examples come from the other documents
        own = f"{doc.fields['question']} ({doc.fields['answer']})"
        assert r.context.count(own) == 1 and r.target == doc.fields["label"]
    assert len(task.requests(limit=0.5)) == 1 and len(task.requests(limit=2)) == 2

    (tmp_path / "lines.txt").write_text("first line of text\nsecond line\n")
    write_yaml(tmp_path / "lines.yaml", """task: lines
dataset_path: text
dataset_kwargs: {data_files: lines.txt}
validation_split: train
output_type: loglikelihood_rolling
doc_to_target: text
""")
    (lines,) = load_tasks([str(tmp_path / "lines.yaml")])
    assert [r.text for r in lines.requests()] == ["first line of text", "second line"]


def test_json_array_data_and_field_lists(tmp_path):
    import json

    (tmp_path / "data.json").write_text(json.dumps([{"q": "a?", "golds": ["x", "y"]}, {"q": "b?", "golds": ["z"]}]))
    write_yaml(tmp_path / "gen.yaml", """task: gen
dataset_path: json
dataset_kwargs: {data_files: {test: data.json}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{q}}\\nA:"
doc_to_target: golds
metric_list: [{metric: squad_f1}, {metric: exact_match, ignore_case: true}]
""")
    (task,) = load_tasks([str(tmp_path / "gen.yaml")])
    first = task.requests()[0]
    assert first.target == ["x", "y"] and first.generation_kwargs["until"] == ["\n\n"]
    assert task.metrics == [("squad_f1", {}), ("exact_match", {"ignore_case": True})]
