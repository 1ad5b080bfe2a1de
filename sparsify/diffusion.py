"""Masked diffusion language models and their generation loop (LLaDA's), the runtime SparseD runs in.

:class:`MaskedDiffusionLM` is a Llama whose attention is bidirectional and whose vocabulary has a mask token: the
shape of LLaDA, and of causal models adapted into diffusion ones (DiffuLLaMA, Dream). It is a transformers model
built from transformers' own Llama blocks, so ``sparsify.compile`` captures it as it captures a Llama, and
:meth:`MaskedDiffusionLM.from_causal_lm` runs any Llama's weights this way (SmolLM2's, as a stand-in for a real
diffusion LM's attention).

:func:`generate` is LLaDA's sampler: the answer starts as ``gen_length`` mask tokens after the prompt and is
unmasked in semi-autoregressive blocks of ``block_length``, ``steps`` denoising steps in all; each step predicts
every position and commits the most confident predictions of the current block (low-confidence remasking), as
many as the linear schedule gives the step. Under ``sparsify.compile`` the loop gives each request one sequence
state and sets its clock (step, steps, prompt length) before every step, which is how SparseD knows when to
switch from dense steps to its cached patterns.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .errors import ShapeError
from .state import STATE_ATTRIBUTE


def make_bidirectional(model: nn.Module) -> None:
    """Every attention module of ``model`` attends both ways (transformers' ``is_causal`` flag, which its SDPA path
    and sparsify's attention implementation both read)."""
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            module.is_causal = False


class MaskedDiffusionLM(LlamaPreTrainedModel):
    """A Llama with bidirectional attention predicting the tokens behind ``config.mask_token_id``.

    ``forward(input_ids (B, N))`` -> ``MaskedLMOutput`` with logits (B, N, vocab): a prediction for every
    position (the loop reads the masked ones). Keyword arguments reach the attention functions, as in transformers'
    own models (sparsify's sequence state among them)."""

    is_diffusion_lm = True  # sparsify.compile treats its bidirectional forwards as denoising steps
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        if getattr(config, "mask_token_id", None) is None:
            raise ValueError("config.mask_token_id: a masked diffusion LM needs its mask token's id")
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        make_bidirectional(self.model)
        self.post_init()

    @classmethod
    def from_causal_lm(cls, causal: nn.Module, mask_token_id: int) -> "MaskedDiffusionLM":
        """A diffusion LM with the weights of a Llama-architecture causal LM (shared, not copied), its attention
        made bidirectional: a stand-in with a real model's attention structure, or the start of an adaptation."""
        config = copy.deepcopy(causal.config)
        if config.model_type != "llama":
            raise ValueError(f"from_causal_lm: a Llama-architecture model is needed, got model_type "
                             f"{config.model_type!r}")
        if not 0 <= mask_token_id < config.vocab_size:
            raise ValueError(f"mask_token_id: {mask_token_id} is outside the vocabulary [0, {config.vocab_size})")
        config.mask_token_id = mask_token_id
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(causal.state_dict(), assign=True)
        model.model.rotary_emb = copy.deepcopy(causal.model.rotary_emb)  # its buffers are not in the state dict
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(causal.dtype).eval()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> MaskedLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("forward: give exactly one of input_ids and inputs_embeds")
        hidden = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = create_bidirectional_mask(self.config, hidden, attention_mask)
        position_embeddings = self.model.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.model.layers[: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings, **kwargs)
        return MaskedLMOutput(logits=self.lm_head(self.model.norm(hidden)))

    def generate_diffusion(self, prompt: torch.Tensor, **options) -> torch.Tensor:
        """:func:`generate` with this model (compiled by sparsify or not)."""
        return generate(self, prompt, **options)


def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) int64: how many of each row's ``masked`` (B, L) positions each step commits under LLaDA's linear
    schedule, the remainder going to the first steps."""
    total = masked.sum(1, keepdim=True)
    base, remainder = total // steps, total % steps
    return base + (torch.arange(steps, device=masked.device)[None] < remainder).to(torch.int64)


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The sampled token per position: argmax of the logits, Gumbel-perturbed in float64 when ``temperature`` > 0
    (LLaDA's sampler: low precision degrades masked diffusion sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits.double().exp() / (-torch.log(noise)) ** temperature).argmax(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, *, gen_length: int = 128, steps: int = 128,
             block_length: int | None = None, temperature: float = 0.0, remasking: str = "low_confidence",
             cfg_scale: float = 0.0, mask_token_id: int | None = None, generator: torch.Generator | None = None,
             observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """LLaDA's generation: ``prompt`` (B, P) token ids -> (B, P + gen_length), the answer unmasked in ``steps``
    denoising steps over blocks of ``block_length`` (default: one block, the whole answer).

    ``remasking``: "low_confidence" commits the positions whose predicted token is most probable, "random" random
    ones. ``cfg_scale`` > 0: classifier-free guidance against the prompt masked out (off by default).
    ``observer(step, x, logits)``: called after each step's forward, before its commit (fidelity measurements).
    """
    block_length = block_length or gen_length
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ShapeError(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
    blocks = gen_length // block_length
    if steps <= 0 or steps % blocks:
        raise ShapeError(f"steps ({steps}) must be a positive multiple of the number of blocks ({blocks})")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking: {remasking!r} is not allowed; allowed: low_confidence, random")
    mask_id = mask_token_id if mask_token_id is not None else model.config.mask_token_id
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    in_prompt = x != mask_id
    handle = getattr(model, "sparsify", None)
    rows = batch * 2 if cfg_scale > 0 else batch
    state = handle.sequence_state(rows, x.shape[1], prompt.device, model.dtype) if handle is not None else None
    steps_per_block = steps // blocks
    for block in range(blocks):
        start, stop = prompt_len + block * block_length, prompt_len + (block + 1) * block_length
        counts = transfer_counts(x[:, start:stop] == mask_id, steps_per_block)
        for inner in range(steps_per_block):
            step = block * steps_per_block + inner
            masked = x == mask_id
            inputs = torch.cat([x, torch.where(in_prompt, mask_id, x)]) if cfg_scale > 0 else x
            extra = {}
            if state is not None:
                state.set_clock(step, steps, prompt_len)
                extra[STATE_ATTRIBUTE] = state
            logits = model(inputs, **extra).logits
            if cfg_scale > 0:
                conditional, unconditional = logits.chunk(2)
                logits = unconditional + (cfg_scale + 1) * (conditional - unconditional)
            if observer is not None:
                observer(step, x, logits)
            predicted = _gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                confidence = F.softmax(logits.float(), -1).gather(-1, predicted[..., None])[..., 0]
            else:
                confidence = torch.rand(x.shape, device=x.device, generator=generator)
            confidence[:, stop:] = float("-inf")  # later blocks wait their turn
            confidence = torch.where(masked, confidence, float("-inf"))
            # Each row commits its count of most confident positions (a rank below the count).
            ranks = confidence.argsort(-1, descending=True).argsort(-1)
            commit = ranks < counts[:, inner:inner + 1]
            x = torch.where(commit, torch.where(masked, predicted, x), x)
    return x
