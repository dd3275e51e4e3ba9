"""``KasminaLayer``: the seeds of one host module, their telemetry, and injection into a host.

A layer sits behind a host module through a forward hook and sees its output ``h`` of
shape ``[batch, channels, *spatial]``.  Dim 1 is split into ``chunks`` slices with
``torch.tensor_split`` semantics (the first ``channels % chunks`` slices one wider), one
``KasminaSeed`` each.

Telemetry runs in training mode only, on every ``telemetry_interval``-th batch of an
epoch (the statistics are epoch estimates; sampling keeps dormant seeds nearly free).  It
accumulates per chunk on ``h``'s device with no host sync: the sums of ``h`` and ``h**2``,
the count of non-zeros and of ``|h| >= threshold`` (per channel, then folded into chunks by
one matmul with a ``[channels, chunks]`` membership matrix), and per batch
``||dL/dh_chunk||^2`` from a tensor hook.  Per-batch sums are float32, the epoch
accumulators float64 so element counts stay exact.  ``flush_telemetry`` reads everything
with one transfer and resets.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from tolaria.config import KasminaConfig
from tolaria.contracts import SeedTelemetry
from tolaria.errors import ConfigError
from tolaria.kasmina.seed import KasminaSeed

#: Rows of the activation accumulator.
_SUM, _SUM_SQ, _NONZERO, _SATURATED = range(4)


class KasminaLayer(nn.Module):
    """One seed per chunk of a host module's output (``seeds``), plus their telemetry."""

    def __init__(self, module_fqn: str, config: KasminaConfig) -> None:
        super().__init__()
        self.module_fqn = module_fqn
        self.telemetry = config.telemetry
        self.saturation_threshold = config.saturation_threshold
        self.interval = config.telemetry_interval
        #: Per float dtype, the largest value below the threshold (see ``_observe``).
        self._below_threshold = {
            dtype: float(np.nextafter(np_type(config.saturation_threshold), np_type(0)))
            for dtype, np_type in ((torch.float32, np.float32), (torch.float64, np.float64))
        }
        #: Set while counterfactual evaluation runs, so it never counts as training telemetry.
        self.paused = False
        self.seeds = nn.ModuleList(
            KasminaSeed(f"{module_fqn}.{i}", config) for i in range(config.chunks)
        )
        for seed in self.seeds:
            # A plain attribute, not a submodule: the tree stays a tree, and deepcopy's memo
            # points the copy's seeds at the copied layer.
            object.__setattr__(seed, "_layer", self)
        #: Whether any seed holds a blueprint; kept by the seeds, read on every forward.
        self.grafted = False
        #: The host module's input of the forward now running, left by a pre-hook
        #: (``_kasmina_input_hook``, see ``sync_input_hook``) and taken by ``forward``.
        self.block_input: torch.Tensor | None = None
        self.channels: int | None = None
        self._widths: list[int] = []
        self._split_points: tuple[int, ...] = ()
        self._reduce_dims: tuple[int, ...] = (0,)
        self._row_dims: tuple[int, ...] = (1,)
        # Plain tensors, not buffers: model.half() must not shrink float64 accumulators.
        self._membership = torch.empty(0, dtype=torch.float64)
        self._activation_sums = torch.empty(0, dtype=torch.float64)
        self._grad_sq_sums = torch.empty(0, dtype=torch.float64)
        self._scratch = torch.empty(0)
        self._samples = 0
        self._positions = 0
        #: Processes whose slices make each batch (``add_up_telemetry``): a rank's loss, the
        #: mean over its slice, weighs each sample this many times the whole batch's.
        self._replicas = 1
        self._grad_batches = 0
        self._batches = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.block_input
        if x is not None:  # never held past its forward (written only then: setting an
            self.__dict__["block_input"] = None  # nn.Module attribute costs a microsecond)
        if self.channels is None:
            self._bind(h, x)
        if self.training and self.telemetry and not self.paused:
            self._observe(h)
        if not self.grafted:
            return h
        seeds = self.seeds
        chunks = torch.tensor_split(h, self._split_points, dim=1)
        return torch.cat(
            [
                chunk if seed.blueprint is None else seed(chunk, x)
                for seed, chunk in zip(seeds, chunks, strict=True)
            ],
            dim=1,
        )

    def refresh_grafted(self) -> None:
        self.grafted = any(seed.blueprint is not None for seed in self.seeds)
        self.sync_input_hook()

    def sync_input_hook(self) -> None:
        """Keep the pre-hook that leaves the host module's input for this layer exactly
        while something reads it: the first forward (which learns the input's shape, so
        ``widen`` can be priced) and any seed holding a ``reads_input`` blueprint.  A hook
        puts the module on PyTorch's slower call path, measurable on small layers."""
        module = self.__dict__.get("_host")
        if module is None:
            return
        wanted = self.channels is None or any(seed.reads_input for seed in self.seeds)
        keep_input_hook(module, wanted)
        if not wanted:
            self.block_input = None

    def flush_telemetry(self, epoch: int) -> list[SeedTelemetry]:
        """This epoch's record for each seed, in chunk order (one device read); then reset.

        Statistics and ``samples`` cover the sampled training batches.  Empty when
        telemetry is off or the layer has never run.
        """
        if not self.telemetry or self.channels is None:
            return []
        values = torch.cat((self._activation_sums.flatten(), self._grad_sq_sums)).cpu().tolist()
        k = len(self.seeds)
        rows = [values[r * k : (r + 1) * k] for r in range(4)]
        grad_sq = values[4 * k :]
        elements = self._positions * sum(self._widths)
        layer_rms = math.sqrt(sum(rows[_SUM_SQ]) / elements) if elements else 0.0
        records = []
        for i, seed in enumerate(self.seeds):
            self._set_pull(seed, rows[_SUM_SQ][i], grad_sq[i])
            n = self._positions * self._widths[i]
            mean = rows[_SUM][i] / n if n else 0.0
            var = max(rows[_SUM_SQ][i] / n - mean * mean, 0.0) if n else 0.0
            records.append(
                SeedTelemetry(
                    seed_id=seed.seed_id,
                    epoch=epoch,
                    samples=self._samples,
                    activation_mean=mean,
                    activation_var=var,
                    dead_fraction=1.0 - rows[_NONZERO][i] / n if n else 0.0,
                    saturated_fraction=rows[_SATURATED][i] / n if n else 0.0,
                    grad_norm=math.sqrt(grad_sq[i] / self._grad_batches)
                    if self._grad_batches
                    else 0.0,
                    delta_ratio=seed.flush_delta_ratio(layer_rms),
                )
            )
        self._reset_telemetry(self._activation_sums.device)
        return records

    def _set_pull(self, seed: KasminaSeed, h_sq: float, g_sq: float) -> None:
        """``seed.pull = rms(g) / (ratio * rms(h))`` of its chunk over this epoch's sampled
        batches (both RMS over the same elements: the counts cancel), in the loss scale of
        this process (``_replicas`` times the single process's under DDP)."""
        if self._grad_batches and h_sq > 0:
            seed.pull = self._replicas * math.sqrt(g_sq / h_sq) / seed.target_delta_ratio

    def add_up_telemetry(
        self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor], replicas: int
    ) -> None:
        """Make this epoch's telemetry that of every rank's batches, before a flush reads it
        (one all-reduce through ``sum_over_ranks``).

        Each of the ``replicas`` ranks saw its slice of every sampled batch, so sums and
        counts add up, while the batch counters are the same on every rank and stay.  A
        rank's loss is the mean over its slice -- ``replicas`` times the weight each sample
        has in the whole batch -- so its activation gradients are ``replicas`` times the
        single process's: their squared norms are divided by ``replicas ** 2``.
        """
        if not self.telemetry or self.channels is None:
            return
        self._replicas = replicas
        device = self._activation_sums.device
        held = [seed._delta_energy for seed in self.seeds]
        energies = [torch.zeros(2, dtype=torch.float64, device=device) if e is None else e
                    for e in held]
        counts = [self._samples, self._positions, *(float(e is not None) for e in held)]
        total = sum_over_ranks(torch.cat((
            self._activation_sums.flatten(),
            self._grad_sq_sums / replicas**2,
            torch.tensor(counts, dtype=torch.float64, device=device),
            *energies,
        )))
        k = len(self.seeds)
        activation, grad_sq, counts, energy = total.split([4 * k, k, 2 + k, 2 * k])
        self._activation_sums = activation.view(4, k).clone()
        self._grad_sq_sums = grad_sq.clone()
        counts = counts.tolist()
        self._samples, self._positions = int(counts[0]), int(counts[1])
        for seed, trained, pair in zip(self.seeds, counts[2:], energy.view(k, 2), strict=True):
            seed._delta_energy = pair.clone() if trained else None

    # -- internals -------------------------------------------------------------------

    def _bind(self, h: torch.Tensor, x: torch.Tensor | None) -> None:
        """Learn the channel layout from the first output; give each seed its chunk shape,
        and the shape of the module's input ``x`` (None: unknown, nothing reads it)."""
        if not isinstance(h, torch.Tensor) or h.dim() < 2:
            got = f"shape {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
            raise ConfigError(
                f"kasmina.layers: {self.module_fqn!r} outputs {got}; seeds need a tensor "
                "[batch, channels, ...]"
            )
        channels, k = h.shape[1], len(self.seeds)
        if channels < k:
            raise ConfigError(
                f"kasmina.chunks={k}: {self.module_fqn!r} has only {channels} output channels"
            )
        widths = [len(c) for c in torch.arange(channels).tensor_split(k)]
        for seed, width in zip(self.seeds, widths, strict=True):
            shape = (width, *h.shape[2:])
            if seed.chunk_shape is not None and seed.chunk_shape != shape:
                raise ConfigError(
                    f"seed {seed.seed_id}: recorded chunk shape {seed.chunk_shape} but the "
                    f"host gives {shape}"
                )
            seed.chunk_shape = shape
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                seed.input_shape = tuple(x.shape[1:])
        self.channels, self._widths = channels, widths
        self.sync_input_hook()  # the input's shape is known now: keep the hook only if read
        self._split_points = tuple(itertools.accumulate(widths[:-1]))
        self._reduce_dims = (0, *range(2, h.dim()))
        self._row_dims = tuple(d + 1 for d in self._reduce_dims)
        self._reset_telemetry(h.device)

    # The first forward may be a validation pass: accumulators made there would be
    # inference tensors that training could never update in place.
    @torch.inference_mode(False)
    def _reset_telemetry(self, device: torch.device) -> None:
        k = len(self.seeds)
        if self._membership.device != device or self._membership.numel() == 0:
            owner = torch.repeat_interleave(torch.arange(k), torch.tensor(self._widths))
            membership = torch.nn.functional.one_hot(owner, k).to(torch.float64)
            self._membership = membership.to(device)
            self._membership_t = self._membership.t().contiguous()
        self._activation_sums = torch.zeros(4, k, dtype=torch.float64, device=device)
        self._grad_sq_sums = torch.zeros(k, dtype=torch.float64, device=device)
        self._samples = self._positions = self._grad_batches = self._batches = 0

    def _observe(self, h: torch.Tensor) -> None:
        """Accumulate one training batch's statistics, if this batch is sampled.

        Only float ops on ``h`` (bool comparisons and ``count_nonzero`` are several times
        slower on CPU): non-zeros are ``sum sign(|h|)``; ``|h| >= t`` is ``|h| > t_below``,
        counted as ``sum sign(threshold(|h|, t_below, 0))``, with ``t_below`` the largest
        float of ``h``'s dtype under ``t``: exact, as no such float lies between the two.
        On CPU the cost is per op, not per element, so the four statistics share one
        reused scratch buffer and one reduction.
        """
        sampled = self._batches % self.interval == 0
        self._batches += 1
        if not sampled:
            return
        if h.device != self._membership.device:  # the model moved: start this epoch afresh
            self._reset_telemetry(h.device)
        x = h.detach()
        if x.dtype not in self._below_threshold:
            x = x.float()
        # Rows of one [4, *x.shape] buffer: x, x^2, |x| -> sign, |x| -> threshold -> sign;
        # then a single reduction gives all four per-channel sums.
        rows = self._scratch_like(x, 4)
        rows[_SUM].copy_(x)
        torch.mul(x, x, out=rows[_SUM_SQ])
        counts = rows[_NONZERO:]
        torch.abs(x.expand_as(counts), out=counts)
        torch.threshold_(rows[_SATURATED], self._below_threshold[x.dtype], 0)
        counts.sign_()
        per_channel = rows.sum(self._row_dims)
        self._activation_sums.addmm_(per_channel.double(), self._membership)
        self._samples += x.shape[0]
        self._positions += x.numel() // self.channels
        if h.requires_grad:
            h.register_hook(self._observe_grad)

    def _observe_grad(self, g: torch.Tensor) -> None:
        if g.dtype not in self._below_threshold:
            g = g.float()
        sum_sq = torch.mul(g, g, out=self._scratch_like(g, 1)[0]).sum(self._reduce_dims)
        self._grad_sq_sums.addmv_(self._membership_t, sum_sq.double())
        self._grad_batches += 1

    def _scratch_like(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """A ``[rows, *x.shape]`` view of a buffer kept across batches (grown, never shrunk)."""
        size = rows * x.numel()
        if self._scratch.numel() < size or (self._scratch.dtype, self._scratch.device) != (
            x.dtype,
            x.device,
        ):
            self._scratch = torch.empty(size, dtype=x.dtype, device=x.device)
        return self._scratch[:size].view(rows, *x.shape)


def _kasmina_forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # Module-level and looked up by name so copy.deepcopy(model) keeps a working hook.
    return module.kasmina(output)


def _kasmina_input_hook(module: nn.Module, args: tuple) -> None:
    # A pre-hook, so that an nn.Sequential's appended layer sees the block's input too.
    module.kasmina.block_input = args[0] if args else None


def keep_input_hook(module: nn.Module, wanted: bool) -> None:
    """Register ``module``'s input pre-hook if ``wanted`` and absent; remove it if present
    and not (``KasminaLayer.sync_input_hook``; a folded model follows the same rule)."""
    hooks = module._forward_pre_hooks
    present = [key for key, hook in hooks.items() if hook is _kasmina_input_hook]
    if wanted and not present:
        module.register_forward_pre_hook(_kasmina_input_hook)
    for key in present if not wanted else ():
        del hooks[key]


def inject_seeds(model: nn.Module, config: KasminaConfig) -> list[KasminaLayer]:
    """Attach a ``KasminaLayer`` named ``kasmina`` to every module matching ``config.layers``.

    Patterns are ``fnmatch`` globs on fully qualified names (``*`` crosses dots), and only
    the outermost match of a subtree is instrumented: ``hidden.*`` picks the blocks
    ``hidden.0``, ``hidden.1``, not also the layers inside them.  The host's own parameter
    names do not change.  A pattern matching no module is a ``ConfigError``.  On an
    ``nn.Sequential`` the layer is its last child and needs no hook.
    """
    candidates = [(name, module) for name, module in model.named_modules() if name]
    reference = next(itertools.chain(model.parameters(), model.buffers()), None)
    matched_patterns: set[str] = set()
    skip: list[str] = []
    layers = []
    for name, module in candidates:
        if isinstance(module, KasminaLayer):
            skip.append(name)
        hits = [p for p in config.layers if fnmatch.fnmatchcase(name, p)]
        matched_patterns.update(hits)
        if not hits or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if "kasmina" in module._modules:
            raise ConfigError(f"kasmina.layers: {name!r} already has Kasmina seeds")
        layer = KasminaLayer(name, config)
        own = next(itertools.chain(module.parameters(), module.buffers()), reference)
        if own is not None:
            layer.to(device=own.device, dtype=own.dtype if own.is_floating_point() else None)
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            raise ConfigError(f"kasmina.layers: {name!r} is a container without a forward")
        module.add_module("kasmina", layer)
        # A plain attribute, as the seeds' ``_layer``: deepcopy's memo points a copied layer
        # at the copied module.
        object.__setattr__(layer, "_host", module)
        layer.sync_input_hook()
        # nn.Sequential runs every child in order, so there the appended layer already
        # sees the output; a hook as well would apply it twice.
        if type(module).forward is not nn.Sequential.forward:
            module.register_forward_hook(_kasmina_forward_hook)
        layers.append(layer)
        skip.append(name)
    unmatched = [p for p in config.layers if p not in matched_patterns]
    if unmatched:
        names = [n for n, _ in candidates if ".kasmina" not in n and not n.startswith("kasmina")]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ConfigError(
            f"kasmina.layers: {', '.join(map(repr, unmatched))} match no module of "
            f"{type(model).__name__} (modules: {shown})"
        )
    return layers


def find_seeds(model: nn.Module) -> list[KasminaSeed]:
    """Every seed of ``model`` in module order, then chunk order."""
    return [seed for m in model.modules() if isinstance(m, KasminaLayer) for seed in m.seeds]


def collect_telemetry(seeds: Iterable[KasminaSeed], epoch: int) -> dict[str, SeedTelemetry]:
    """Flush the layers holding ``seeds`` (each once) and return their records by seed id."""
    layers = {id(seed.layer): seed.layer for seed in seeds}
    return {r.seed_id: r for layer in layers.values() for r in layer.flush_telemetry(epoch)}


def bind_chunks(model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """One forward pass on ``sample`` in eval mode, without gradients, telemetry or draws
    from the global RNG: every seed learns its chunk shape before training, so a layout
    that cannot work (more chunks than channels) is found now, and every seed's blueprints
    can be priced.  Returns the model's output (what the task's loss will see)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return model(sample)
    finally:
        model.train(was_training)
