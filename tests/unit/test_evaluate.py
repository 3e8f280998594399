"""The evaluation harness's bookkeeping: the mixed eval set and the accuracy table."""

from server.training.evaluate import Answer, accuracy_table, eval_set, markdown, top_adapter


def test_eval_set_is_mixed_deterministic_and_scored_fairly():
    tasks = ["int_to_roman", "roman_to_int", "count_vowels"]
    items = eval_set(tasks, per_task=50)
    assert len(items) == 150 and items == eval_set(tasks, per_task=50)
    assert {i.task for i in items[:30]} == set(tasks)  # shuffled together
    library = {"int_to_roman", "roman_to_int"}
    right = [Answer(i.answer, i.task) for i in items]
    half = [Answer(i.answer if n % 2 else "wrong", "int_to_roman") for n, i in enumerate(items)]
    table = accuracy_table(items, {"oracle": right, "select": half}, library)
    assert table["oracle"] == {"int_to_roman": 1.0, "roman_to_int": 1.0, "mean_in_domain": 1.0}
    select = table["select"]
    assert 0.3 < select["mean_in_domain"] < 0.7 and 0.3 < select["mean_out_domain"] < 0.7
    own = sum(i.task == "int_to_roman" for i in items if i.task in library) / 100
    assert select["top1_is_own_adapter"] == own
    text = markdown(table)
    assert text.splitlines()[0] == "| task | oracle | select |" and "| mean_in_domain | 100% |" in text
    assert "| count_vowels | - |" in text  # no oracle for a task without an adapter


def test_top_adapter_prefers_gate_weights_then_scores():
    assert top_adapter([]) is None
    assert top_adapter([{"name": "a", "weight": 0.5, "score": 0.4, "gate_weight": 0.2},
                        {"name": "b", "weight": 0.5, "score": 0.3, "gate_weight": 0.8}]) == "b"
    assert top_adapter([{"name": "a", "weight": 0.3, "score": 0.6}, {"name": "b", "weight": 0.7, "score": 0.5}]) == "a"
