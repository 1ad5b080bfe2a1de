"""Make a masked diffusion LM that really denoises: SmolLM2-135M's weights adapted with a short fine-tune, its
attention bidirectional and ``<empty_output>`` (id 16, a special token plain text never contains) its mask token,
as DiffuLLaMA and Dream adapt causal models.

Text that ships offline: the docstrings (``ast`` over the ``.py`` files, sorted by path) of the installed packages
named by ``--packages`` and then of the running Python's standard library, tokenized and cut into
``--context``-token sequences; the last 5% are held out (the standard library's end, where
``sparsed_fidelity`` takes its prompts). The loss is
LLaDA's: per sequence a masking rate t ~ U(0.001, 1), each token masked with probability t, cross-entropy on the
masked tokens weighted by 1/t. AdamW, bf16 autocast, for ``--minutes`` of training. Reported before and after:
the loss and the share of masked tokens predicted right (one step, t = 0.5) on the held-out sequences.

    python -m benchmarks.diffusion_lm --out /tmp/smollm2-diffusion --minutes 5 --lr 1e-4 --packages transformers

(the fidelity runs' model, 2026-12-04; the corpus depends on the installed transformers' version: 5.17 there)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsify.diffusion import MaskedDiffusionLM
from sparsify.models import load_model

MASK_TOKEN = 16  # SmolLM2's '<empty_output>'


def docstrings(packages: tuple[str, ...] = ()) -> str:
    """Every module, class and function docstring (longer than 80 characters) of the named installed packages,
    then of the standard library, each in path order; the standard library's tests (``test/``) left out."""
    roots = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"--packages: {package!r} is not an installed package here")
        roots.append(Path(next(iter(spec.submodule_search_locations))))
    roots.append(Path(sysconfig.get_paths()["stdlib"]))
    return "\n\n".join(text for root in roots for text in _docstrings_under(root))


def _docstrings_under(root: Path) -> list[str]:
    texts = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "test" in parts or "site-packages" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    texts.append(doc)
    return texts


def sequences(tokenizer, context: int, packages: tuple[str, ...] = ()) -> torch.Tensor:
    ids = tokenizer(docstrings(packages), return_tensors="pt").input_ids[0]
    count = ids.numel() // context
    return ids[:count * context].view(count, context)


def masked_loss(model, ids: torch.Tensor, generator: torch.Generator, rate: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(LLaDA's loss, share of masked tokens predicted right) on a batch ``ids`` (B, L)."""
    batch = ids.shape[0]
    t = torch.full((batch, 1), rate, device=ids.device) if rate is not None else \
        torch.rand((batch, 1), device=ids.device, generator=generator) * 0.999 + 0.001
    masked = torch.rand(ids.shape, device=ids.device, generator=generator) < t
    logits = model(torch.where(masked, MASK_TOKEN, ids)).logits.float()
    losses = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    loss = (losses * masked / t).sum() / ids.numel()
    right = ((logits.argmax(-1) == ids) & masked).sum() / masked.sum().clamp(min=1)
    return loss, right


@torch.no_grad()
def evaluate(model, held_out: torch.Tensor, batch: int) -> dict:
    generator = torch.Generator(device=held_out.device).manual_seed(0)
    losses, rights = [], []
    for start in range(0, held_out.shape[0], batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, right = masked_loss(model, held_out[start:start + batch], generator, rate=0.5)
        losses.append(loss.item())
        rights.append(right.item())
    return {"loss_at_half_masked": sum(losses) / len(losses), "masked_accuracy_at_half": sum(rights) / len(rights)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=2.5)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--packages", nargs="*", default=[],
                        help="installed packages whose docstrings come before the standard library's")
    args = parser.parse_args(argv)
    causal, tokenizer = load_model("default", dtype=torch.float32, device="cuda")
    model = MaskedDiffusionLM.from_causal_lm(causal, MASK_TOKEN)
    data = sequences(tokenizer, args.context, tuple(args.packages)).cuda()
    held = max(1, data.shape[0] // 20)
    train, held_out = data[:-held], data[-held:]
    corpus = f"docstrings of {', '.join([*args.packages, 'the standard library'])}"
    report = {"corpus": corpus, "sequences": data.shape[0], "context": args.context,
              "mask_token_id": MASK_TOKEN, "before": evaluate(model.eval(), held_out, args.batch)}
    print(f"corpus: {data.shape[0]} sequences of {args.context} tokens; before {report['before']}", flush=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    order = torch.randperm(train.shape[0], device="cuda", generator=generator)
    started, step, seen, curve = time.time(), 0, 0, []
    while time.time() - started < args.minutes * 60:
        picks = order[(step * args.batch + torch.arange(args.batch, device="cuda")) % train.shape[0]]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = masked_loss(model, train[picks], generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += args.batch * args.context
        if step % 25 == 0:
            curve.append((step, loss.item()))
            print(f"step {step} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    model.eval()
    report.update(steps=step, tokens=seen, seconds=time.time() - started, loss_curve=curve, lr=args.lr,
                  batch=args.batch, after=evaluate(model, held_out, args.batch))
    print(f"after {report['after']}", flush=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
