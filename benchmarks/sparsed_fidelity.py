"""SparseD fidelity on a diffusion LM: per-step KL from dense, and agreement of the generated tokens with dense
generation, under the ``sparsed`` preset's default parameters.

Models: SmolLM2-135M's weights run bidirectionally (``--weights`` unset: a real model's attention structure, no
denoising training) or a diffusion LM saved by ``benchmarks/diffusion_lm.py`` (``--weights DIR``). Prompts: held-out
standard-library docstring text of ``length - gen`` tokens; ``--gen`` tokens generated in ``--steps`` steps over
blocks of ``--block-length`` (LLaDA's low-confidence remasking, greedy).

Per step KL: the dense run's input at every step goes through the sparse model too (its own state, clock set to the
same step), KL(dense || sparse) over the still-masked positions, float32, and the share of those positions whose
argmax is dense's (step argmax agreement). Agreement: the share of generated tokens the sparse model's own run
commits equal to the dense run's. Low-confidence remasking makes that strict: one flipped near-tie changes what
every later step sees. Its floor is the control: the same preset keeping every block (``keep_ratio`` 1), so the
same kernels, launches and pattern build run and only the skipping is gone; run and scored the same way.

    python -m benchmarks.sparsed_fidelity --lengths 2048 4096 --weights /tmp/smollm2-diffusion
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsify
from sparsify.diffusion import MaskedDiffusionLM, generate
from sparsify.evaluation import plots
from sparsify.methods.base import MethodSpec
from sparsify.methods.sparsed import switch_step
from sparsify.models import load_model
from sparsify.policy import Policy

from .common import write_result
from .diffusion_lm import MASK_TOKEN, sequences


def load(weights: Path | None):
    causal, tokenizer = load_model("default", dtype=torch.float32, device="cuda")
    if weights is None:
        return MaskedDiffusionLM.from_causal_lm(causal, MASK_TOKEN), tokenizer, "smollm2-bidirectional"
    model = MaskedDiffusionLM.from_pretrained(weights, dtype=torch.float32, attn_implementation="sdpa")
    return model.cuda().eval(), tokenizer, "smollm2-diffusion"


def every_block(policy: Policy) -> Policy:
    """``policy`` with each of its sparsed rules keeping every block: the control's policy."""
    rules = tuple(dataclasses.replace(rule, spec=MethodSpec(rule.spec.name, dataclasses.replace(
        rule.spec.params, keep_ratio=1.0))) if rule.spec.name == "sparsed" else rule for rule in policy.rules)
    return dataclasses.replace(policy, rules=rules)


def fidelity(model, sparse, control, prompt: torch.Tensor, args) -> dict:
    """One prompt: the dense (uncompiled) run observed step by step, and the free runs of ``sparse`` (the preset)
    and ``control`` (:func:`every_block` of it)."""
    options = dict(gen_length=args.gen, steps=args.steps, block_length=args.block_length)
    state = sparse.sparsify.sequence_state(1, prompt.shape[1] + args.gen, prompt.device, model.dtype)
    kl_by_step, argmax_by_step = [], []

    def observe(step, x, dense_logits):
        state.set_clock(step, args.steps, prompt.shape[1])
        sparse_logits = sparse(x, sparsify_state=state).logits
        masked = x == MASK_TOKEN
        kl = F.kl_div(F.log_softmax(sparse_logits.float(), -1), F.log_softmax(dense_logits.float(), -1),
                      log_target=True, reduction="none").sum(-1)
        kl_by_step.append(kl[masked].mean().item())
        same = sparse_logits.argmax(-1) == dense_logits.argmax(-1)
        argmax_by_step.append(same[masked].float().mean().item())

    dense = generate(model, prompt, observer=observe, **options)
    generated = slice(prompt.shape[1], None)

    def agreement(run):
        return (dense[:, generated] == run[:, generated]).float().mean().item()

    methods, reasons = sparse.sparsify.applied()
    sparse_steps = slice(args.switch + 1, None)
    return {"agreement": agreement(sparse.generate_diffusion(prompt, **options)),
            "control_agreement": agreement(control.generate_diffusion(prompt, **options)),
            "kl_by_step": kl_by_step, "mean_kl_sparse_steps": _mean(kl_by_step[sparse_steps]),
            "argmax_agreement_by_step": argmax_by_step,
            "mean_argmax_agreement_sparse_steps": _mean(argmax_by_step[sparse_steps]),
            "methods_applied": sorted(methods), "dense_reasons": sorted(reasons)}


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args(argv)
    preset = Policy.load("sparsed")
    fractions = {rule.spec.params.dense_fraction for rule in preset.rules if rule.spec.name == "sparsed"}
    if len(fractions) != 1:
        raise ValueError(f"the sparsed preset's rules switch at different steps ({sorted(fractions)}): the sparse "
                         "steps' mean KL would mix dense and sparse steps")
    args.switch = switch_step(args.steps, fractions.pop())
    model, tokenizer, name = load(args.weights)
    # The policy to the letter (as sparsify eval runs it): the cost model would keep short sequences dense.
    sparse = sparsify.compile(model, preset, inductor=False, cost_model_fallback=False)
    control = sparsify.compile(model, every_block(preset), inductor=False, cost_model_fallback=False)
    training = args.weights / "training.json" if args.weights else None
    extra = {"model": name, "options": {k: v for k, v in vars(args).items() if k != "weights"},
             "training": json.loads(training.read_text()) if training and training.is_file() else None,
             "ratio_meaning": "agreement: share of generated tokens equal to the dense (uncompiled) run's; control "
                              "agreement: the same for the preset keeping every block (the floor set by the "
                              "kernels' rounding alone: one flipped near-tie changes every later step); step argmax "
                              "agreement: on the dense run's own inputs, the share of masked positions whose "
                              "argmax is dense's, averaged over the sparse steps"}
    rows, ratios, runs = [], {}, []
    for index, length in enumerate(args.lengths):
        prompts = sequences(tokenizer, length - args.gen)[-args.samples:].cuda()  # the held-out end of the corpus
        results = []
        for prompt in prompts:
            started = time.perf_counter()
            results.append(fidelity(model, sparse, control, prompt[None], args))
            print(f"N={length}: a sample in {time.perf_counter() - started:.1f} s", flush=True)
        summary = {key: _mean([r[key] for r in results]) for key in
                   ("agreement", "control_agreement", "mean_kl_sparse_steps", "mean_argmax_agreement_sparse_steps")}
        rows.append({"case": "fidelity", "seq_len": length, "impl": "sparsed", **summary})
        ratios[f"agreement@{length}"] = summary["agreement"]
        ratios[f"control agreement@{length}"] = summary["control_agreement"]
        ratios[f"step argmax agreement@{length}"] = summary["mean_argmax_agreement_sparse_steps"]
        runs += [{"seq_len": length, **r} for r in results]
        print(f"{name} N={length}: {summary} {results[0]['methods_applied']} {results[0]['dense_reasons']}",
              flush=True)
        # Written after every length, marked interrupted until the last: a run stopped by a time limit keeps
        # the lengths it finished.
        path = write_result(f"sparsed-fidelity-{name}", rows, ratios,
                            {**extra, "runs": runs, "interrupted": index < len(args.lengths) - 1})
        plots.diffusion_steps(runs, args.switch, path.with_name(f"{path.stem}-steps.png"),
                              f"sparsed on {name}: per step, on the dense run's inputs")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
