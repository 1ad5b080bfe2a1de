"""Tensor parallelism: ``sparsify.compile`` on a transformers model whose attention heads and MLP are split over
ranks with ``torch.distributed.tensor.parallel.parallelize_module``.

Each rank holds a contiguous run of the query heads and of the KV heads they read, and runs its attention on them
alone: every method works per head (or per GQA group), so it runs per rank with no communication of its own; the
only collectives are the two all-reduces per layer of the row-wise output projections, which torch's parallel
styles put there. :func:`tensor_parallel` shards a model so; :func:`head_split` reads, from a model's weights, how
its heads were split (by :func:`tensor_parallel` or by the caller's own ``parallelize_module`` plan), and
``sparsify.compile`` uses it to map a policy's heads, which are the model's (global) heads, onto the rank's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from .errors import PolicyError, ShapeError
from .policy import IndexRanges, Policy

# Model types whose attention reshapes its projections by ``view(..., -1, head_dim)`` (so it infers its local head
# count from the sharded width, and ``num_key_value_groups``, a ratio, stays right: no module attribute needs a local
# head count) with a dense gate/up/down MLP: sharding q/k/v and gate/up by output rows and o/down by input columns
# computes the model exactly (tests/test_distributed.py checks both). Others need a plan of their own: Olmo2
# normalises q and k over all heads, Phi-3 fuses q/k/v in one projection, MoE models route tokens to experts.
TENSOR_PARALLEL_MODELS = ("llama", "qwen2")

# Each decoder layer's plan, relative to the base model (``model.model`` of a ``...ForCausalLM``).
LAYER_PLAN = {
    "layers.*.self_attn.q_proj": ColwiseParallel(),
    "layers.*.self_attn.k_proj": ColwiseParallel(),
    "layers.*.self_attn.v_proj": ColwiseParallel(),
    "layers.*.self_attn.o_proj": RowwiseParallel(),
    "layers.*.mlp.gate_proj": ColwiseParallel(),
    "layers.*.mlp.up_proj": ColwiseParallel(),
    "layers.*.mlp.down_proj": RowwiseParallel(),
}


def tensor_parallel(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """Shard ``model`` in place over the 1-D ``mesh``, and return it: in every decoder layer q/k/v and the MLP's
    gate/up projections by output rows (rank r of R computes query heads ``[r*H/R, (r+1)*H/R)``, the KV heads they
    read and its slice of the MLP's hidden units), o and down by input columns, their outputs all-reduced. The
    embeddings, norms and LM head stay whole on every rank. Inputs and outputs are plain tensors, the same on every
    rank: call it like the unsharded model (``generate()`` too, static caches included). Raises ShapeError for a
    model or mesh this plan cannot split evenly."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in TENSOR_PARALLEL_MODELS:
        raise ShapeError(f"config.model_type: {model_type!r} has no tensor-parallel plan here; allowed: "
                         f"{', '.join(TENSOR_PARALLEL_MODELS)}")
    if mesh.ndim != 1:
        raise ShapeError(f"mesh: {mesh.ndim}-D; allowed: a 1-D mesh of the tensor-parallel ranks (pass mesh['tp'] "
                         "of a larger mesh)")
    ranks = mesh.size()
    heads = int(config.num_attention_heads)
    sizes = {"num_attention_heads": heads,
             "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
             "intermediate_size": int(config.intermediate_size)}
    for name, size in sizes.items():
        if size % ranks:
            raise ShapeError(f"config.{name}: {size} does not split over the mesh's {ranks} ranks; allowed: a "
                             f"multiple of {ranks}")
    parallelize_module(model.base_model, mesh, LAYER_PLAN)
    # generate() sizes a static cache it initialises early by this hook, which counts the config's KV heads unless
    # transformers sharded the model itself: give it the rank's own.
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    local_cache_shape = (sizes["num_key_value_heads"] // ranks, head_dim)
    model._get_static_cache_init_shape = lambda: local_cache_shape
    return model


@dataclass(frozen=True)
class HeadSplit:
    """How a tensor-parallel model's attention heads are split: rank ``rank`` of ``ranks`` holds query heads
    ``[first_q_head, first_q_head + q_heads)`` of the model's ``model_q_heads`` and KV heads ``[first_kv_head,
    first_kv_head + kv_heads)`` of ``model_kv_heads``. Contiguous runs of equal size, so a rank's query heads are
    whole GQA groups over its own KV heads, and its attention's local head h is the model's head
    ``first_q_head + h``."""

    rank: int
    ranks: int
    model_q_heads: int
    model_kv_heads: int
    group_name: str = ""  # the ranks' process group (methods whose selection spans heads gather over it)

    def __post_init__(self):
        if self.ranks < 1:
            raise ShapeError(f"ranks: {self.ranks}; allowed: 1 or more")
        if self.ranks > 1 and not self.group_name:
            raise ShapeError("group_name: empty with several ranks; allowed: the name of the ranks' process group "
                             "(methods that choose across heads gather over it)")
        for name in ("model_q_heads", "model_kv_heads"):
            if getattr(self, name) % self.ranks:
                raise ShapeError(f"{name}: {getattr(self, name)} does not split over {self.ranks} ranks; allowed: a "
                                 f"multiple of {self.ranks}")
        if not 0 <= self.rank < self.ranks:
            raise ShapeError(f"rank: {self.rank} is out of range; allowed: 0-{self.ranks - 1}")

    @property
    def q_heads(self) -> int:
        return self.model_q_heads // self.ranks

    @property
    def kv_heads(self) -> int:
        return self.model_kv_heads // self.ranks

    @property
    def first_q_head(self) -> int:
        return self.rank * self.q_heads

    @property
    def first_kv_head(self) -> int:
        return self.rank * self.kv_heads

    def local_heads(self, heads: IndexRanges) -> IndexRanges:
        """The rank's local indices of the model's query heads ``heads`` (empty where it holds none of them); the
        text says both, for explain."""
        local = [head - self.first_q_head for head in range(self.first_q_head, self.first_q_head + self.q_heads)
                 if head in heads]
        runs: list[tuple[int, int]] = []
        for head in local:
            if runs and runs[-1][1] == head - 1:
                runs[-1] = (runs[-1][0], head)
            else:
                runs.append((head, head))
        local_text = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs) or "none"
        return IndexRanges(tuple(runs), f"{heads.text} (rank {self.rank}'s local heads: {local_text})")

    def local_policy(self, policy: Policy) -> Policy:
        """``policy`` (its heads the model's, already checked against the whole model by ``Policy.for_model``) with
        every rule's ``heads`` mapped to this rank's local heads. A rule giving a method that chooses across all of
        a layer's heads (``AttentionMethod.whole_layers``) some of them only is refused: on one process the method
        refuses that itself, but split over ranks a rank holding all of the rule's heads would gather alone and
        wait for ranks that run dense."""
        for rule in policy.rules:
            heads = rule.when.heads
            if heads is not None and rule.spec.method.whole_layers and \
                    not all(head in heads for head in range(self.model_q_heads)):
                raise PolicyError(f"{rule.describe()}: heads {heads.text} with {rule.spec.name}, which chooses from "
                                  f"all of a layer's heads; allowed: whole layers (no heads, or all "
                                  f"{self.model_q_heads})")
        rules = tuple(rule if rule.when.heads is None else
                      dataclasses.replace(rule, when=dataclasses.replace(rule.when,
                                                                         heads=self.local_heads(rule.when.heads)))
                      for rule in policy.rules)
        return dataclasses.replace(policy, rules=rules)

    def describe(self) -> str:
        """How the heads were split over the ranks, for explain."""
        def span(first: int, count: int) -> str:
            return f"{first}-{first + count - 1}" if count > 1 else str(first)

        per_rank = "; ".join(f"rank {r}: query heads {span(r * self.q_heads, self.q_heads)}, KV heads "
                             f"{span(r * self.kv_heads, self.kv_heads)}" for r in range(self.ranks))
        return (f"tensor parallel over {self.ranks} ranks, {self.model_q_heads} query / {self.model_kv_heads} KV heads "
                f"split by rank ({per_rank}); this is rank {self.rank}: the tables below show its own heads, local "
                f"head h being the model's head {self.first_q_head} + h; rules name the model's heads")


def join_launched_ranks(device: str) -> DeviceMesh | None:
    """Under a launcher that starts one process per rank (``torchrun --nproc-per-node N``: ``WORLD_SIZE`` > 1 in
    the environment), join their process group and return the 1-D mesh of all ranks, for :func:`tensor_parallel`;
    None in a single process. ``device`` ("cuda" or "cpu", where the model runs): NCCL with one GPU per rank, this
    process's ``LOCAL_RANK`` made the current CUDA device; gloo on the CPU."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks <= 1:
        return None
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ShapeError(f"device: {device!r} under torchrun; allowed: cuda (NCCL) or cpu (gloo)")
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return init_device_mesh(kind, (ranks,))


def leave_launched_group(clean: bool) -> None:
    """Leave the default process group, if one was joined. ``clean`` (this rank finished without an error, as every
    rank should have): a barrier first, since a rank tearing down gloo's connections while a peer still uses them
    can abort that peer at exit (seen under load); after an error no barrier, which the failed ranks would not
    reach."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def head_split(model: torch.nn.Module) -> HeadSplit | None:
    """How ``model``'s attention heads are split over tensor-parallel ranks, read from its attention modules'
    q/k/v projection weights (DTensors sharded by output rows, ``Shard(0)``, over one 1-D mesh); None where no
    attention is sharded. Raises ShapeError for a split that is not by whole heads on every layer alike (a rank's
    heads would then not be a contiguous run of the model's, as policies and methods assume)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_attention_heads", None) is None:
        return None
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    meshes = set()
    placements = {}
    for name, module in model.named_modules():
        projections = [getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        if not hasattr(module, "layer_idx") or any(p is None for p in projections):
            continue
        for projection_name, projection in zip(("q_proj", "k_proj", "v_proj"), projections):
            weight = projection.weight
            placements[f"{name}.{projection_name}"] = weight.placements if isinstance(weight, DTensor) else None
            if isinstance(weight, DTensor):
                meshes.add(weight.device_mesh)
    if not any(placements.values()):
        return None
    for where, placement in placements.items():
        if placement != (Shard(0),):
            raise ShapeError(f"{where}.weight: placements {placement}; allowed: (Shard(0),) on every attention's "
                             "q/k/v projections (sharded by output rows: whole heads per rank, as "
                             "sparsify.distributed.tensor_parallel shards them)")
    if len(meshes) != 1:
        raise ShapeError(f"the attentions' q/k/v weights lie on {len(meshes)} device meshes; allowed: one 1-D mesh")
    mesh = meshes.pop()
    if mesh.ndim != 1:
        raise ShapeError(f"the q/k/v weights' mesh: {mesh.ndim}-D; allowed: 1-D (the tensor-parallel ranks)")
    return HeadSplit(rank=mesh.get_local_rank(), ranks=mesh.size(), model_q_heads=heads, model_kv_heads=kv_heads,
                     group_name=mesh.get_group().group_name)
