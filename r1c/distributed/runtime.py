"""The stage runner: rank k runs pipeline stage k of the training step on its target (`stage_exec.py`: the
reference interpreter, or the cuda backend with the stage's state on the rank's GPU).

One step, for a batch split into M equal micro-batches (every rank draws the same batch from the same seeded
sampler, so only activations and cotangents travel):
- the rank follows its order from `pipeline_schedule.stage_orders` (GPipe: all forwards, then all backwards in
  reverse; 1F1B: warm-up forwards, then one forward / one backward);
- F(m): receive stage k-1's results for micro-batch m (rank 0: none), run `@loss.stage<k>`, send the results to
  rank k+1 and keep what it received until B(m);
- B(m): receive the cotangents of its results from rank k+1 (the last rank seeds its loss with kept_m / kept:
  the batch loss is the kept-token-weighted mean of the micro-batch losses, exactly), run `@loss.stage<k>.vjp`,
  add the parameter gradients to the step's sums and send the received values' cotangents to rank k-1;
- one all-reduce carries the squared gradient norm of every rank (clipping is by the global norm) and the loss;
- `@loss.stage<k>.update` applies clipping, the schedule and AdamW/SGD to the rank's own parameters.

With expert parallelism the stage's replicas each hold a block of the experts: the interpreter runs `moe_experts`
and its gradient through `ExpertDispatch` (all-to-all within the replicas), the expert blocks' gradients are not
all-reduced, and each replica adds its own block's squared norm to the global one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from r1c.distributed.comm import BACKWARD, FORWARD, Channel
from r1c.distributed.expert_parallel import expert_overrides
from r1c.distributed.program import DistributedError, PipelineConfig, StagePlan, loss_ignore_index
from r1c.distributed.stage_exec import stage_exec
from r1c.ir.core import Function, Module
from r1c.ir.interpreter import bind_dims
from r1c.ir.ops.optim import lr_at
from r1c.passes.pipeline_schedule import stage_orders
from r1c.train.config import TrainConfig
from r1c.train.runtime import StepResult


@dataclass
class StepGradients:
    """The accumulated (unclipped) gradients of the rank's parameters from the last step, by name."""

    loss: float
    grads: dict[str, np.ndarray]  # host copies


class StageRunner:
    def __init__(
        self,
        module: Module,
        plans: list[StagePlan],
        cfg: TrainConfig,
        pc: PipelineConfig,
        rank: int,
        channel: Channel,
        state: dict[str, np.ndarray],
        step: int = 0,
        replica: int = 0,
        dp_group: object | None = None,
    ) -> None:
        """`rank` is the stage index; with data parallelism the process's global rank is replica * S + rank (its
        pipeline neighbours are its replica's), and `dp_group` holds the same stage of every replica."""
        self.module, self.cfg, self.pc, self.rank, self.channel = module, cfg, pc, rank, channel
        self.replica, self.dp_group = replica, dp_group
        self.base = replica * pc.stages  # global rank of this replica's stage 0
        self.plan, self.plans = plans[rank], plans
        self.last = rank == len(plans) - 1
        self.ignore_index = loss_ignore_index(module)
        self.loss_args = [a.name for a in module.functions["loss"].args]
        self.order = stage_orders(pc.schedule, pc.stages, pc.micro_batches, training=True)[rank]
        self.step = step
        self.last_grads: StepGradients | None = None
        self.keep_grads = False  # tests: keep a host copy of each step's gradients in last_grads
        self.busy_s = 0.0  # the last step's seconds spent computing (forwards and backwards; the rest is waiting)
        self.crash_now = False  # fault injection (tests): exit abruptly after this step's first forward
        # Expert parallelism: the replicas of this stage (dp_group, whose rank r is replica r, holding expert block
        # r: expert_shard.take_blocks) share the experts; MoE ops exchange tokens within it.
        overrides = expert_overrides(pc, channel, dp_group, rank)
        # only this stage's tensors
        self.exec = stage_exec(pc.target, module, self.plan, {n: state[n] for n in self.plan.state}, overrides)

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The stage's parameters and optimizer state, on the host."""
        return self.exec.host_state()

    def _specs(self, f: Function, env: dict[str, int]) -> list[tuple[tuple[int, ...], object]]:
        return [(r.type.concrete(env), self.exec.wire_dtype(r)) for r in f.results]

    def run_step(self, tokens: np.ndarray, labels: np.ndarray) -> StepResult:
        plan, ch, m_count, replicas = self.plan, self.channel, self.pc.micro_batches, self.pc.data_parallel
        # Every rank draws the whole batch; a replica trains on its consecutive share of the rows. Each micro-batch
        # loss is weighted by its kept tokens over the whole batch's, so the sum over replicas of the summed
        # gradients is the whole batch's gradient (and the sum of the weighted losses its loss).
        share = tokens.shape[0] // replicas
        rows = slice(self.replica * share, (self.replica + 1) * share)
        total_kept = int(np.sum(labels != self.ignore_index))
        if total_kept == 0:
            raise DistributedError("every label of the batch is ignore_index: the loss is undefined")
        full_tokens, tokens, labels = tokens, tokens[rows], labels[rows]
        b = share // m_count
        batch = dict(zip(self.loss_args, (tokens, labels)))
        kept = [int(np.sum(labels[i * b : (i + 1) * b] != self.ignore_index)) for i in range(m_count)]
        env = {"B": b, "S": tokens.shape[1]}
        prev = self.plans[self.rank - 1].forward if self.rank else None
        saved: dict[int, list[np.ndarray]] = {}
        grads: list[np.ndarray] | None = None
        loss = 0.0
        self.busy_s = 0.0
        for kind, m in self.order:
            if kind == "F":
                args = self._forward_args(batch, m, b, env, prev)
                outs = self._timed(plan.forward, args)
                saved[m] = args
                if self.last:
                    loss += float(outs[0]) * kept[m] / total_kept  # float64: the weighted mean of the losses
                else:
                    ch.send(outs, self.base + self.rank + 1, FORWARD, m)
                if self.crash_now:
                    ch.flush()
                    os._exit(17)  # like a crash or an OOM kill: no cleanup, sockets close with the process
            else:
                args = saved.pop(m)
                if self.last:
                    cots = [self.exec.scalar(kept[m] / total_kept, np.float32)]
                else:
                    floats = [r for r in plan.forward.results if r.type.dtype.is_float]
                    env_m = bind_dims(plan.forward, args)
                    specs = [(r.type.concrete(env_m), self.exec.wire_dtype(r)) for r in floats]
                    cots = ch.recv(specs, self.base + self.rank + 1, BACKWARD, m)
                outs = self._timed(plan.vjp, args + cots)
                n = plan.n_received_float
                if self.rank:
                    ch.send(outs[:n], self.base + self.rank - 1, BACKWARD, m)
                step_grads = outs[n:]
                grads = step_grads if grads is None else [g + d for g, d in zip(grads, step_grads)]
        ch.flush()
        grads = grads or []
        by_name = dict(zip(plan.grad_params, grads))
        loads = grads[len(plan.grad_params) :]  # the MoE layers' expert loads (balancing biases), summed likewise
        if replicas > 1 and loads:
            loads = self._all_reduce_grads(loads)
        # Expert blocks' gradients already sum over every replica's tokens (expert_parallel.py): not all-reduced.
        shared = [n for n in plan.grad_params if n not in plan.experts]
        if replicas > 1 and shared:
            by_name.update(zip(shared, self._all_reduce_grads([by_name[n] for n in shared])))

        def sq(names: list[str]) -> float:
            return self.exec.sq_sum([by_name[n] for n in names])

        # After the all-reduce every replica holds the same shared gradients: replica 0 alone counts them in the
        # norm; every replica counts its own expert block's.
        sq_shared = sq([n for n in plan.trainable if n not in plan.experts]) if self.replica == 0 else 0.0
        sq_total = sq_shared + sq([n for n in plan.trainable if n in plan.experts])
        total_sq, total_loss = ch.all_reduce_sum(np.array([sq_total, loss]), "the gradient-norm and loss all-reduce")
        norm = math.sqrt(total_sq)
        if self.keep_grads:
            host = {n: np.asarray(g.cpu() if hasattr(g, "cpu") else g) for n, g in by_name.items()}
            self.last_grads = StepGradients(float(np.float32(total_loss)), host)
        self.step += 1
        if plan.update is not None:
            ex = self.exec
            args = [ex.scalar(self.step, np.int32), ex.scalar(norm, np.float32), *(by_name[n] for n in plan.trainable)]
            new = ex.run(plan.update, args + loads)
            # the update returns (param, optimizer state...) per param, then the moved biases
            ex.set_state(dict(zip(plan.state, new)))
        lr = lr_at(self.step, self.cfg.lr, self.cfg.warmup, self.cfg.steps, self.cfg.min_lr, self.cfg.schedule)
        return StepResult(self.step, float(np.float32(total_loss)), lr, float(np.float32(norm)), int(full_tokens.size))

    def _timed(self, f: Function, args: list) -> list:
        t0 = time.perf_counter()
        outs = self.exec.run(f, args)
        self.exec.sync()
        self.busy_s += time.perf_counter() - t0
        return outs

    def _all_reduce_grads(self, grads: list[np.ndarray]) -> list[np.ndarray]:
        """The sum of this stage's gradients over the replicas (one float64 transfer, rounded once to f32)."""
        flat = self.exec.flat64(grads)
        total = self.channel.all_reduce_sum(flat, f"the gradient all-reduce of stage {self.rank}", self.dp_group)
        return self.exec.split_like(total, grads)

    def _forward_args(
        self, batch: dict[str, np.ndarray], m: int, b: int, env: dict[str, int], prev: Function | None
    ) -> list[np.ndarray]:
        original = {n: batch[n][m * b : (m + 1) * b] for n in self.plan.inputs}
        received = self.channel.recv(self._specs(prev, env), self.base + self.rank - 1, FORWARD, m) if prev else []
        by_name = {**original, **dict(zip(self.plan.received, received))}
        return [by_name[a.name] for a in self.plan.forward.args]
