"""Shared-weight trial groups: several Phase 2 trials in one process over one frozen LLM.

A sweep's trials differ only in what they train (projector, LoRA adapter) and how (LRs,
warmup, clipping, seed, batch size); the LLM under them is frozen and the same. Loading it
once and batching the trials' rows through it is the idea of HFTA (Wang et al., arXiv
2102.02344) and of ASPEN (Ye et al., arXiv 2312.02515: many LoRA jobs over one shared base
model, each row routed to its own adapter).

How one group step works (`TrialGroup.step`):
  * every active member draws its own micro-batch (its seed's epoch order, its batch size);
  * the rows are concatenated (`trainer.rows`; text right-padded to the longest: with
    causal attention right padding changes nothing at the real positions), each member's
    prefix coming from its own projector;
  * ONE forward through the shared LLM, every LoRA layer adding each row block's own
    adapter (`trainer.multilora`);
  * a loss per member over ITS target tokens only (`trainer.model.target_losses`, the
    function a solo run's `target_loss` calls), and one backward of their sum. The
    members' parameters are disjoint and their rows independent, so each member's
    gradient is its solo gradient, and a NaN in one member's rows stays in that member;
  * then per member the solo run's own optimizer step (`trainer.step.optimizer_step`) and
    bookkeeping (`trainer.loop.finish_step`: policy, record, eval, checkpoint).

Each member is a solo `Run` around a `MemberView` (`trainer.group_member`): a
`Phase2Model` whose parameters are named exactly as in a solo run (its adapter shows up as
peft's "default"), so a member's checkpoints and `trainable.safetensors` load into a solo
model, and a solo `--resume` can continue a group member (and vice versa).

Exactness: with LoRA and projector dropout at 0 a member trains as the same config
trained alone, up to float rounding (tests/test_group.py pins this). With dropout > 0
the masks come from the one process RNG stream that every member draws from in turn, so
group losses match solo runs in distribution, not bit for bit (set PYTHONHASHSEED for
run-to-run repeatability: peft's layers draw the members' masks in the string-hash order
of the adapter names); for the same reason a member's resume does not restore the RNG
state saved in its checkpoint.

Requirements (`trainer.group_rules`): the feature cache, one value per group of
everything the shared forward fixes, no LoRA on the token embedding or the LM head. With
`model.compile` the shared forward is compiled (CUDA graphs over all members' rows; the
optimizer steps stay eager, with the device guard, read back together once per window)
over K fixed slots (`slots`, the group's capacity): the members' LoRA weights are rows of
one stacked tensor (`trainer.multilora.LoraStacks`: one gradient for the whole group, all
members' LoRA norms and clipping in one kernel each), every slot runs as many rows, and an
empty slot is masked (`_seat`, `_slot_parts`), so a member leaving or joining changes no
shape and compiles nothing (docs/shared-group.md says what an empty slot costs). Anything
raised inside a step ends the whole group, as it would end a solo run's process; every
member then resumes from its own checkpoints.

Over 600 lines because `TrialGroup`, about 540 of them, is one object: its membership,
the shared forward/backward and its members' read-back windows all act on the same routed
layers, stacks and compiled graph. What stands apart from it lives elsewhere: the shared
forward over the members' rows in `trainer.rows`, the member classes in
`trainer.group_member`.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import nn

from trainer.compile_cache import CompileCache, artifact_key
from trainer.compile_guards import GuardSkip
from trainer.compile_scope import compile_forward
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, place_features, to_device
from trainer.errors import ConfigError
from trainer.group_member import Member, MemberView
from trainer.group_rules import group_problems, io_lora_problems
from trainer.inputs import Inputs, prepare_inputs
from trainer.llm import prepare_llm
from trainer.loop import WINDOW_MAX_S, StepTally, flush_window, scale_for_backward
from trainer.metrics import MetricsSink, RunSummary
from trainer.model import (
    Projector,
    cast_untargeted_linears,
    load_llm,
    lora_config,
    low_precision_dtype,
)
from trainer.multilora import (
    LoraStacks,
    adapter_of,
    route_blocks,
    vanilla_lora_layers,
)
from trainer.plan import needs_host
from trainer.rows import Rows, rows_losses, stacked_rows_losses
from trainer.run import (
    AfterBackward,
    assemble_run,
    close_run,
    debug_hook,
    frozen_dtype,
    open_sinks,
    prepare_run_dir,
    resolve_device,
    resolved_params,
    restore_state,
    seed_everything,
)
from trainer.step import (
    DeviceGuard,
    Measured,
    PendingStep,
    State,
    clip_grads,
    group_norm,
    measure,
    read_back,
)


class TrialGroup:
    """Phase 2 trials training together over one frozen LLM; see the module docstring."""

    def __init__(self, inputs: Inputs, device: str | None = None, log: Callable = print,
                 slots: int | None = None, compile_cache: Path | None = None) -> None:
        """`slots`: the group's capacity K, the trials it holds at once (a sweep's
        `max_concurrent_trials`); a compiled group's forward always runs K slots, so members
        joining and leaving never change its shapes (None: as many as the members present
        at the first compiled step). `compile_cache`: a directory where the compiled
        slots' artifacts are kept (`trainer.compile_cache`): loaded before the slots'
        first compile, saved after it, so the next group of the same shapes starts warm."""
        self.inputs = inputs
        self.slots = slots
        self.compile_cache_dir = compile_cache
        self.compile_cache: CompileCache | None = None  # the current slots' artifacts
        self._cache_open = False  # the slots were (re)built: their artifacts to load
        self._cache_save = False  # their first step compiled: artifacts to save
        self.device = resolve_device(device)
        self.log = log
        self.members: dict[str, Member] = {}
        self._ref: TrainConfig | None = None  # the first member's config: the group's keys
        self._lm: nn.Module | None = None  # the CausalLM, loaded once at the first member
        self._peft: nn.Module | None = None  # the peft wrapper holding every member's adapter
        self._tokenizer = None
        self._next_adapter = 0
        self.member_steps = 0  # optimizer steps trained, summed over members (for stats)
        self.sync_s = 0.0  # time spent waiting in read-backs (for stats)
        self._live_adapters: set[str] = set()  # adapters whose LoRA weights must train
        self._compiled: Callable[..., list[torch.Tensor]] | None = None  # model.compile
        self._routed: tuple[tuple[str, int], ...] | None = None  # blocks route_blocks set
        self._routed_layers: list[nn.Module] | None = None  # their layers (None: per-row)
        self._stacks: LoraStacks | None = None  # the routed make-up's stacked LoRA weights
        self._guard_skip: GuardSkip | None = None  # compiled, model.skip_compile_guards
        self._routings = 0  # how many times the LoRA layers were routed (make-up changes)
        self._makeups = 0  # members seated or unseated in the slots (for the guard skip)
        self._slotted = False  # the routing is over fixed slots (`_seat`), not the make-up
        self._slot_rows = 0  # rows per slot: the largest batch size of the seated members
        self._fillers: list[Projector] = []  # per slot: the projector of its empty rows
        # Per slot: the storage its projector's parameters live in, whoever holds it
        # (`_bind_projector`), so a CUDA-graph forward finds them at the same addresses.
        self._slot_weights: list[list[torch.Tensor]] = []
        self._filler_rows: dict[int, Rows] = {}  # per slot: its empty rows, made once
        self._device_features: dict[tuple[str, ...], torch.Tensor] = {}  # by split rows

    @property
    def compiled(self) -> bool:
        """Whether the shared forward is compiled."""
        return self._compiled is not None

    @property
    def fixed_slots(self) -> bool:
        """Whether a member joining or leaving keeps the compiled graph (the forward runs
        over fixed slots; False before the first compiled step, and for members whose
        LoRA layers cannot be stacked, whose every make-up is a graph of its own)."""
        return self._compiled is not None and self._slotted

    @property
    def llm(self) -> nn.Module | None:
        """The shared peft-wrapped LLM holding every member's adapter (None before the first)."""
        return self._peft

    # ------------------------------------------------------------------ membership

    def add_member(self, member_id: str, cfg: TrainConfig, sink: MetricsSink | None = None, *,
                   resume: bool = False, after_backward: AfterBackward | None = None,
                   console: bool = False, source: str = "config",
                   report_due: Callable[[int], bool] | None = None) -> None:
        """Start (or with `resume`, continue) one trial in the group, as `train()` would.

        `report_due(n)`: whether the member's n-th record from now is one its consumer must
        see before the member trains on (a Tune trial's report, where ASHA may stop it);
        the member's read-back window then ends at that step, so it never trains past it.
        """
        if member_id in self.members:
            raise ValueError(f"trial group already has a member {member_id!r}")
        problems = group_problems(self._ref, cfg, self.inputs, source)
        if problems:
            raise ConfigError(problems)
        t0 = time.perf_counter()
        self.load_shared_llm(cfg, source)
        train_split, eval_split, plan, run_dir = prepare_run_dir(
            cfg, self.inputs, self._tokenizer, resume=resume, source=source)
        # Every member trains on the same split (one data config per group): one copy.
        train_split = place_features(train_split, self.device, cfg.data.features_on_device,
                                     self._device_features)
        features = train_split.features
        adapter = f"member{self._next_adapter}"  # peft names must be plain identifiers
        self._next_adapter += 1
        view = self._new_view(cfg, adapter, features.shape[-1])
        try:
            run = assemble_run(cfg, plan, view, train_split, eval_split, None, self.device,
                               run_dir, features.shape[1], self.log)
            run.after_backward = debug_hook(cfg, after_backward)
            state = restore_state(run, self.log, restore_rng=False) if resume else State()
            out = open_sinks(run, state, sink, resume=resume, console=console,
                             console_prefix=f"[{member_id}] ")
        except BaseException:
            self._delete_adapter(adapter)
            raise
        out.log_params(resolved_params(cfg, plan))
        guard = (DeviceGuard.start(cfg.phase2, state, self.device) if run.device_guard
                 else None)
        self.members[member_id] = Member(member_id, adapter, run, state, out, t0,
                                         time.perf_counter(), guard, report_due)

    def load_shared_llm(self, cfg: TrainConfig, source: str = "config") -> None:
        """Load the frozen LLM the members share onto the device (and set up its compiled
        forward), once; `cfg` (the first member's, or the sweep's base config: they agree
        on every shared key) fixes the group's shared keys. A sweep's group actor calls it
        as it starts, so the load overlaps the trial processes' start; else the first
        member's join does."""
        if self._lm is not None:
            return
        tokenizer = prepare_llm(self.inputs.llm_dir, cfg.model.lora, source, self.log)
        lm = load_llm(self.inputs.llm_dir, cfg.model.attn_implementation, str(self.device))
        cast_untargeted_linears(lm, cfg.model.lora.target_modules, frozen_dtype(cfg))
        problems = io_lora_problems(lm, cfg, source)
        if problems:
            raise ConfigError(problems)
        self._lm, self._tokenizer = lm, tokenizer
        self._ref = cfg.model_copy(deep=True)  # what the loaded LLM was loaded with
        if cfg.model.compile != "off":
            # One compiled forward (and, with reduce-overhead, one CUDA graph) for the
            # group's slots: batches keep the split's full length and a fixed target
            # capacity, and the slots fix the rows (`_seat`).
            self._compiled = compile_forward(stacked_rows_losses, lm, cfg.model.compile,
                                             cfg.model.compile_scope)
            if cfg.model.skip_compile_guards:
                self._guard_skip = GuardSkip()

    def remove_member(self, member_id: str, end_reason: str = "stopped") -> RunSummary:
        """End a member from outside (e.g. an ASHA stop): weights, summary, memory freed.
        Its steps not read back yet are finished first (the weights already hold them);
        should one of them end the run, that is the summary's end reason."""
        m = self.members[member_id]
        if m.pending:
            ended = self._flush([m])
            if member_id in ended:
                return ended[member_id]
        return self._close(m, end_reason)

    # ------------------------------------------------------------------ training

    def step(self, only: Collection[str] | None = None) -> dict[str, RunSummary]:
        """One optimizer step of every active member (or of the members in `only`; the
        others wait, e.g. while their reports are unread); the summaries of those that
        ended.

        Members with the device guard are read back a window at a time, as a solo run is
        (`output.sync_every`, WINDOW_MAX_S, and at once at steps the host must see or
        that `report_due` names): all of them together, so a window costs the whole group
        one sync. Their records arrive at the window's end."""
        finished = {}
        for m in [m for m in self.members.values() if m.state.step >= m.run.plan.total_steps]:
            finished[m.member_id] = self._close(m, "completed")  # resumed at its last step
        active = [m for m in self.members.values() if only is None or m.member_id in only]
        if not active:
            return finished
        self.member_steps += len(active)
        for m, pending in zip(active, self._train_step(active), strict=True):
            if pending.row is None:  # the device guard: read back with its window
                m.pending.append(pending)
                continue
            # The host guard's step is read back already (such a member never has steps
            # pending): its record at once.
            now = time.perf_counter()
            dt, m.t_last = max(now - m.t_last, 1e-9), now
            end_reason = flush_window(m.run, m.state, [pending], [pending.row], m.sink, dt)
            if end_reason is not None:
                finished[m.member_id] = self._close(m, end_reason)
        if any(self._window_due(m) for m in self.members.values() if m.pending):
            finished.update(self._flush([m for m in self.members.values() if m.pending]))
        return finished

    def _window_due(self, m: Member) -> bool:
        n = len(m.pending)
        return (n >= m.run.sync_every or needs_host(m.run.plan, m.run.cfg.output,
                                                         m.pending[-1].step)
                or (m.report_due is not None and m.report_due(n))
                or time.perf_counter() - m.t_last >= WINDOW_MAX_S)

    def _flush(self, members: list[Member]) -> dict[str, RunSummary]:
        """Read back every launched step of `members` in one transfer, then finish each
        member's window in step order (`trainer.loop.flush_window`); who ended."""
        t0 = time.perf_counter()
        rows = read_back([p for m in members for p in m.pending])  # the one sync
        # How long the host waited for the device: most of a step when the device is the
        # bottleneck, near 0 when the host is, or when the host blocks in its launches
        # instead (a full GPU queue under CUDA graphs).
        self.sync_s += time.perf_counter() - t0
        now = time.perf_counter()
        finished, start = {}, 0
        for m in members:
            n = len(m.pending)
            dt, m.t_last = max(now - m.t_last, 1e-9) / n, now  # per step, window mean
            pending, m.pending = m.pending, []
            end_reason = flush_window(m.run, m.state, pending, rows[start : start + n],
                                      m.sink, dt)
            start += n
            if end_reason is not None:
                finished[m.member_id] = self._close(m, end_reason)
        return finished

    def _train_step(self, active: list[Member]) -> list[PendingStep]:
        """Shared forward/backward over every member's micro-batches, then each one's
        optimizer step (`trainer.step.optimizer_step`, the solo runs' own): launched for
        members with the device guard (nothing read back), read back for the others."""
        # A member's steps not read back yet are not in its State.
        steps = [(m.pending[-1].step if m.pending else m.state.step) + 1 for m in active]
        accum = self._ref.phase2.gradient_accumulation_steps  # one value per group
        tallies = [StepTally(torch.zeros((), device=self.device), accum) for _ in active]
        static = self._route(active)  # compiled: the LoRA routing is set (slots or make-up)
        if self._stacks is None:
            for m in active:
                m.run.optimizer.zero_grad(set_to_none=True)
        else:  # the LoRA gradients are views of the stacks' gradients, zeroed in place
            for m in active:
                for p in m.run.groups["projector"]:
                    p.grad = None
            for filler in self._fillers:  # empty slots' gradients: computed, never used
                filler.zero_grad(set_to_none=True)
            self._stacks.zero_grads()
        dev = self.device
        for j in range(accum):
            batches = [m.run.train.batch(m.run.micro_batch(s - 1, j), trim=not static)
                       for m, s in zip(active, steps, strict=True)]
            # Labels stay on the CPU, as in a solo run (no sync in the loss); a compiled
            # forward takes them on the device (static targets, no CPU tensor in the graph).
            parts = [Rows(m.run.model.projector, m.adapter,
                          *(to_device(b[k], dev) for k in ("features", "input_ids")),
                          to_device(b["labels"], dev) if static else b["labels"])
                     for m, b in zip(active, batches, strict=True)]
            with active[0].run.autocast():  # one precision per group
                if static and self._slotted:
                    slotted = self._slot_parts(active, parts)
                    if self._cache_open:
                        self._open_compile_cache(slotted)
                    with self._skip_guards(slotted, active):
                        out = self._compiled(self._peft, slotted, self._stacks)
                    # An empty (or waiting) slot's loss is left out of the sum below: its
                    # rows get no gradient and reach no member.
                    losses = [out[m.slot] for m in active]
                elif static:
                    with self._skip_guards(parts, active):
                        losses = self._compiled(self._peft, parts, self._stacks)
                else:
                    losses = rows_losses(self._peft, parts)
            # Members' parameters are disjoint: the gradient of the sum w.r.t. a member's
            # parameters is the gradient of its own loss (its own fp16 scale included).
            total = sum(scale_for_backward(m.run, loss)
                        for m, loss in zip(active, losses, strict=True))
            total.backward()
            for m, tally, b, loss in zip(active, tallies, batches, losses, strict=True):
                tally.add(m.run, b, loss)
        if self._cache_save:  # forward and backward have compiled: keep what they made
            self._cache_save = False
            try:
                self.compile_cache.save()
            except OSError as e:  # a full or read-only store costs the next start, not this
                self.log(f"[group] warning: compiled artifacts not saved: {e}")
        measured: list[Measured | None] = [None] * len(active)
        if self._stacks is not None and all(m.guard is not None for m in active):
            measured = self._measure_stacked(active, tallies, steps)
        return [tally.step(m.run, m.guard, s, mk) for m, tally, s, mk
                in zip(active, tallies, steps, measured, strict=True)]

    def _measure_stacked(self, active: list[Member], tallies: list[StepTally],
                         steps: list[int]) -> list[Measured]:
        """The fault hooks, norms and clipping of device-guarded members on stacked LoRA
        weights, for all of them at once: every member's LoRA gradient norm in one
        reduction and their clipping in one multiply (per member, those are a launch per
        LoRA tensor: host time that bounds a group step). Each member's `Measured` then
        goes to its own optimizer step."""
        slots = [self._stacks.adapters.index(m.adapter) for m in active]  # their rows
        for m, s in zip(active, steps, strict=True):
            if m.run.after_backward is not None:  # may change gradients: before the norms
                m.run.after_backward(s, m.run.model)
        lora = self._stacks.member_norms()
        measured = [measure(m.run.parts.clip, t.loss,
                            [group_norm(m.run.parts, "projector"), lora[k]])
                    for k, m, t in zip(slots, active, tallies, strict=True)]
        if any(mk.factor is not None for mk in measured):
            one = torch.ones((), device=self.device)
            factors = [one] * len(self._stacks.adapters)  # slots not stepped: unscaled
            for k, mk in zip(slots, measured, strict=True):
                if mk.factor is not None:
                    factors[k] = mk.factor
            self._stacks.scale_grads(torch.stack(factors))
            for m, mk in zip(active, measured, strict=True):
                clip_grads(m.run.parts.grads(("projector",)), mk.factor)
        return measured

    # ------------------------------------------------------------------ internals

    def _route(self, active: list[Member]) -> bool:
        """For a compiled group, route every LoRA layer: to fixed slots (`_seat`), else to
        the active members' row blocks, once per make-up (not per step); whether the
        compiled forward applies (False: not compiled, or a layer needs peft's per-row
        path, which runs eager)."""
        if self._compiled is None:
            return False
        if self._seat():
            return True
        # Every micro-batch of a member holds exactly batch_size rows (plan_steps drops
        # incomplete ones), so the make-up fixes the blocks.
        blocks = tuple((m.adapter, m.run.plan.batch_size) for m in active)
        if blocks != self._routed:
            # A new make-up is a new graph (its routing objects and stacks are new, and
            # the old ones never come back: adapter names are not reused). Drop the old
            # graphs first: Dynamo keeps at most `recompile_limit` (8) per function and
            # then runs it eagerly for good, which a sweep's ninth make-up would reach,
            # and their CUDA graphs hold memory. Inductor's on-disk cache is kept.
            torch.compiler.reset()
            self._routings += 1
            self._unstack()
            adapters = [a for a, _ in blocks]
            self._routed_layers = vanilla_lora_layers(self._peft, adapters)
            if self._routed_layers is not None:
                if LoraStacks.stackable(self._routed_layers, adapters, [n for _, n in blocks]):
                    self._stacks = LoraStacks(self._routed_layers, adapters,
                                              low_precision_dtype(self._ref.phase2.precision))
                route_blocks(self._routed_layers, blocks, self._stacks)
            self._routed = blocks
        return self._routed_layers is not None

    def _seat(self) -> bool:
        """Give every member a slot of the LoRA stacks, so that the compiled forward runs
        over the same K slots of the same rows whoever holds them (one graph for the
        group's life); whether it could (False: some member's LoRA layers need peft's own
        path, or their shapes differ: the forward then routes each make-up).

        A new member takes a free slot. The slots are (re)built, which compiles, only at
        the first compiled step, when no slot is free (more members than `slots`), or
        when a member does not fit them (a larger batch, another LoRA rank).
        """
        members = list(self.members.values())
        st = self._stacks
        if self._slotted and st is not None:
            new = [m for m in members if m.slot is None]
            free = st.free_slots()
            if len(new) <= len(free) and all(
                    m.run.plan.batch_size <= self._slot_rows and st.fits(m.adapter)
                    and self._projector_fits(m) for m in new) and vanilla_lora_layers(
                        self._peft, [m.adapter for m in new]) is not None:
                for m, k in zip(new, free, strict=False):
                    st.attach(k, m.adapter)
                    self._bind_projector(k, m)
                self._makeups += bool(new)
                return True
        adapters = [m.adapter for m in members]
        layers = vanilla_lora_layers(self._peft, adapters)
        rows = max(m.run.plan.batch_size for m in members)
        if layers is None or not LoraStacks.stackable(layers, adapters, [rows] * len(members),
                                                      single=True):
            return False
        torch.compiler.reset()  # the old slots' graph never comes back
        self._routings += 1
        self._unstack()
        k = max(self.slots or 0, len(members))
        if self.slots is not None and k > self.slots:
            self.log(f"[group] {len(members)} members for {self.slots} slots: "
                     f"rebuilding {k} slots (a new graph)")
        self._stacks = LoraStacks(layers, adapters,
                                  low_precision_dtype(self._ref.phase2.precision), slots=k)
        self._slot_rows, self._routed_layers = rows, layers
        # Each slot's projector weights live in storage of the slot's own, zero while it
        # is empty; each empty slot runs its own copy of a projector over it (distinct
        # objects: one shared by several slots would be an aliased graph input, another
        # graph), with the members' module attributes (dropout, train mode) Dynamo guards.
        like = members[0].run.model.projector
        self._slot_weights = [[torch.zeros_like(q) for q in like.parameters()]
                              for _ in range(k)]
        self._fillers = []
        for weights in self._slot_weights:
            filler = copy.deepcopy(like)
            for q, w in zip(filler.parameters(), weights, strict=True):
                q.data = w
            self._fillers.append(filler)
        self._filler_rows = {}
        for i, m in enumerate(members):
            self._bind_projector(i, m)
        route_blocks(layers, tuple((f"slot{i}", rows) for i in range(k)), self._stacks)
        self._slotted, self._routed = True, None
        self._cache_open = self.compile_cache_dir is not None
        return True

    def _open_compile_cache(self, parts: list[Rows]) -> None:
        """Before the slots' first compile: their artifacts' file, keyed by what fixes the
        graph (the slots' input shapes, the model and the group's config), loaded if a
        group of the same shapes saved it before; saved after this step otherwise."""
        self._cache_open = False
        ref = self._ref.to_plain()
        model = {k: v for k, v in ref["model"].items() if k != "llm_path"}  # shapes, not paths
        key = artifact_key({
            "inputs": [(list(t.shape), str(t.dtype)) for p in parts
                       for t in (p.features, p.input_ids, p.labels)],
            "projector": [list(q.shape) for q in parts[0].projector.parameters()],
            "lora_rates": self._stacks.rates, "llm": self._lm.config.to_dict(),
            "model": model, "precision": ref["phase2"]["precision"],
            "device": str(self.device)})
        self.compile_cache = CompileCache(self.compile_cache_dir, key, self.log)
        if not self.compile_cache.load():
            self._cache_save = True

    def _projector_fits(self, m: Member) -> bool:
        return all(q.shape == w.shape and q.dtype == w.dtype and q.device == w.device
                   for q, w in zip(m.run.model.projector.parameters(), self._slot_weights[0],
                                   strict=True))

    def _bind_projector(self, slot: int, m: Member) -> None:
        """Seat `m` in `slot` for its projector: its weights are copied into the slot's
        storage and its parameters (the same objects: its optimizer keeps them) take that
        storage. A CUDA-graph forward reads its static inputs (parameters) at the addresses
        it recorded: a new member's own tensors would make it record again at every
        make-up change, and keep every recording."""
        with torch.no_grad():
            for q, w in zip(m.run.model.projector.parameters(), self._slot_weights[slot],
                            strict=True):
                w.copy_(q.detach())
                q.data = w
        m.slot = slot

    def _unbind_projector(self, m: Member) -> None:
        """`m` leaves its slot: its projector gets storage of its own (same values), and
        the slot's storage is zeroed (what the member left there, non-finite included)."""
        with torch.no_grad():
            for q, w in zip(m.run.model.projector.parameters(), self._slot_weights[m.slot],
                            strict=True):
                q.data = q.data.clone()
                w.zero_()

    def _slot_parts(self, active: list[Member], parts: list[Rows]) -> list[Rows]:
        """The compiled forward's input: one block of `_slot_rows` rows per slot, in slot
        order. A member's block is its rows, right-filled with rows that have no target;
        an empty slot's (or a waiting member's) is the slot's filler rows: zero features
        through the slot's filler projector (zero weights when empty; a waiting member's
        own), token 0 everywhere, all of it a target (its loss is never used, but finite:
        a 0/0 mean would make its zero gradient NaN)."""
        by_slot = {m.slot: p for m, p in zip(active, parts, strict=True)}
        like, rows = parts[0], self._slot_rows
        out = []
        for k in range(len(self._stacks.adapters)):
            p = by_slot.get(k)
            if p is None:
                filler = self._filler_rows.get(k)
                if filler is None or filler.input_ids.shape[1] != like.input_ids.shape[1]:
                    filler = self._filler_rows[k] = Rows(
                        self._fillers[k], "",
                        like.features.new_zeros(rows, *like.features.shape[1:]),
                        like.input_ids.new_zeros(rows, like.input_ids.shape[1]),
                        like.labels.new_zeros(rows, like.labels.shape[1]))
                out.append(filler)
                continue
            n = rows - p.features.shape[0]
            if n:
                p = Rows(p.projector, p.adapter,
                         torch.cat([p.features, p.features.new_zeros(n, *p.features.shape[1:])]),
                         torch.cat([p.input_ids, p.input_ids.new_zeros(n, p.input_ids.shape[1])]),
                         torch.cat([p.labels, p.labels.new_full((n, p.labels.shape[1]),
                                                                IGNORE_INDEX)]))
            out.append(p)
        return out

    def _skip_guards(self, parts: list[Rows], active: list[Member]
                     ) -> contextlib.AbstractContextManager:
        """The compiled forward's guard check, skipped once this make-up's calls repeat
        (`trainer.compile_guards`). Each routing, each seating of members in the slots and
        each set of stepped slots is a signature of its own, so every make-up change is
        checked in full first (new members bring new projectors), even back to an earlier
        make-up."""
        if self._guard_skip is None:
            return contextlib.nullcontext()
        tensors = [t for p in parts for t in (p.features, p.input_ids, p.labels)]
        key = (self._routings, self._makeups, tuple(m.slot for m in active))
        return self._guard_skip.around(self._peft, *tensors, key=key)

    def _unstack(self) -> None:
        if self._stacks is not None:
            self._stacks.release()
            self._stacks = None
        for m in self.members.values():
            if self._slotted and m.slot is not None:
                self._unbind_projector(m)
            m.slot = None
        self._slotted = False
        self._fillers, self._filler_rows, self._slot_weights = [], {}, []

    def _new_view(self, cfg: TrainConfig, adapter: str, align_dim: int) -> MemberView:
        """A new adapter + projector with the solo run's initial weights, bit for bit."""
        from peft import get_peft_model

        m = cfg.model
        # The RNG order of trainer.model.build_model: seed, LoRA init, projector init.
        seed_everything(cfg.phase2.seed)
        lcfg = lora_config(m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
        with warnings.catch_warnings():  # peft warns about several adapters in one model
            warnings.simplefilter("ignore")
            if self._peft is None:
                self._peft = get_peft_model(self._lm, lcfg, adapter_name=adapter)
            else:
                self._peft.add_adapter(adapter, lcfg)
        hidden = self._lm.config.hidden_size
        projector = Projector(align_dim, hidden, m.projector.hidden_dim or 4 * hidden,
                              m.projector.dropout).to(self.device)
        self._live_adapters = {*self._adapters(), adapter}
        self._mark_trainable()
        view = MemberView(projector, self._peft, adapter)
        view.train()
        return view

    def _adapters(self) -> set[str]:
        return {m.adapter for m in self.members.values()}

    def _mark_trainable(self) -> None:
        # peft keeps only its *active* adapter trainable (add/delete re-apply that): every
        # member's LoRA weights must train, and the shared base weights never.
        for name, p in self._peft.named_parameters():
            p.requires_grad_(adapter_of(name) in self._live_adapters)

    def _delete_adapter(self, adapter: str) -> None:
        with warnings.catch_warnings():  # "adapter was active, setting another active"
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(adapter)
        self._live_adapters = self._adapters() - {adapter}
        self._mark_trainable()

    def _close(self, m: Member, end_reason: str) -> RunSummary:
        summary = close_run(m.run, m.state, m.sink, end_reason, time.perf_counter() - m.t0)
        del self.members[m.member_id]
        # Drop the member's gradients, optimizer moments and adapter now, not at the end
        # of the group: a finished trial's memory goes back to the members still training.
        m.run.optimizer.zero_grad(set_to_none=True)
        m.run.optimizer.state.clear()
        if self._slotted:  # its slot (if it had one yet) is free for the next member
            if m.slot is not None:
                self._stacks.detach(m.slot)
                self._unbind_projector(m)
                self._makeups += 1
        elif self._stacks is not None:  # the make-up changes: rebuilt at the next step
            self._unstack()
            self._routed = None
        self._delete_adapter(m.adapter)
        return summary


def train_group(cfgs: list[TrainConfig], sinks: list[MetricsSink | None] | None = None, *,
                inputs: Inputs | None = None, device: str | None = None,
                log: Callable = print) -> list[RunSummary]:
    """Train `cfgs` as one trial group until every member ends; summaries in `cfgs` order."""
    sinks = sinks if sinks is not None else [None] * len(cfgs)
    inputs = inputs or prepare_inputs(cfgs[0], log)
    group = TrialGroup(inputs, device, log)
    ids = [f"{i}:{cfg.output.run_name}" for i, cfg in enumerate(cfgs)]
    for member_id, cfg, sink in zip(ids, cfgs, sinks, strict=True):
        group.add_member(member_id, cfg, sink)
    summaries: dict[str, RunSummary] = {}
    while group.members:
        summaries.update(group.step())
    return [summaries[i] for i in ids]
