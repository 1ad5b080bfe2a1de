"""Tensor parallelism on the CPU: 2 processes (gloo) each run half the heads of a small random Llama sharded by
``sparsify.distributed.tensor_parallel``, and ``sparsify.compile`` on it gives the logits of one process running the
whole model under the same policy. Policies name the model's heads; each rank maps them to its own."""

import datetime
import os
import time

import pytest
import torch
from conftest import rank_results, run_ranks, tiny_model

import sparsify
from sparsify.distributed import HeadSplit
from sparsify.errors import PolicyError, ShapeError
from sparsify.policy import IndexRanges, Policy

RANKS = 2
PROMPT = 256  # sink 16 + window 32 leave most key blocks out, and delta's exact tail (128 rows) is half the rows
SINK_WINDOW = {"use": "sink_window", "with": {"sink": 16, "window": 32}}
POLICIES = {
    "dense": "dense",
    "sink_window": {"rules": [{"when": {"phase": "prefill"}, **SINK_WINDOW}]},
    "delta": {"rules": [{"when": {"phase": "prefill"}, "use": "delta", "with": {"gamma": 16, "base": SINK_WINDOW}}]},
    # The model's query heads 2-3 (rank 1's local 0-1) sparse, the rest dense.
    "heads": {"rules": [{"when": {"phase": "prefill", "heads": "2-3"}, **SINK_WINDOW}]},
}
# generate(): decode too; ResA's sequence state, kept with the cache and sized by the rank's own KV heads; a static
# cache, which transformers initialises before the first forward. Each case: (method that must run, policy, kwargs).
GENERATE_CASES = {
    "sink_window": ("sink_window", POLICIES["sink_window"], {}),
    "resa": ("resa", "resa", {}),
    "sink_window, static cache": ("sink_window", POLICIES["sink_window"], {"cache_implementation": "static"}),
    # Its set is unified over all the model's heads: each rank gathers the other's rankings (64 of 256 tokens).
    "lessismore": ("lessismore", {"rules": [{"when": {"phase": "decode"}, "use": "lessismore",
                                             "with": {"budget": 64, "dense_layers": [], "selection_layers": [0]}}]},
                   {}),
}
NEW_TOKENS = 6
TIMEOUT_S = 240  # a hung collective fails the test instead of stalling the suite


def prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def _ceilings_of_a_fresh_gpu(rank: int, out_dir: str) -> dict:
    """load_ceilings on a GPU (faked: its name and a calibration that takes a second) with no cache yet: what this
    rank got and how often it calibrated."""
    import sparsify.passes.cost_model as cost_model

    calibrations = []

    def calibrate(device, head_dim):
        calibrations.append(head_dim)
        time.sleep(1.0)  # rank 1 reaches the cache while rank 0 is still calibrating
        return cost_model.DeviceCeilings("Some GPU", 500.0 + rank, 400.0, 0.01, rates={head_dim: (500.0 + rank,
                                                                                                   400.0)})

    os.environ["SPARSIFY_CACHE"] = os.path.join(out_dir, "cache")
    cost_model.calibrate = calibrate
    torch.cuda.get_device_name = lambda device=None: "Some GPU"
    ceilings = cost_model.load_ceilings(torch.device("cuda"), 128)
    return {"rates": ceilings.rates_for(128), "calibrations": calibrations}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: shard the model, compile it with every policy, save what each call gave (or the error)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from sparsify.distributed import tensor_parallel

    torch.set_num_threads(1)  # two processes on a machine shared with others
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    with rank_results(rank, out_dir) as results:
        results["ceilings"] = _ceilings_of_a_fresh_gpu(rank, out_dir)
        mesh = init_device_mesh("cpu", (RANKS,))
        model = tensor_parallel(tiny_model("llama", layers=2), mesh)
        with torch.no_grad():
            results["eager llama"] = model(prompt()).logits
            results["eager qwen2"] = tensor_parallel(tiny_model("qwen2", layers=2), mesh)(prompt()).logits
        for name, policy in POLICIES.items():
            torch._dynamo.reset()
            fast = sparsify.compile(model, policy, cost_model_fallback=False)
            with torch.no_grad():
                logits = fast(prompt()).logits
            results[name] = {"logits": logits, "applied": fast.sparsify.applied(), "explain": sparsify.explain(fast),
                             "uncompiled": fast.sparsify.uncompiled_calls}
        for name, (_, policy, kwargs) in GENERATE_CASES.items():
            torch._dynamo.reset()
            fast = sparsify.compile(model, policy, cost_model_fallback=False)
            results[f"generate {name}"] = {"logits": generated_logits(fast, **kwargs),
                                           "applied": fast.sparsify.applied(), "geometry": fast.sparsify.geometry}
        try:  # a KV head count the ranks cannot split
            tensor_parallel(tiny_model("llama", layers=1, kv_heads=1), mesh)
        except ShapeError as error:
            results["odd_kv_heads"] = str(error)
        # The caller's own plan, sharding the queries but not the keys: not a split by whole GQA groups.
        partial = tiny_model("llama", layers=1)
        parallelize_module(partial.model, mesh, {"layers.*.self_attn.q_proj": ColwiseParallel()})
        try:
            sparsify.compile(partial, "dense")
        except ShapeError as error:
            results["queries_only"] = str(error)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saved, run once for the module's tests."""
    return run_ranks(_worker, RANKS, tmp_path_factory.mktemp("tensor_parallel"), TIMEOUT_S)


def one_process(policy) -> torch.Tensor:
    """The logits of the unsharded model compiled with ``policy`` in this process."""
    fast = sparsify.compile(tiny_model("llama", layers=2), policy, cost_model_fallback=False)
    with torch.no_grad():
        return fast(prompt()).logits


def generated_logits(model, **kwargs) -> torch.Tensor:
    """(NEW_TOKENS, vocab): the logits of each token ``model`` generates greedily after the prompt."""
    with torch.no_grad():
        out = model.generate(prompt(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return torch.cat(out.logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_sharded_model_itself_gives_the_unsharded_logits(ranks, kind):
    with torch.no_grad():
        expected = tiny_model(kind, layers=2)(prompt()).logits
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result[f"eager {kind}"], expected, atol=1e-5, rtol=1e-5, msg=f"rank {rank}")


@pytest.mark.parametrize("name", ["dense", "sink_window", "delta"])
def test_each_rank_gives_the_logits_of_one_process(ranks, name):
    expected = one_process(POLICIES[name])
    if name != "dense":  # the method really is sparse here: its logits are not dense attention's
        assert (expected - one_process("dense")).abs().max() > 1e-3
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result[name]["logits"], expected, atol=1e-5, rtol=1e-5, msg=f"rank {rank}")
        methods, reasons = result[name]["applied"]
        assert methods == (set() if name == "dense" else {name}) and not reasons, f"rank {rank}: {reasons}"
        assert result[name]["uncompiled"] == 0


@pytest.mark.parametrize("name", GENERATE_CASES)
def test_generate_on_each_rank_gives_the_logits_of_one_process(ranks, name):
    method, policy, kwargs = GENERATE_CASES[name]
    expected = generated_logits(sparsify.compile(tiny_model("llama", layers=2), policy, cost_model_fallback=False),
                                **kwargs)
    for rank, result in enumerate(ranks):
        result = result[f"generate {name}"]
        torch.testing.assert_close(result["logits"], expected, atol=1e-5, rtol=1e-5, msg=f"rank {rank}")
        assert result["applied"] == ({method}, set()), f"rank {rank}"
    if method != "resa":  # resa rectifies; the others are sparse at every step: not dense generation's logits
        dense = generated_logits(sparsify.compile(tiny_model("llama", layers=2), "dense"), **kwargs)
        assert (expected - dense).abs().max() > 1e-3
    if name == "resa":  # (KV heads, head_dim, query heads) of each rank's state: half the model's heads
        assert [result[f"generate {name}"]["geometry"] for result in ranks] == [(1, 16, 2)] * RANKS


def test_a_rule_naming_the_models_heads_serves_them_on_the_rank_that_holds_them(ranks):
    expected = one_process(POLICIES["heads"])
    assert (expected - one_process("dense")).abs().max() > 1e-3
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["heads"]["logits"], expected, atol=1e-5, rtol=1e-5, msg=f"rank {rank}")
    assert ranks[0]["heads"]["applied"][0] == set()  # its query heads are 0-1
    assert ranks[1]["heads"]["applied"][0] == {"sink_window"}
    explained = ranks[0]["heads"]["explain"]
    assert "rank 0: query heads 0-1, KV heads 0; rank 1: query heads 2-3, KV heads 1" in explained
    assert "heads=2-3 (rank 0's local heads: none)" in explained
    assert "heads=2-3 (rank 1's local heads: 0-1)" in ranks[1]["heads"]["explain"]


def test_a_split_the_ranks_cannot_make_by_whole_heads_is_refused(ranks):
    assert ranks[0]["odd_kv_heads"] == ("config.num_key_value_heads: 1 does not split over the mesh's 2 ranks; "
                                        "allowed: a multiple of 2")
    assert ranks[0]["queries_only"].startswith("model.layers.0.self_attn.k_proj.weight: placements None; allowed: "
                                               "(Shard(0),)")


def test_rank_0_calibrates_and_every_rank_plans_with_its_ceilings(ranks):
    """Ranks that calibrated apart could choose different configs and dense fallbacks (and a rank running a method
    that gathers across ranks would wait for one running dense): rank 0 alone calibrates, the others read its
    cache after a barrier, also when they look at the cache while rank 0 is still writing it."""
    assert ranks[0]["ceilings"] == {"rates": (500.0, 400.0), "calibrations": [128]}
    assert ranks[1]["ceilings"] == {"rates": (500.0, 400.0), "calibrations": []}


def test_a_head_split_maps_the_models_heads_to_local_ones():
    split = HeadSplit(rank=1, ranks=2, model_q_heads=8, model_kv_heads=2, group_name="tp")
    assert (split.q_heads, split.kv_heads, split.first_q_head, split.first_kv_head) == (4, 1, 4, 1)
    local = split.local_heads(IndexRanges.parse("2-5,7", "heads"))
    assert [h for h in range(4) if h in local] == [0, 1, 3] and local.text == "2-5,7 (rank 1's local heads: 0-1,3)"
    assert not any(h in split.local_heads(IndexRanges.parse("0-3", "heads")) for h in range(4))
    policy = Policy.load({"rules": [{"when": {"heads": "4-7"}, "use": "sink_window"}, {"use": "delta"}]})
    rules = split.local_policy(policy).rules
    assert [h for h in range(4) if h in rules[0].when.heads] == [0, 1, 2, 3] and rules[1].when.heads is None
    with pytest.raises(ShapeError, match="model_kv_heads: 3 does not split over 2 ranks; allowed: a multiple of 2"):
        HeadSplit(rank=0, ranks=2, model_q_heads=6, model_kv_heads=3, group_name="tp")
    with pytest.raises(ShapeError, match="ranks: 0; allowed: 1 or more"):
        HeadSplit(rank=0, ranks=0, model_q_heads=8, model_kv_heads=2)
    with pytest.raises(ShapeError, match="group_name: empty with several ranks"):
        HeadSplit(rank=0, ranks=2, model_q_heads=8, model_kv_heads=2)


def test_a_method_choosing_across_heads_is_refused_some_heads_of_a_layer():
    """On one process LessIsMore refuses a rule that gives it some of a layer's heads; split over ranks, a rank
    holding all of the rule's heads would gather alone (and wait for ranks running dense): refused up front."""
    split = HeadSplit(rank=0, ranks=2, model_q_heads=4, model_kv_heads=2, group_name="tp")
    partial = Policy.load({"rules": [{"when": {"phase": "decode", "heads": "0-1"}, "use": "lessismore",
                                      "with": {"budget": 64, "dense_layers": [], "selection_layers": [0]}}]})
    with pytest.raises(PolicyError, match=r"rules\[0\]: heads 0-1 with lessismore, which chooses from all of a "
                                          r"layer's heads; allowed: whole layers \(no heads, or all 4\)"):
        split.local_policy(partial)
    whole = Policy.load({"rules": [{"when": {"phase": "decode", "heads": "0-3"}, "use": "lessismore"}]})
    assert split.local_policy(whole).rules[0].spec.name == "lessismore"


def test_the_launcher_refuses_a_device_it_has_no_backend_for(monkeypatch):
    from sparsify.distributed import join_launched_ranks

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ShapeError, match="device: 'mps' under torchrun; allowed: cuda \\(NCCL\\) or cpu \\(gloo\\)"):
        join_launched_ranks("mps")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join_launched_ranks("cpu") is None  # one process: no group to join
