"""NodeCosts: the cost of every node of a captured graph (INTERFACE; filled by partitioner/cost_models/profile.py)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

from partitioner.cost_models.memory import OPTIMIZER_STATES, OPTIMIZER_STEP_TEMPORARIES
from partitioner.cost_models.time import NO_TIME, NodeTime, pass_time_s

# What a CUDA graph pool reserves beyond its peak of live tensors, as a fraction of that peak: t5-base's
# two stages under per-stage graphs (bf16, 8 microbatches of 2 x 1024 tokens, one H100) peaked at 1.66 GiB
# live while recording and reserved 2.54 GiB (benchmarks/RESULTS.md, "What the graph pools hold")
GRAPH_POOL_SLACK = 0.53


@dataclass(frozen=True)
class NodeCost:
    """Cost of one fx node for ONE microbatch.

    fwd_flops / bwd_flops: from FlopCounterMode (bwd includes input and weight grads).
    param_bytes: bytes of parameters it reads directly (tied ones counted at each user;
        use NodeCosts.param_state_bytes for per-rank memory, keyed by FQN).
    output_bytes: bytes of its output value(s) (what a cut after it sends); for get_attr
        nodes the parameter's size, for placeholders the input's, 0 for the output node.
    saved_bytes: activation bytes autograd saves for backward when this node runs
        (saved_tensors_hooks; parameters and already-counted storages excluded).
    bwd_working_bytes: transient bytes while its backward runs, beyond saved activations
        and parameter gradients: activation gradients in flight plus its workspace
        (cost_models.memory.backward_walk).
    output_saved_by: the node whose saved_bytes count this node's output ("" if none does
        in full; cost_models.memory.output_savers).
    output_requires_grad: its output depends on a trainable parameter or input (a stage
        receiving it keeps the received tensor until its backward).
    fwd_time_s / bwd_time_s: predicted (analytic roofline) or measured device times.
    host_fwd_time_s / host_bwd_time_s: host dispatch times where measured apart (CUDA);
        0 where the device times include them. A run of nodes takes, per pass,
        max(sum of device times, sum of host times) (see `time_s`).
    Bytes and times are in NodeCosts.dtype (see partitioner/cost_models/profile.py).
    """

    name: str
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    param_bytes: int = 0
    output_bytes: int = 0
    saved_bytes: int = 0
    bwd_working_bytes: int = 0
    fwd_time_s: float = 0.0
    bwd_time_s: float = 0.0
    host_fwd_time_s: float = 0.0
    host_bwd_time_s: float = 0.0
    output_saved_by: str = ""
    output_requires_grad: bool = False

    @property
    def time_s(self) -> float:
        """Forward + backward seconds, host and device overlapping within each pass."""
        return pass_time_s(self.fwd_time_s, self.host_fwd_time_s) + pass_time_s(self.bwd_time_s, self.host_bwd_time_s)


@dataclass
class NodeCosts:
    """Costs of every node, plus per-parameter training state.

    param_state_bytes: FQN -> bytes of parameter + gradient + optimizer state
        (in the weight's dtype, as torch.optim keeps them).
    time_source: "analytic" or "measured".
    stage_pass: what every stage pass (one forward or one backward of one stage for one
        microbatch) costs beyond its nodes, once per stage: the executor's action, the
        autograd.backward call and, for compiled stages, torch.compile's per-call machinery
        (guards, AOTAutograd's wrappers). Device parts on the CPU device, host parts on a GPU
        (profile() says where it comes from); a stage's pass takes
        stage_pass.fwd_pass_s(sum device, sum host) (NodeTime.fwd_pass_s). Default: nothing.
    """

    nodes: dict[str, NodeCost]
    param_state_bytes: dict[str, int] = field(default_factory=dict)
    device: str = ""
    dtype: str = "float32"
    optimizer: str = "adamw"
    time_source: str = "analytic"
    stage_pass: NodeTime = NO_TIME

    def total(self, attr: str, names: Iterable[str] | None = None) -> float:
        """`attr` summed over the nodes `names` (default: every node)."""
        nodes = self.nodes.values() if names is None else [self.nodes[n] for n in names]
        return sum(getattr(c, attr) for c in nodes)

    def step_time_s(self, names: Iterable[str] | None = None) -> float:
        """Forward + backward of the nodes `names` (default: the whole graph) as one stage on one
        device: per pass, max(sum device, sum host), the stage pass's overhead paid once."""
        names = None if names is None else list(names)
        o = self.stage_pass
        return (o.fwd_pass_s(self.total("fwd_time_s", names), self.total("host_fwd_time_s", names))
                + o.bwd_pass_s(self.total("bwd_time_s", names), self.total("host_bwd_time_s", names)))

    def launch_and_run_s(self) -> tuple[float, float]:
        """(host time launching, device time running) a microbatch's forward and backward of every
        node: the first the larger means the GPU waits for the host (host-bound)."""
        return (self.total("host_fwd_time_s") + self.total("host_bwd_time_s"),
                self.total("fwd_time_s") + self.total("bwd_time_s"))

    def host_bound(self) -> bool:
        """Whether the host launches a microbatch's kernels slower than the device runs them, so
        the device waits for it: what CUDA graphs remove."""
        launch, run = self.launch_and_run_s()
        return launch > run

    def without_host(self) -> "NodeCosts":
        """These costs with no host dispatch time: a step replayed as a CUDA graph launches once."""
        nodes = {k: replace(c, host_fwd_time_s=0.0, host_bwd_time_s=0.0) for k, c in self.nodes.items()}
        return replace(self, nodes=nodes, stage_pass=self.stage_pass.device_only())

    def under_cuda_graphs(self) -> "NodeCosts":
        """These costs for stages whose calls replay as CUDA graphs: no host dispatch time
        (without_host), and the memory the graphs hold. A graph's activations live in its private
        memory pool, which keeps every segment it ever reserved: the pool held GRAPH_POOL_SLACK more
        than its peak of live tensors (fragmentation across the recorded calls), so saved and working
        bytes count 1 + GRAPH_POOL_SLACK times. And the optimizer's step can no longer reuse the
        activations' freed memory: its temporaries (OPTIMIZER_STEP_TEMPORARIES) add to every
        parameter's state."""
        base = self.without_host()
        grow = 1.0 + GRAPH_POOL_SLACK
        nodes = {k: replace(c, saved_bytes=round(c.saved_bytes * grow), bwd_working_bytes=round(c.bwd_working_bytes * grow))
                 for k, c in base.nodes.items()}
        temps, held = OPTIMIZER_STEP_TEMPORARIES[self.optimizer], 2 + OPTIMIZER_STATES[self.optimizer]
        states = {fqn: b + b * temps // held for fqn, b in self.param_state_bytes.items()}
        return replace(base, nodes=nodes, param_state_bytes=states)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "NodeCosts":
        """The NodeCosts to_json wrote (one written before stage_pass existed: none)."""
        d = json.loads(text)
        d["nodes"] = {k: NodeCost(**v) for k, v in d["nodes"].items()}
        d["stage_pass"] = NodeTime(**d["stage_pass"]) if "stage_pass" in d else NO_TIME
        return cls(**d)
