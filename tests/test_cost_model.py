"""The cost model: sympy predictions, the dense threshold, configs, calibration cache."""

import json

import pytest
import sympy
import torch

from sparsify.kernels.block_sparse_attention import KernelConfig
from sparsify.methods.base import METHODS, parse_method_spec
from sparsify.passes.cost_model import (CPU_NOMINAL, SCATTERED_DENSITY, CostModel, N, DeviceCeilings, cache_path,
                                        calibration_layouts, dense_pairs, dense_threshold, load_ceilings,
                                        predicted_ms)


def test_dense_threshold_solves_the_crossing():
    dense = predicted_ms(dense_pairs(True), 32, 128, 500.0, 0.01)
    sparse = predicted_ms(N * 2304, 32, 128, 400.0, 0.02)
    threshold = dense_threshold(sparse, dense)
    assert float(sparse.subs(N, threshold)) <= float(dense.subs(N, threshold))
    assert float(sparse.subs(N, threshold - 2)) > float(dense.subs(N, threshold - 2))
    assert 4000 < threshold < 7000  # about 2 * 2304 * 500 / 400 plus the overhead


def test_never_and_always_cheaper():
    dense = predicted_ms(dense_pairs(True), 1, 64, 1.0, 0.0)
    assert dense_threshold(predicted_ms(N * N, 1, 64, 1.0, 0.0), dense) is None  # twice the work: never
    assert dense_threshold(predicted_ms(N * N / 4, 1, 64, 1.0, 0.0), dense) == 0  # a quarter: always


def test_methods_state_their_visited_pairs():
    config = KernelConfig(128, 64)
    window = parse_method_spec({"use": "sink_window", "with": {"sink": 64, "window": 2048}}, "test")
    pairs = window.method.visited_pairs(window.params, N, config)
    assert sympy.simplify(pairs - N * (64 + 2048 + 128 + 64)) == 0
    topk = parse_method_spec({"use": "block_topk", "with": {"density": 0.1}}, "test")
    assert float(topk.method.visited_pairs(topk.params, N, config).subs(N, 65536)) < 0.12 * 65536 ** 2
    assert not hasattr(METHODS.get("dense"), "visited_pairs")


def test_config_choice_and_cached_calibration(tmp_path, monkeypatch):
    ceilings = DeviceCeilings("x", 1.0, 1.0, 0.0, configs={128: KernelConfig(128, 128, 8, 2)})
    assert ceilings.config_for(128) == KernelConfig(128, 128, 8, 2)
    assert ceilings.config_for(96).block_m == 128  # the default for the next size up
    assert load_ceilings(torch.device("cpu"), 128) is CPU_NOMINAL
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path))
    path = cache_path("Some GPU")
    assert path.parent == tmp_path and json.dumps(str(path))


def test_only_the_head_dims_a_model_has_are_calibrated_and_each_once(tmp_path, monkeypatch):
    """A calibration compiles a kernel per candidate config: on a fresh GPU a model with head_dim 128 pays for
    128's candidates only; the disk cache then serves it, and another head_dim is added to the same file."""
    import sparsify.passes.cost_model as cost_model_module

    calibrated = []

    def calibrate(device, head_dim):
        calibrated.append(head_dim)
        return DeviceCeilings("Some GPU", 100.0 + head_dim, 50.0 + head_dim, 0.01,
                              configs={head_dim: KernelConfig(64, 64, 4, 2)}, rates={head_dim: (100.0 + head_dim,
                                                                                               50.0 + head_dim)})

    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path))
    monkeypatch.setattr(cost_model_module, "calibrate", calibrate)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    gpu = torch.device("cuda")
    assert load_ceilings(gpu, 128).rates_for(128) == (228.0, 178.0)
    assert load_ceilings(gpu, 128).config_for(128) == KernelConfig(64, 64, 4, 2) and calibrated == [128]
    both = load_ceilings(gpu, 64)
    assert calibrated == [128, 64] and both.rates_for(64) == (164.0, 114.0) and both.rates_for(128) == (228.0, 178.0)
    assert load_ceilings(gpu, 96).rates_for(96) == (228.0, 178.0) and calibrated == [128, 64]  # 128's candidates
    assert set(json.loads(cache_path("Some GPU").read_text())["rates"]) == {"64", "128"}


def test_config_for_fixed_blocks_uses_the_calibration_record():
    fast = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "use_tma": True}
    slow = {"block_m": 128, "block_n": 128, "num_warps": 4, "num_stages": 2, "use_tma": False}
    ceilings = DeviceCeilings("x", 1.0, 1.0, 0.0, configs={128: KernelConfig(64, 64, 4, 3, True)},
                              measured=[{"head_dim": 128, "config": "sdpa", "tflops": 9.0},
                                        {"head_dim": 128, "config": slow, "tflops": 1.0},
                                        {"head_dim": 128, "config": fast, "tflops": 2.0}])
    assert ceilings.config_for(128) == KernelConfig(64, 64, 4, 3, True)
    assert ceilings.config_for(128, (128, 128)) == KernelConfig(**fast)
    assert ceilings.config_for(64, (128, 128)).block_n == 128


def test_top_k_methods_take_the_config_timed_on_scattered_blocks():
    """A config's speed on runs of key blocks says little about blocks picked one by one: top-k methods (and Delta
    over one) choose from the scattered problem's timings and predict with that config's rate there, the others
    from the contiguous problem's."""
    causal_best = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "use_tma": False}
    scattered_best = {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 2, "use_tma": True}
    measured = [{"head_dim": 128, "problem": "contiguous", "config": causal_best, "tflops": 500.0},
                {"head_dim": 128, "problem": "contiguous", "config": scattered_best, "tflops": 400.0},
                {"head_dim": 128, "problem": "scattered", "config": causal_best, "tflops": 300.0},
                {"head_dim": 128, "problem": "scattered", "config": scattered_best, "tflops": 420.0}]
    ceilings = DeviceCeilings("x", 600.0, 500.0, 0.01, configs={128: KernelConfig(**causal_best)}, measured=measured,
                              rates={128: (600.0, 500.0)})
    assert ceilings.config_for(128) == KernelConfig(**causal_best)
    assert ceilings.config_for(128, (128, 64), "scattered") == KernelConfig(**scattered_best)
    assert ceilings.config_for(96, None, "scattered") == KernelConfig(**scattered_best)  # 128's timings serve 96
    with pytest.raises(ValueError, match="problem: 'random' is not one of contiguous, scattered"):
        ceilings.config_for(128, None, "random")
    model = CostModel(lambda head_dim: ceilings)
    assert ceilings.rate_of(128, KernelConfig(**scattered_best), "scattered") == 420.0
    assert ceilings.rate_of(128, KernelConfig(128, 32), "scattered") is None
    for policy, problem, expected in (({"use": "sparsed"}, "scattered", scattered_best),
                                      ({"use": "block_topk"}, "scattered", scattered_best),
                                      ({"use": "delta", "with": {"base": {"use": "block_topk"}}}, "scattered",
                                       scattered_best),
                                      ({"use": "sink_window"}, "contiguous", causal_best),
                                      ({"use": "delta"}, "contiguous", causal_best)):
        spec = parse_method_spec(policy, "test")
        assert spec.method.calibration_problem(spec.params) == problem, policy
        assert model._plan(spec, 32, 128, spec.name != "sparsed").config == KernelConfig(**expected), policy


def test_calibration_layouts_are_causal_and_scattered_bidirectional():
    layouts = calibration_layouts(KernelConfig(128, 64), 2048, 4, torch.device("cpu"))
    assert layouts["contiguous"].mask.causal and not layouts["scattered"].mask.causal
    full, partial = layouts["scattered"].block_masks()
    assert not partial.any() and full.shape == (1, 4, 16, 32)
    pairs = full.view(1, 4, 16, 16, 2)
    assert (pairs[..., 0] == pairs[..., 1]).all()  # a 128-key block kept whole: both of its 64-key blocks
    assert abs(layouts["scattered"].density() - SCATTERED_DENSITY) < 0.05
    again = calibration_layouts(KernelConfig(128, 64, 4, 2), 2048, 4, torch.device("cpu"))["scattered"]
    assert torch.equal(again.full_kv_indices, layouts["scattered"].full_kv_indices)  # every config, one layout


def test_the_cache_file_names_the_calibration_it_holds(tmp_path, monkeypatch):
    """New candidates or problems calibrate again rather than read timings that lack them."""
    import sparsify.passes.cost_model as cost_model_module

    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path))
    before = cache_path("Some GPU")
    monkeypatch.setitem(cost_model_module.CANDIDATE_CONFIGS, 64, (KernelConfig(64, 64, 4, 2),))
    assert cache_path("Some GPU") != before and cache_path("Some GPU").parent == before.parent


def test_the_cost_model_pass_leaves_the_decisions_it_was_given_unchanged():
    from conftest import tiny_model

    import sparsify
    from sparsify.passes.apply_policy import apply_policy
    from sparsify.passes.cost_model import CostModel, cost_model
    from sparsify.policy import Policy

    policy = Policy.load({"rules": [{"when": {"phase": "prefill"}, "use": "sink_window",
                                     "with": {"sink": 4, "window": 16}}]})
    compiled = sparsify.compile(tiny_model("llama"), policy)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 40)))
    frame = compiled.sparsify.frames[0]
    gm, given = apply_policy(frame.original, frame.annotations, policy, None)
    before, items = given.key, list(given.decisions)
    _, report = cost_model(gm, given, CostModel(lambda head_dim: CPU_NOMINAL), {a.index: 40 for a in frame.annotations.attentions})
    assert given.key == before and all(a is b for a, b in zip(given.decisions, items))
    assert report.fallbacks == 3 and report.decisions.key != before  # dense is cheaper at 40 tokens: all fell back
