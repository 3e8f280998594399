"""The evaluation harness's bookkeeping: the mixed eval set and the accuracy table."""

from server.training.evaluate import accuracy_table, eval_set, markdown


def test_eval_set_is_mixed_deterministic_and_scored_fairly():
    items = eval_set(["int_to_roman", "roman_to_int"], per_task=50)
    assert len(items) == 100 and items == eval_set(["int_to_roman", "roman_to_int"], per_task=50)
    assert {i.task for i in items[:20]} == {"int_to_roman", "roman_to_int"}  # shuffled together
    right = [i.answer for i in items]
    half = [i.answer if n % 2 else "wrong" for n, i in enumerate(items)]
    table = accuracy_table(items, {"oracle": right, "base": half})
    assert table["oracle"] == {"int_to_roman": 1.0, "roman_to_int": 1.0, "mean": 1.0}
    assert 0.3 < table["base"]["mean"] < 0.7
    text = markdown(table)
    assert text.splitlines()[0] == "| task | oracle | base |" and "| mean | 100% |" in text
