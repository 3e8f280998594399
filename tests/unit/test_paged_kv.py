"""Paged KV on the engine: every composition gets the tokens it gets alone while sequences share
cached prefixes, span several blocks and are preempted and recomputed; cached KV never crosses
adapter sets (or adapter versions)."""

from mole_serve.engine.request import SamplingParams
from mole_serve.routing.types import AdapterRef, MergeSpec, Selection

from tests.unit.helpers import add_adapter, engine_for
from tests.unit.test_gate import gate_selection, gated_engine

SYSTEM = list(range(100, 140))  # a shared 40-token head: two full blocks of 16, as a chat template's
PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)


def test_paging_prefix_hits_and_preemption_keep_every_request_exact(gated_engine_parts, tokenizer):
    hf, paths = gated_engine_parts
    three = (AdapterRef("a0"), AdapterRef("a1", 2.0), AdapterRef("a2"))
    cases = [  # (prompt, selection): base twice and a0 twice, so that prefixes are shared
        (SYSTEM + [7, 8, 9], None),
        (SYSTEM + list(range(200, 221)), None),
        (SYSTEM + [10, 11], Selection("mixture", (AdapterRef("a0"),))),
        (SYSTEM + [12] * 30, Selection("mixture", (AdapterRef("a0"),))),
        (SYSTEM + [13, 14, 15], Selection("mixture", three)),
        (SYSTEM + [16], gate_selection("a0", "a1", "a2")),
        (SYSTEM + [17, 18], Selection("merge", three, merge=MergeSpec("ties", density=0.5))),
    ]
    alone = [
        gated_engine(hf, paths, tokenizer, enable_prefix_caching=False)
        .generate([p], PARAMS, selections=[sel])[0]
        .output_ids
        for p, sel in cases
    ]
    # 20 blocks of 16 for 7 sequences of 41-91 tokens (>= 30 blocks in all): preemption is certain
    engine = gated_engine(hf, paths, tokenizer, num_kv_blocks=20, max_prefill_tokens=64)
    first = engine.generate([cases[0][0]], PARAMS, selections=[cases[0][1]])[0]  # caches the shared head
    seqs = [engine.add_request(p, PARAMS, selection=sel) for p, sel in cases[1:]]
    while engine.has_unfinished():
        engine.step()
    assert [first.output_ids] + [s.output_ids for s in seqs] == alone
    stats = engine.scheduler.blocks.stats
    assert stats.preemptions > 0 and stats.hit_tokens >= 32
    assert engine.scheduler.blocks.num_used == 0


def test_a_prefix_cached_under_one_adapter_set_never_serves_another(gated_engine_parts, tokenizer):
    hf, paths = gated_engine_parts
    prompt = SYSTEM + [5, 6]

    def fresh(adapters):
        engine = engine_for(hf, tokenizer)
        for name, p in paths.items():
            add_adapter(engine, name, p)
        return engine.generate([prompt], PARAMS, [adapters])[0].output_ids

    engine = engine_for(hf, tokenizer)
    for name, p in paths.items():
        add_adapter(engine, name, p)
    stats = engine.scheduler.blocks.stats

    def run(adapters) -> tuple[list[int], int]:
        hits = stats.hit_tokens
        return engine.generate([prompt], PARAMS, [adapters])[0].output_ids, stats.hit_tokens - hits

    a0 = (AdapterRef("a0"),)
    assert run(a0) == (fresh(a0), 0)
    assert run(a0) == (fresh(a0), 32)  # the same set: both full blocks of the prompt
    for other in [(AdapterRef("a1"),), (AdapterRef("a0", 0.5),), (), (AdapterRef("a0"), AdapterRef("a1"))]:
        assert run(other) == (fresh(other), 0), other
    add_adapter(engine, "a0", paths["a3"])  # a new version under the same name
    tokens, hits = run(a0)
    assert hits == 0 and tokens == fresh((AdapterRef("a3"),))
