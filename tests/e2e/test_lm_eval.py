"""lm-eval-harness's `local-completions` model runs a loglikelihood (multiple-choice) task against
the real server on a shipped adapter, and its per-choice loglikelihoods equal what transformers
with PEFT computes for the same adapter and the same token split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.e2e.conftest import API_KEY, REPO

ADAPTER = "roman_to_int"
DOCS = [
    ("Convert the Roman numeral XIV to an integer.", [" 14", " 41", " 16"], 0),
    ("What number is the Roman numeral IX?", [" 11", " 9"], 1),
    ("Roman numeral XL as a number:", [" 60", " 40", " 4"], 1),
]


def write_task(folder) -> None:
    with open(folder / "data.jsonl", "w") as f:
        for question, choices, answer in DOCS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (folder / "mole_tiny.yaml").write_text(
        "task: mole_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )


def peft_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)  # lm-eval's split
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_lm_eval_loglikelihood_task_matches_transformers(server, base_model_path, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    write_task(tmp_path)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        f"model={ADAPTER},base_url={server}/v1/completions,tokenizer={base_model_path},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
        "--tasks",
        "mole_tiny",
        "--include_path",
        str(tmp_path),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    run = subprocess.run(
        args,
        env={**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32), REPO / "adapters_store" / ADAPTER
    ).eval()
    samples = [json.loads(line) for path in out.rglob("samples_mole_tiny*.jsonl") for line in path.open()]
    assert len(samples) == len(DOCS)
    for sample in samples:
        question, choices, _ = DOCS[sample["doc_id"]]
        served = [float(r[0]) for r in sample["filtered_resps"]]
        expected = [peft_loglikelihood(model, tokenizer, question, c) for c in choices]
        assert served == pytest.approx(expected, abs=2e-3), (question, served, expected)
