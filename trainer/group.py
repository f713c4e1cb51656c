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
empty slot is masked (`trainer.group_slots.SlotTable`), so a member leaving or joining
changes no shape and compiles nothing (docs/shared-group.md says what an empty slot
costs). Anything raised inside a step ends the whole group, as it would end a solo run's
process; every member then resumes from its own checkpoints.

What stands apart from `TrialGroup` lives elsewhere: which slot of the LoRA stacks each
member of a compiled group holds, and the routing of the LoRA layers to them, in
`trainer.group_slots`; the shared forward over the members' rows in `trainer.rows`; the
member classes in `trainer.group_member`; who may share a group in `trainer.group_rules`.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.compile_cache import CompileCache
from trainer.compile_guards import GuardSkip
from trainer.compile_scope import compile_forward, eager_blocks
from trainer.config import TrainConfig
from trainer.data import Split, place_features, to_device
from trainer.errors import ConfigError, Problem
from trainer.group_member import Member, MemberView
from trainer.group_rules import group_problems, io_lora_problems
from trainer.group_slots import SlotTable
from trainer.inputs import Inputs, load_splits, prepare_inputs
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
from trainer.multilora import LoraStacks, adapter_of
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

    def __init__(self, inputs: Inputs | None, device: str | None = None, log: Callable = print,
                 slots: int | None = None, compile_cache: Path | None = None) -> None:
        """`inputs`: the shared inputs (None until a sweep's preparation is done: set
        `inputs` before the first member joins). `slots`: the group's capacity K, the
        trials it holds at once (a sweep's `max_concurrent_trials`); a compiled group's
        forward always runs K slots, so members joining and leaving never change its shapes
        (None: as many as the members present at the first compiled step).
        `compile_cache`: a directory where the compiled slots' artifacts are kept
        (`trainer.compile_cache`): loaded before the slots' first compile, saved after it,
        so the next group of the same shapes starts warm."""
        self.inputs = inputs
        self.slot_table = SlotTable(slots, compile_cache, log)  # compiled: who sits where
        self.device = resolve_device(device)
        self.log = log
        self.members: dict[str, Member] = {}
        self._ref: TrainConfig | None = None  # the first member's config: the group's keys
        self._lm: nn.Module | None = None  # the CausalLM, loaded once at the first member
        self._llm_dir: Path | None = None  # where `_lm` was loaded from
        self._peft: nn.Module | None = None  # the peft wrapper holding every member's adapter
        self._tokenizer = None
        self._next_adapter = 0
        self.member_steps = 0  # optimizer steps trained, summed over members (for stats)
        self.sync_s = 0.0  # time spent waiting in read-backs (for stats)
        self._live_adapters: set[str] = set()  # adapters whose LoRA weights must train
        self._compiled: Callable[..., list[torch.Tensor]] | None = None  # model.compile
        self._guard_skip: GuardSkip | None = None  # compiled, model.skip_compile_guards
        self._device_features: dict[tuple[str, ...], torch.Tensor] = {}  # by split rows
        self._splits: dict[str, tuple[Split, Split | None]] = {}  # member_splits, by data keys

    @property
    def slots(self) -> int | None:
        """The group's capacity K (None: the members present at the first compiled step)."""
        return self.slot_table.capacity

    @property
    def compile_cache(self) -> CompileCache | None:
        """The compiled slots' artifacts on disk (None: none kept, or not compiled yet)."""
        return self.slot_table.cache

    @property
    def compiled(self) -> bool:
        """Whether the shared forward is compiled."""
        return self._compiled is not None

    @property
    def fixed_slots(self) -> bool:
        """Whether a member joining or leaving keeps the compiled graph (the forward runs
        over fixed slots; False before the first compiled step, and for members whose
        LoRA layers cannot be stacked, whose every make-up is a graph of its own)."""
        return self._compiled is not None and self.slot_table.fixed

    @property
    def compiling_ahead(self) -> bool:
        """Whether a helper process is compiling the slots (`model.compile_ahead`): the
        group's steps run eagerly until a step finds it done."""
        return self.slot_table.ahead is not None

    @property
    def ahead_steps(self) -> int:
        """Group steps run eagerly while a helper process compiled the slots."""
        return self.slot_table.ahead_steps

    def wait_compile_ahead(self, timeout: float | None = None) -> None:
        """Block until the compiling helper (if any) ends: the next step switches."""
        if self.slot_table.ahead is not None:
            self.slot_table.ahead.proc.wait(timeout)

    @property
    def tokenizer(self) -> Any:
        """The shared LLM's tokenizer (None before `load_shared_llm`)."""
        return self._tokenizer

    @property
    def llm(self) -> nn.Module | None:
        return self._peft  # the peft-wrapped LLM with every member's adapter (None: before)

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
            cfg, self.inputs, self._tokenizer, resume=resume, source=source,
            splits=self.member_splits(cfg))
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

    def member_splits(self, cfg: TrainConfig) -> tuple[Split, Split | None]:
        """The train and eval splits a member with `cfg` trains on: read and checked at the
        first join, then shared by every later member of the same data keys. A sweep's group
        takes a member at every make-up change while the others wait for the step lock, and
        reading the feature cache again (its digest and finiteness checks included) was most
        of a join. Splits are never written to after loading, so sharing them is safe."""
        plain = cfg.to_plain()
        key = json.dumps({k: plain[k] for k in ("data", "demo", "phase1")}, sort_keys=True,
                         default=str)
        if key not in self._splits:
            self._splits[key] = load_splits(cfg, self.inputs, self.tokenizer)
        return self._splits[key]

    def load_shared_llm(self, cfg: TrainConfig, source: str = "config",
                        llm_dir: Path | None = None) -> None:
        """Load the shared frozen LLM onto the device (and set up its compiled forward), once;
        `cfg` (the first member's, or the sweep's base config) fixes the shared keys. A
        sweep's group actor calls it as it starts, overlapping the trials' start, and before
        its `inputs` are there it names the LLM's directory (`llm_dir`)."""
        if self._lm is not None:
            if self.inputs is not None and self._llm_dir != self.inputs.llm_dir:
                # Loaded ahead from the base config's directory: the inputs must agree.
                raise ConfigError([Problem(
                    source, "model.llm_path", f"the shared LLM was loaded from "
                    f"{self._llm_dir}, but the sweep's inputs name {self.inputs.llm_dir}",
                    "give every trial the base config's LLM")])
            return
        llm_dir = llm_dir or self.inputs.llm_dir
        # The parts' times: a sweep's first member waits for all. The first part is mostly
        # the process's first imports of transformers' tokenizer and model code and peft.
        t = [time.perf_counter()]
        tokenizer = prepare_llm(llm_dir, cfg.model.lora, source, self.log)
        t.append(time.perf_counter())
        lm = load_llm(llm_dir, cfg.model.attn_implementation)  # on the CPU
        t.append(time.perf_counter())
        lm.to(self.device)  # apart: a GPU's first use starts CUDA here
        t.append(time.perf_counter())
        cast_untargeted_linears(lm, cfg.model.lora.target_modules, frozen_dtype(cfg))
        if problems := io_lora_problems(lm, cfg, source):
            raise ConfigError(problems)
        t.append(time.perf_counter())
        self.log(f"[group] shared LLM on {self.device} in {t[-1] - t[0]:.1f}s (tokenizer and "
                 f"LoRA plan {t[1] - t[0]:.1f}s, weights read {t[2] - t[1]:.1f}s, to {self.device} "
                 f"{t[3] - t[2]:.1f}s, casts and checks {t[4] - t[3]:.1f}s)")
        self._lm, self._tokenizer, self._llm_dir = lm, tokenizer, llm_dir
        self._ref = cfg.model_copy(deep=True)  # what the loaded LLM was loaded with
        if cfg.model.compile != "off":
            # One compiled forward (and, with reduce-overhead, one CUDA graph) for the
            # group's slots: batches keep the split's full length and a fixed target
            # capacity, and the slots fix the rows (`trainer.group_slots`).
            self._compiled = compile_forward(stacked_rows_losses, lm, cfg.model.compile,
                                             cfg.model.compile_scope)
            if cfg.model.skip_compile_guards:
                self._guard_skip = GuardSkip()
            if cfg.model.compile_ahead and self.slot_table.cache_dir is None:
                self.log("[compile ahead] off: this group keeps no compile cache for the "
                         "helper's artifacts; it compiles in its own process")

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
        # Compiled: the LoRA routing is set (slots or make-up) before the batches are cut.
        static = self._compiled is not None and self.slot_table.route(
            self._peft, list(self.members.values()), active,
            low_precision_dtype(self._ref.phase2.precision))
        stacks = self.slot_table.stacks
        if stacks is None:
            for m in active:
                m.run.optimizer.zero_grad(set_to_none=True)
        else:  # the LoRA gradients are views of the stacks' gradients, zeroed in place
            for m in active:
                for p in m.run.groups["projector"]:
                    p.grad = None
            for filler in self.slot_table.fillers:  # empty slots': computed, never used
                filler.zero_grad(set_to_none=True)
            stacks.zero_grads()
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
                if static and self.slot_table.fixed:
                    slotted = self.slot_table.slot_parts(active, parts)
                    self.slot_table.open_cache(slotted, self._ref, self._lm, self.device,
                                               list(self.members.values()), self.inputs)
                    # With `run_empty_slots: false` only the slots the active members need
                    # run the LLM (`SlotTable.running`); else all K, the others' rows
                    # masked. Only with the whole forward compiled: each compiled decoder
                    # block (`compile_scope: layers`) would trace its batch again per count.
                    running = (None if self._ref.model.run_empty_slots
                               or self._ref.model.compile_scope != "model"
                               else self.slot_table.running(active))
                    order, ids = running or (list(range(len(slotted))), None)
                    if self.slot_table.eager_while_compiling():  # the forward, uncompiled
                        with eager_blocks(self._lm):
                            out = stacked_rows_losses(self._peft, slotted, stacks, ids)
                    else:
                        program = self.slot_table.program  # compile_program: its trace kept
                        signature = (None if program is None
                                     else self._program_signature(slotted, stacks, ids))
                        with self._skip_guards(slotted, active, ids):
                            if program is not None and program.matches(signature):
                                out = program(signature, self._peft, slotted, stacks, ids)
                            else:
                                out = self._compiled(self._peft, slotted, stacks, ids)
                    # A slot not running, or running but empty or waiting, has its loss left
                    # out of the sum below: its rows get no gradient and reach no member.
                    losses = [out[order.index(m.slot)] for m in active]
                elif static:
                    with self._skip_guards(parts, active):
                        losses = self._compiled(self._peft, parts, stacks)
                else:
                    losses = rows_losses(self._peft, parts)
            # Members' parameters are disjoint: the gradient of the sum w.r.t. a member's
            # parameters is the gradient of its own loss (its own fp16 scale included).
            total = sum(scale_for_backward(m.run, loss)
                        for m, loss in zip(active, losses, strict=True))
            total.backward()
            for m, tally, b, loss in zip(active, tallies, batches, losses, strict=True):
                tally.add(m.run, b, loss)
        self.slot_table.save_cache()  # after the slots' first compiled step only
        measured: list[Measured | None] = [None] * len(active)
        if stacks is not None and all(m.guard is not None for m in active):
            measured = self._measure_stacked(stacks, active, tallies, steps)
        return [tally.step(m.run, m.guard, s, mk) for m, tally, s, mk
                in zip(active, tallies, steps, measured, strict=True)]

    def _measure_stacked(self, stacks: LoraStacks, active: list[Member],
                         tallies: list[StepTally], steps: list[int]) -> list[Measured]:
        """The fault hooks, norms and clipping of device-guarded members on stacked LoRA
        weights, for all of them at once: every member's LoRA gradient norm in one
        reduction and their clipping in one multiply (per member, those are a launch per
        LoRA tensor: host time that bounds a group step). Each member's `Measured` then
        goes to its own optimizer step."""
        slots = [stacks.adapters.index(m.adapter) for m in active]  # their rows
        for m, s in zip(active, steps, strict=True):
            if m.run.after_backward is not None:  # may change gradients: before the norms
                m.run.after_backward(s, m.run.model)
        lora = stacks.member_norms()
        measured = [measure(m.run.parts.clip, t.loss,
                            [group_norm(m.run.parts, "projector"), lora[k]])
                    for k, m, t in zip(slots, active, tallies, strict=True)]
        if any(mk.factor is not None for mk in measured):
            one = torch.ones((), device=self.device)
            factors = [one] * len(stacks.adapters)  # slots not stepped: unscaled
            for k, mk in zip(slots, measured, strict=True):
                if mk.factor is not None:
                    factors[k] = mk.factor
            stacks.scale_grads(torch.stack(factors))
            for m, mk in zip(active, measured, strict=True):
                clip_grads(m.run.parts.grads(("projector",)), mk.factor)
        return measured

    # ------------------------------------------------------------------ internals

    def _program_signature(self, parts: list[Rows], stacks: LoraStacks,
                           running: torch.Tensor | None) -> tuple:
        """What a saved program was traced for and its guards (dropped, trainer.compile_program)
        would have checked per call: grad and train mode, autocast, the LoRA dropout rates,
        the slots' input shapes and dtypes, and whether only some slots run (not how many:
        that count is a dynamic dimension of the program, `run_empty_slots: false`)."""
        return (torch.is_grad_enabled(), self._peft.training, tuple(stacks.rates),
                running is None,
                torch.is_autocast_enabled(self.device.type), torch.get_autocast_dtype(
                    self.device.type),
                tuple((tuple(t.shape), t.dtype) for p in parts
                      for t in (p.features, p.input_ids, p.labels)))

    def _skip_guards(self, parts: list[Rows], active: list[Member],
                     running: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
        """The compiled forward's guard check, skipped once this make-up's calls repeat
        (`trainer.compile_guards`). Each routing, each seating of members in the slots and
        each set of stepped slots is a signature of its own, so every make-up change is
        checked in full first (new members bring new projectors), even back to an earlier
        make-up."""
        if self._guard_skip is None:
            return contextlib.nullcontext()
        tensors = [t for p in parts for t in (p.features, p.input_ids, p.labels)]
        if running is not None:
            tensors.append(running)
        return self._guard_skip.around(self._peft, *tensors,
                                       key=self.slot_table.call_key(active))

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
        self.slot_table.leave(m, list(self.members.values()))
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
