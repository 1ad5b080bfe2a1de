"""``sparsify bench tp`` end to end on the CPU at ``--tiny`` scale: the one-process baseline (``--part tp1``), the
tensor- and context-parallel parts under ``torch.distributed.run`` with 2 ranks (gloo), and ``--merge``, in a
scratch folder with its own benchmarks/results. Checks the merged rows' names, the check against one process and
the ratios, and that a part from another device is not compared."""

import json
import subprocess
import sys

from sparsify.benchmarks import tp

TIMEOUT_S = 180  # a hung collective fails the test instead of stalling the suite
ARGS = ["bench", "tp", "--tiny", "--impls", "dense", "sparsify_sink_window"]


def run(folder, *launcher: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    done = subprocess.run([*launcher, "-m", "sparsify", *ARGS, *extra], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_tiny_parts_and_merge(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    run(tmp_path, sys.executable, extra=("--part", "tp1"))
    run(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    assert {path.name for path in results.glob("tp-*")} >= {"tp-tp1.json", "tp-tp2.json", "tp-cp2.json",
                                                             "tp-tp1-logits.pt", "tp-tp2-logits.pt"}
    monkeypatch.chdir(tmp_path)  # results_dir(): ./benchmarks/results
    tp.main(["--merge"])
    merged = json.loads((results / "tp.json").read_text())
    rows = {(row["case"], row["impl"]): row for row in merged["rows"]}
    assert set(rows) == {(case, f"{method}_tp{ranks}") for case in ("prefill", "decode")
                         for method in ("dense", "sparsify_sink_window") for ranks in (1, 2)} | {
        ("cp_prefill", "dense_ring_cp2"), ("cp_prefill", "sparsify_sink_window_cp2")}
    for method in ("dense", "sparsify_sink_window"):
        # float32 on the CPU: the sharded model gives one process's logits and tokens
        assert rows["prefill", f"{method}_tp2"]["logits_max_abs_diff_vs_tp1"] < 1e-4
        assert rows["prefill", f"{method}_tp2"]["top1_agrees_with_tp1"] == 1.0
        assert rows["decode", f"{method}_tp2"]["token_agreement_with_tp1"] == 1.0
        assert f"prefill@256 {method}_tp1/{method}_tp2" in merged["ratios"]
    assert rows["prefill", "sparsify_sink_window_tp2"]["methods_applied"] == ["sink_window"]
    ring, layout = rows["cp_prefill", "dense_ring_cp2"], rows["cp_prefill", "sparsify_sink_window_cp2"]
    # 4096 tokens, 2 KV heads of 16, float32: the ring moves 2048 tokens' K and V to each rank; sink 64 + window
    # 256 need rank 1 to receive 5 blocks of 64 (the sink and the window before position 2048), rank 0 nothing.
    assert ring["kv_bytes_per_rank"] == [524288, 524288] and layout["kv_bytes_per_rank"] == [0, 81920]
    assert layout["kv_share_of_ring"] == 81920 / 524288
    assert ring["max_abs_diff_sampled_rows"] < 1e-4 and layout["max_abs_diff_sampled_rows"] < 1e-4
    assert "cp_prefill@4096 dense_ring_cp2/sparsify_sink_window_cp2" in merged["ratios"]
    assert set(merged["parts"]) == {"tp-tp1", "tp-tp2", "tp-cp2"} and not merged["not_compared"]
    assert "torchrun --standalone --nproc-per-node 2" in merged["parts"]["tp-tp2"]["command"]
    assert "| target | value | met |" in (results / "tp.md").read_text()

    # A baseline from another device: kept as rows, never compared with this run's.
    baseline = json.loads((results / "tp-tp1.json").read_text())
    (results / "tp-tp1.json").write_text(json.dumps({**baseline, "device": "NVIDIA H200"}))
    tp.main(["--merge"])
    merged = json.loads((results / "tp.json").read_text())
    assert not [key for key in merged["ratios"] if "_tp1/" in key and "_tp2" in key]
    assert all("logits_max_abs_diff_vs_tp1" not in row for row in merged["rows"])
    assert any("device" in line for line in merged["not_compared"])
