"""moeless.sim: the trace-driven simulator of serverless-expert serving at paper scale.

The second data plane of the same control plane: request traces (moeless.sim.workload) become iterations,
routing (moeless.sim.routing) gives every iteration's per-layer expert loads, the policies
(moeless.sim.policies: megatron, eplb, oracle, moeless and its ablations) drive the real planner and
predictors, moeless.sim.serverless keeps the instances' lifecycle and bill, and one cost model
(moeless.costmodel: roofline, or the paper's linear Equations 1-3) prices every layout.

    from moeless.sim import SimConfig, run_simulation, write_report
    result = run_simulation(SimConfig())          # the paper's setup
    print(result.to_json()); write_report(result, "out/")

Nothing here launches a kernel or reads the wall clock for simulated time.
"""
from moeless.sim.engine import SimConfig, build_setup, run_simulation
from moeless.sim.report import write_report
from moeless.sim.results import PolicyResult, SimResult

__all__ = ["SimConfig", "SimResult", "PolicyResult", "run_simulation", "build_setup", "write_report"]
