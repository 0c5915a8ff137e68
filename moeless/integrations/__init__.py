"""moeless inside the engines people already serve MoE with: SGLang and vLLM plug-ins (optional extras).

- `moeless.integrations.sglang`: the `sglang.srt.plugins` entry point. `--enable-eplb --eplb-algorithm
  moeless` makes SGLang's EPLB run moeless's policy on its recorder's per-pass series; with
  `--ep-dispatch-algorithm lp` the per-replica probabilities come from moeless's serve-time split. Also the
  `--init-expert-location` file writer (the dump readers live in `moeless.traces`).
- `moeless.integrations.vllm`: `MoelessEplbPolicy`, vLLM's `AbstractEplbPolicy` with moeless's decisions,
  and the `vllm.general_plugins` entry point that installs it when MOELESS_VLLM_EPLB=1.
- `moeless.integrations.replica_choice`: numpy models of each engine's per-token replica choice (vLLM's hash,
  SGLang's static table, dynamic row pick and LP sampling), used to measure what each integration buys.
- `moeless.integrations._policy`: the one door to moeless's decisions that every adapter goes through.

What this package must never do: be imported by moeless's core (it is floor 4, beside the data planes),
import an engine at module level (an engine is imported only when its plug-in runs or its class is asked
for), or change routing (only which replica of the chosen expert serves a token).
"""
