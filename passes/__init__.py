"""Graph passes. Each is a function ``GraphModule -> (GraphModule, Report)`` that reads no global state:
match (find attentions), annotate (shapes, layer, phase), apply_policy (choose methods), cost_model (blocks and
dense fallback), rewrite (emit ``torch.ops.sparsify.*``)."""
