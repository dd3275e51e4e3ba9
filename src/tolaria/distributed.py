"""Multi-process training with ``torch.distributed`` (ARCHITECTURE §7): one decider,
identical growth on every rank.

A run launched by ``torchrun`` (or ``tolaria train --nproc N``, which goes through torch's
own launcher) holds one :class:`RankGroup` per process; the trainer calls it at its
boundaries and nowhere else:

* data -- ``data.batch_size`` is the global batch: every rank trains on its slice of each
  one (``tolaria.data.ShardedEpochSampler``) and validates on its part of the split;
* training -- forward and backward go through :class:`Replica`, a DistributedDataParallel
  wrapper made again whenever the trainable set changed (germination, cull, rollback,
  resume) and checked to hold every trainable parameter in its buckets.  Validation,
  counterfactual passes and Kasmina's telemetry run on the unwrapped module: DDP only sees
  the training forward, and the telemetry (plain tensors, not buffers) is never
  broadcast by it;
* evidence -- the training loss, the seeds' telemetry and the validation sums (each
  counterfactual pass's too) are summed over the ranks before the packet is assembled, so
  every rank holds the same ``SystemStatePacket``;
* one decider -- rank 0 observes and decides; its decisions go to every rank as JSON,
  with its hardware reading (the one part of the packet a rank measures for itself), and
  every rank observes the same packet and applies them: the controller's state,
  checkpointed by rank 0, is the same everywhere;
* the grown structure (Kasmina's manifest, every parameter's name and shape) is compared
  across ranks after every epoch -- which is also the barrier behind rank 0's checkpoint;
* one writer -- only rank 0 has a run directory; on resume it reads the checkpoint and
  broadcasts it, and every rank restores it.

Every collective waits at most ``run.distributed_timeout_s``; one that fails becomes a
one-line :class:`~tolaria.errors.DistributedError`.  A rank that raises or dies exits, and
the launcher stops the others (``tolaria.distributed_cli`` names the failed rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tolaria.checkpoint import Snapshot, restore_snapshot
from tolaria.config import RunConfig, TolariaConfig
from tolaria.contracts import AdaptationSignal, HardwareContext, SeedState, SystemStatePacket
from tolaria.errors import ConfigError, DistributedError, TolariaError
from tolaria.kasmina import export_structure, find_seeds
from tolaria.kasmina.layer import KasminaLayer

#: What torchrun sets in the environment of every process it starts.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process is one rank of a launched group (torchrun sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def environment_rank() -> int:
    return int(os.environ.get("RANK", "0"))


class RankStopped(TolariaError):
    """Rank 0 ended the command before training (nothing to do, or its own error): the
    other ranks end too, with its exit code, saying nothing more."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"rank 0 stopped with exit code {exit_code}")
        self.exit_code = exit_code


class RankGroup:
    """This process's place in the group, and the collectives the trainer needs."""

    def __init__(self, rank: int, world_size: int, local_rank: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.timeout_s = timeout_s
        #: ``(rank, world_size)``: this process's share of the data (``make_loaders``).
        self.shard = (rank, world_size)
        self.replica = Replica(self)

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run directory; the others write nothing."""
        return self.rank == 0

    # ------------------------------------------------------------------ joining
    @classmethod
    def join(cls, config: TolariaConfig) -> RankGroup:
        """Join the group torchrun launched (gloo on CPU, NCCL on CUDA, each rank on
        ``cuda:LOCAL_RANK``) and agree with the others on the config."""
        group = cls._connect(config.run)
        # None: rank 0 reached its build too; an exit code: it stopped before (``release``).
        stopped = group.from_writer("starting the run", lambda: None)
        if stopped is not None:
            raise RankStopped(stopped)
        group.check_same("config", config.to_yaml())
        return group

    @classmethod
    def _connect(cls, run: RunConfig) -> RankGroup:
        missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE is set but {', '.join(missing)} not: launch with torchrun "
                "(or tolaria train --nproc N), which sets them all"
            )
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        cuda = run.device in ("auto", "cuda") and torch.cuda.is_available()
        if run.device.startswith("cuda:"):
            raise ConfigError(
                f"run.device={run.device!r}: under torchrun each rank uses cuda:LOCAL_RANK; "
                "use 'auto' or 'cuda' (or CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
        if cuda:
            torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU
        timeout = run.distributed_timeout_s
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if cuda else "gloo", rank=rank,
                                        world_size=world_size, timeout=timedelta(seconds=timeout))
            except (RuntimeError, ValueError) as exc:
                raise DistributedError(
                    f"rank {rank}: cannot join the process group at "
                    f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                    f"within run.distributed_timeout_s={timeout:g}: {one_line(exc)}"
                ) from None
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, timeout)

    @staticmethod
    def release(exit_code: int) -> None:
        """End this process's part: a rank 0 that never reached its build (the command
        stopped before, or failed) tells the waiting ranks to stop with ``exit_code``.

        After a run that finished, every rank first waits for the others, so that none
        tears its connections down while another still uses them.  Then what still holds
        the group (a finished trainer's DDP wrapper, often in a reference cycle) is
        collected while the interpreter is whole: left to interpreter shutdown, gloo's
        worker threads may free tensors after Python is gone and abort the process
        (SIGABRT, "terminate called without an active exception"; seen once in CI).
        """
        if not dist.is_initialized():
            group = RankGroup._connect(RunConfig())
            group.from_writer("stopping the run", lambda: exit_code)
        elif exit_code == 0:
            # A peer that finished and went away already: there is nothing left to share.
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        RankGroup.leave()

    @staticmethod
    def leave() -> None:
        """Tear this process's part of the group down, what holds it collected first."""
        gc.collect()
        dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    def _collective(self, what: str, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except RuntimeError as exc:  # DistBackendError, a timeout, a peer that went away
            others = ", ".join(str(r) for r in range(self.world_size) if r != self.rank)
            raise DistributedError(
                f"rank {self.rank}: {what} failed: rank(s) {others} stopped or did not answer "
                f"within run.distributed_timeout_s={self.timeout_s:g} ({one_line(exc)})"
            ) from None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor, the same on every rank)."""
        total = tensor.clone()
        self._collective("summing over the ranks", lambda: dist.all_reduce(total))
        return total

    def from_writer(self, what: str, make: Callable[[], Any]) -> Any:
        """Rank 0's ``make()``, on every rank (pickled by ``broadcast_object_list``).  An
        error rank 0 meets is raised on every rank: none waits for what will not come."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box = [("value", make())]
            except TolariaError as exc:
                box = [("error", str(exc), exc.exit_code)]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0))
        kind, *content = box[0]
        if kind == "error":
            error = DistributedError(content[0] if self.rank == 0 else
                                     f"rank {self.rank}: rank 0 failed: {content[0]}")
            error.exit_code = content[1]
            raise error
        return content[0]

    def check_same(self, what: str, text: str) -> None:
        """Stop, naming the ranks, unless every rank holds the same ``text``."""
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        digests: list[Any] = [None] * self.world_size
        self._collective(f"comparing the {what}",
                         lambda: dist.all_gather_object(digests, digest))
        holders: dict[str, list[int]] = {}
        for rank, held in enumerate(digests):
            holders.setdefault(held, []).append(rank)
        if len(holders) > 1:
            parts = "; ".join(f"rank(s) {', '.join(map(str, ranks))} hold {held}"
                              for held, ranks in holders.items())
            raise DistributedError(f"the {what} differs across ranks: {parts}; stopping the run")

    # ------------------------------------------------------------------ the trainer's hooks
    def sum_telemetry(self, model: nn.Module) -> None:
        """Every seed's telemetry of the epoch becomes that of all ranks' batches."""
        for layer in model.modules():
            if isinstance(layer, KasminaLayer):
                layer.add_up_telemetry(self.sum, self.world_size)

    def sum_evaluations(self, passes: list[Any]) -> None:
        """Each validation pass (and counterfactual pass) becomes the pass over the split."""
        for evaluation in passes:
            evaluation.add_up(self.sum)

    def step(self, controller: Any, packet: SystemStatePacket) -> AdaptationSignal:
        """``controller.step(packet)`` with one decider: rank 0 observes and decides; its
        plan (JSON) and its hardware reading (the one part of the packet a rank measures
        for itself) go to every rank, which observes the same packet and applies the plan."""
        if not all(hasattr(controller, name) for name in ("observe", "decide", "apply")):
            raise ConfigError(
                f"{type(controller).__name__}: a multi-process run needs a controller that "
                "observes, decides and applies separately (as TamiyoController does)"
            )
        if self.rank == 0:
            observation = controller.observe(packet)
            plan = controller.decide(observation)
        decided, hardware = self.from_writer("sharing rank 0's decisions", lambda: (
            plan_to_json(plan), packet.hardware_context.to_dict()))
        if self.rank != 0:
            packet = dataclasses.replace(
                packet, hardware_context=HardwareContext.from_dict(hardware))
            observation = controller.observe(packet)
            plan = plan_from_json(decided, observation, controller)
        return controller.apply(plan)

    def check_structure(self, model: nn.Module, epoch: int) -> None:
        """After every epoch: the same grown structure on every rank, or a stop.  All ranks
        wait here, so none starts the next epoch before rank 0's checkpoint is written."""
        self.check_same(f"grown structure after epoch {epoch}", structure_text(model))

    def resume_point(
        self, load: Callable[[], Snapshot | None], components: dict[str, Any]
    ) -> Snapshot | None:
        """Rank 0 loads (and restores) the newest valid checkpoint; every other rank restores
        the same snapshot, sent by rank 0 (the run directory need not be on its machine)."""
        snapshot = self.from_writer("sharing the checkpoint", load)
        if snapshot is not None and self.rank != 0:
            restore_snapshot(snapshot, components)
        return snapshot


class Replica:
    """The model as DDP trains it, wrapped again whenever its trainable set changed.

    DDP registers its parameters when it wraps: one added later is never all-reduced
    (pytorch#12603), so the wrapper is keyed by the trainable parameters (name, identity,
    shape) and by whether a seed holds a blueprint its forward skips (a GERMINATED seed:
    DDP must then look for parameters without gradients).

    The first wrap lets DDP check the shapes and broadcast every tensor from rank 0.  A
    re-wrap broadcasts only the tensors new since the last one (a graft's): the others are
    the same on every rank already (the gradients were all-reduced, the structure was
    compared after the epoch), and a 10M-parameter model is not sent again for a graft.
    """

    def __init__(self, group: RankGroup) -> None:
        self.group = group
        self.module: DistributedDataParallel | None = None
        self._key: tuple | None = None
        # Held, so that no tensor created later can take the id of one in here.
        self._synced: dict[int, torch.Tensor] = {}
        #: How many times the model was wrapped (the first wrap included).
        self.wraps = 0

    def __call__(self, model: nn.Module) -> DistributedDataParallel:
        key = wrap_key(model)
        if key != self._key:
            self.wrap(model, key)
        return self.module  # type: ignore[return-value]

    def wrap(self, model: nn.Module, key: tuple) -> None:
        first = self.module is None
        if not first:
            # The old reducer's hooks sit on the parameters: left there they would fire at
            # the next backward, beside the new one's, until the old wrapper is collected.
            self.module._remove_autograd_hooks()
            self.module = None
        tensors = [*model.parameters(), *model.buffers()]
        new = [t for t in tensors if id(t) not in self._synced]

        def wrap() -> DistributedDataParallel:
            if not first:
                for tensor in new:
                    dist.broadcast(tensor.data, src=0)
            cuda = tensors[0].device.type == "cuda"
            return DistributedDataParallel(
                model, device_ids=[torch.cuda.current_device()] if cuda else None,
                find_unused_parameters=key[-1], init_sync=first,
            )

        ddp = self.group._collective("wrapping the model in DDP", wrap)
        check_buckets(ddp, model, self.group.rank)
        self.module, self._key = ddp, key
        self._synced = {id(t): t for t in tensors}
        self.wraps += 1


def wrap_key(model: nn.Module) -> tuple:
    trainable = tuple((name, id(p), tuple(p.shape))
                      for name, p in model.named_parameters() if p.requires_grad)
    skipped = any(seed.state is SeedState.GERMINATED and seed.blueprint is not None
                  for seed in find_seeds(model))
    return (*trainable, skipped)


def check_buckets(ddp: DistributedDataParallel, model: nn.Module, rank: int) -> None:
    """Every trainable parameter of ``model`` is in ``ddp``'s all-reduce buckets."""
    trainable = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}
    registered = {id(p) for p in ddp._module_parameters if p.requires_grad}
    logged = ddp._get_ddp_logging_data()
    in_buckets = sum(int(size) for size in str(logged["bucket_sizes"]).split(",") if size.strip())
    expected = sum(p.numel() * p.element_size() for _, p in trainable.values())
    missing = sorted(name for key, (name, _) in trainable.items() if key not in registered)
    if missing or logged["num_parameter_tensors"] != len(trainable) or in_buckets != expected:
        raise DistributedError(
            f"rank {rank}: DDP's buckets hold {logged['num_parameter_tensors']} parameters "
            f"({in_buckets} bytes), the model trains {len(trainable)} ({expected} bytes); "
            f"left out: {', '.join(missing) or 'none by name'}"
        )


def structure_text(model: nn.Module) -> str:
    """The grown structure as text: Kasmina's manifest and every parameter's name, shape
    and trainability (two ranks that applied the same adaptations hold the same)."""
    parameters = [(name, list(p.shape), p.requires_grad) for name, p in model.named_parameters()]
    return json.dumps([export_structure(model), parameters], sort_keys=True)


# ---------------------------------------------------------------------- decisions as JSON
def plan_to_json(plan: Any) -> str:
    """What rank 0 decided -- the decisions, or the emergency -- as JSON text."""
    emergency = plan.emergency
    return json.dumps({
        "emergency": None if emergency is None else
        {"kind": emergency.kind, "epoch": emergency.epoch, "reason": emergency.reason},
        "decisions": [
            {"seed_id": d.seed_id, "to_state": d.to_state.value, "reason": d.reason,
             "blueprint": d.blueprint, "evidence": dict(d.evidence)}
            for d in plan.decisions
        ],
    }, sort_keys=True)


def plan_from_json(text: str, observation: Any, controller: Any) -> Any:
    """Rank 0's plan on this rank: its decisions with this rank's own observation (the
    same: the packet and the controller's state are), and the growth points they make."""
    from tolaria.tamiyo.controller import Plan
    from tolaria.tamiyo.emergency import Emergency
    from tolaria.tamiyo.growth import growth_points
    from tolaria.tamiyo.policy import Decision

    content = json.loads(text)
    if content["emergency"] is not None:
        return Plan(observation, emergency=Emergency(**content["emergency"]))
    decisions = tuple(
        Decision(d["seed_id"], SeedState(d["to_state"]), d["reason"], d["blueprint"],
                 d["evidence"])
        for d in content["decisions"]
    )
    points = growth_points(observation, controller.config, decisions, controller.policy)
    return Plan(observation, decisions=decisions, points=points)


def one_line(exc: BaseException) -> str:
    """The cause in one line, without the C++ source location torch's backends prefix."""
    text = _SOURCE_LOCATION.sub("", str(exc)).strip()
    # Gloo goes on with advice ("This is typically caused by ...") after its first sentence.
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


#: ``[/path/to/gloo/transport/tcp/pair.cc:537] `` (which would also read as markup).
_SOURCE_LOCATION = re.compile(r"\[[^\]\s]*:\d+\]\s*")
