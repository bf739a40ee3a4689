"""Execute-or-approximate routing: the one place that gathers, runs a unit and merges.

Per unit (attention, MLP) and token the new residual is

    x' = x + g * Unit(n) + (1 - g) * LFF(n),      g in {0, 1}

`route_unit` computes the unit delta for every policy:
  informed  router scores pick the executed tokens; the rest get the forecast
  greedy    the same with forecast 0 (execute or skip; SkipGPT / MoD baseline)
  random    random tokens at the same capacity, with forecast
  oracle    executes the tokens whose forecast error is largest (analysis bound)
  dense     every token executes

Top-k mode ("topk") picks k = capacity * T tokens per row with `lax.top_k`,
gathers them (keeping their original positions and segment ids), runs the
unit on `[B, k, D]` only and scatters the outputs over the forecasts; every
shape is static. Causal mode ("causal") executes a token iff its score
passes a per-unit threshold calibrated on held-out data, so a token's
decision never depends on later tokens; it is what decoding uses.

Modules, each building only on those listed above it:
  spec       RoutingSpec, its validation, per-unit capacities and token counts
  unit       route_unit: scores, top-k or thresholds, gather-run-scatter
  plan       Plan: each unit's static form per layer, computed once per forward or decode
             step (prefill_plan, decode_plan); the layer, cost model and AOT view read it
  capacity   CapacityTable: the per-unit capacity table in every form, and its allocation
  calibrate  causal thresholds
  forward    routed_layer (the one routed layer) and routed_forward (RoutingSpec.forward)
  decode     KV-cache decoding: decode_body, decode_step, generate
  cost       matmul FLOPs of a routed forward: each unit executes, forecasts or routes
  budget     tables for an executed-FLOPs budget; trained_spec (route a trained model)
"""

from ir_jax.routing.budget import allocate_flops, error_shape, table_for_flops, trained_spec
from ir_jax.routing.calibrate import calibrate_thresholds, check_calibrated
from ir_jax.routing.capacity import CapacityTable, mean_capacity, model_table, rescale_table
from ir_jax.routing.cost import flops, form_flops, token_flops, unit_flops
from ir_jax.routing.decode import decode_body, decode_step, generate, init_cache
from ir_jax.routing.forward import (
  Ctx,
  LayerInputs,
  realized_sparsity,
  routed_forward,
  routed_layer,
)
from ir_jax.routing.plan import Form, Plan, decode_plan, prefill_plan
from ir_jax.routing.spec import (
  COMPUTES,
  GATES,
  MODES,
  POLICIES,
  RoutingSpec,
  is_fraction,
  is_temperature,
  layer_caps,
  layer_ks,
  row_k,
)
from ir_jax.routing.unit import (
  SINK_BONUS,
  UnitFn,
  gather,
  route_unit,
  sink_mask,
  topk_indices,
  topk_mask,
)

__all__ = [
  "COMPUTES",
  "CapacityTable",
  "Ctx",
  "Form",
  "LayerInputs",
  "Plan",
  "GATES",
  "MODES",
  "POLICIES",
  "RoutingSpec",
  "SINK_BONUS",
  "UnitFn",
  "calibrate_thresholds",
  "check_calibrated",
  "decode_body",
  "decode_plan",
  "decode_step",
  "flops",
  "form_flops",
  "token_flops",
  "allocate_flops",
  "error_shape",
  "table_for_flops",
  "gather",
  "generate",
  "init_cache",
  "is_fraction",
  "is_temperature",
  "layer_caps",
  "layer_ks",
  "mean_capacity",
  "model_table",
  "prefill_plan",
  "realized_sparsity",
  "rescale_table",
  "route_unit",
  "routed_forward",
  "routed_layer",
  "row_k",
  "sink_mask",
  "topk_indices",
  "topk_mask",
  "trained_spec",
  "unit_flops",
]
