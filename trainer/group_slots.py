"""Where a compiled trial group's members sit in its shared forward: the slots of its LoRA stacks.

A compiled `TrialGroup` (`trainer.group`) runs its shared forward over the members' LoRA
weights held as rows of one stacked tensor (`trainer.multilora.LoraStacks`), one row, a
slot, per member. `SlotTable` keeps those slots and the routing of every LoRA layer to
them, and nothing else (the group keeps the graph, the steps and the members' runs):

  * fixed slots (`SlotTable.route` seats the members): K slots, the group's capacity,
    each running as many rows whoever holds it. A member joining takes a free slot, one
    leaving empties its own, and an empty (or waiting) slot is masked: a zero LoRA row,
    zero projector weights and filler rows (`SlotTable.slot_parts`). So a make-up change
    alters no shape and the compiled graph stays (docs/shared-group.md says what an empty
    slot costs). The slots are (re)built, a new graph, only at the first compiled step,
    when no slot is free, or when a member does not fit them;
  * members whose LoRA layers cannot share fixed slots (shapes that differ) are routed
    per make-up instead, one graph each;
  * the fixed slots' compiled artifacts on disk (`trainer.compile_cache`): loaded before
    their first compile, saved after it; with `model.compile_ahead`, a cold first compile
    is made by a helper process while the group runs the forward eagerly
    (`trainer.compile_ahead`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from trainer.compile_ahead import CompileAhead
from trainer.compile_cache import CompileCache, artifact_key
from trainer.compile_program import TracedProgram, program_key
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX
from trainer.group_member import Member
from trainer.inputs import Inputs
from trainer.model import Projector
from trainer.multilora import LoraStacks, route_blocks, vanilla_lora_layers
from trainer.rows import Rows, stacked_rows_losses


class SlotTable:
    """Which slot of a compiled group's LoRA stacks each member holds, and how every LoRA
    layer is routed to them; see the module docstring."""

    def __init__(self, capacity: int | None, cache_dir: Path | None,
                 log: Callable[[str], None]) -> None:
        """`capacity`: K, the fixed slots (None: as many as the members present at the
        first compiled step); `cache_dir`: where the fixed slots' compiled artifacts are
        kept (None: nowhere)."""
        self.capacity = capacity
        self.cache_dir = cache_dir
        self.log = log
        self.cache: CompileCache | None = None  # the current slots' artifacts
        self.program: TracedProgram | None = None  # their traced program (compile_program)
        self.stacks: LoraStacks | None = None  # the routed members' stacked LoRA weights
        self.layers: list[nn.Module] | None = None  # the routed LoRA layers (None: per-row)
        self.fixed = False  # the routing is over fixed slots, not the make-up
        self.fillers: list[Projector] = []  # per slot: the projector of its empty rows
        self._routed: tuple[tuple[str, int], ...] | None = None  # blocks route_blocks set
        self._routings = 0  # how many times the LoRA layers were routed (make-up changes)
        self._makeups = 0  # members seated or unseated in the slots (for the guard skip)
        self._rows = 0  # rows per slot: the largest batch size of the seated members
        # Per slot: the storage its projector's parameters live in, whoever holds it
        # (`_bind_projector`), so a CUDA-graph forward finds them at the same addresses.
        self._weights: list[list[torch.Tensor]] = []
        self._filler_rows: dict[int, Rows] = {}  # per slot: its empty rows, made once
        self._running: dict[tuple[int, ...], torch.Tensor] = {}  # `running`'s, made once
        self._cache_open = False  # the slots were (re)built: their artifacts to load
        self._cache_save = False  # their first step compiled: artifacts to save
        self.ahead: CompileAhead | None = None  # the helper compiling them (compile_ahead)
        self.ahead_steps = 0  # steps run eagerly while a helper compiled

    def route(self, peft: nn.Module, members: list[Member], active: list[Member],
              dtype: torch.dtype | None) -> bool:
        """Route every LoRA layer of `peft`: to fixed slots for all `members`, else to the
        `active` members' row blocks, once per make-up (not per step); whether the
        compiled forward applies (False: a layer needs peft's per-row path, which runs
        eager). `dtype`: the stacks' low precision (None: fp32)."""
        if self._seat(peft, members, dtype):
            return True
        # Every micro-batch of a member holds exactly batch_size rows (plan_steps drops
        # incomplete ones), so the make-up fixes the blocks.
        blocks = tuple((m.adapter, m.run.plan.batch_size) for m in active)
        if blocks != self._routed:
            self._reroute(members)
            adapters = [a for a, _ in blocks]
            self.layers = vanilla_lora_layers(peft, adapters)
            if self.layers is not None:
                if LoraStacks.stackable(self.layers, adapters, [n for _, n in blocks]):
                    self.stacks = LoraStacks(self.layers, adapters, dtype)
                route_blocks(self.layers, blocks, self.stacks)
            self._routed = blocks
        return self.layers is not None

    def _reroute(self, members: list[Member]) -> None:
        # A new routing is a new graph (its routing objects and stacks are new, and the
        # old ones never come back: adapter names are not reused). Drop the old graphs
        # first: Dynamo keeps at most `recompile_limit` (8) per function and then runs it
        # eagerly for good, which a sweep's ninth make-up would reach, and their CUDA
        # graphs hold memory. Inductor's on-disk cache is kept.
        torch.compiler.reset()
        self._routings += 1
        self._release(members)

    def _seat(self, peft: nn.Module, members: list[Member], dtype: torch.dtype | None
              ) -> bool:
        """Give every member a slot of the LoRA stacks, so that the compiled forward runs
        over the same K slots of the same rows whoever holds them (one graph for the
        group's life); whether it could (False: some member's LoRA layers need peft's own
        path, or their shapes differ: the forward then routes each make-up).

        A new member takes a free slot. The slots are (re)built, which compiles, only at
        the first compiled step, when no slot is free (more members than K), or when a
        member does not fit them (a larger batch, another LoRA rank).
        """
        st = self.stacks
        if self.fixed and st is not None:
            new = [m for m in members if m.slot is None]
            if not new:  # every step but a make-up change's: no walk of the modules
                return True
            free = st.free_slots()
            if len(new) <= len(free) and all(
                    m.run.plan.batch_size <= self._rows and st.fits(m.adapter)
                    and self._projector_fits(m) for m in new) and vanilla_lora_layers(
                        peft, [m.adapter for m in new]) is not None:
                for m, k in zip(new, free, strict=False):
                    st.attach(k, m.adapter)
                    self._bind_projector(k, m)
                self._makeups += bool(new)
                return True
        adapters = [m.adapter for m in members]
        layers = vanilla_lora_layers(peft, adapters)
        rows = max(m.run.plan.batch_size for m in members)
        if layers is None or not LoraStacks.stackable(layers, adapters, [rows] * len(members),
                                                      single=True):
            return False
        self._reroute(members)  # the old slots' graph never comes back
        self.stop_ahead()  # nor does a helper compiling it
        k = max(self.capacity or 0, len(members))
        if self.capacity is not None and k > self.capacity:
            self.log(f"[group] {len(members)} members for {self.capacity} slots: "
                     f"rebuilding {k} slots (a new graph)")
        self.stacks = LoraStacks(layers, adapters, dtype, slots=k)
        self._rows, self.layers = rows, layers
        # Each slot's projector weights live in storage of the slot's own, zero while it
        # is empty; each empty slot runs its own copy of a projector over it (distinct
        # objects: one shared by several slots would be an aliased graph input, another
        # graph), with the members' module attributes (dropout, train mode) Dynamo guards.
        like = members[0].run.model.projector
        self._weights = [[torch.zeros_like(q) for q in like.parameters()] for _ in range(k)]
        self.fillers = []
        for weights in self._weights:
            filler = copy.deepcopy(like)
            for q, w in zip(filler.parameters(), weights, strict=True):
                q.data = w
            self.fillers.append(filler)
        self._filler_rows, self._running = {}, {}
        for i, m in enumerate(members):
            self._bind_projector(i, m)
        route_blocks(layers, tuple((f"slot{i}", rows) for i in range(k)), self.stacks)
        self.fixed, self._routed = True, None
        self._cache_open = self.cache_dir is not None
        self.program = None  # the new slots' own, from `open_cache`
        return True

    def leave(self, m: Member, members: list[Member]) -> None:
        """`m` has left the group (`members`: those still in it): its fixed slot, if it
        had one yet, is free for the next member; a make-up's routing is rebuilt at the
        next step."""
        if not members:
            self.stop_ahead()  # nothing left to compile for
        if self.fixed:
            if m.slot is not None:
                self.stacks.detach(m.slot)
                self._unbind_projector(m)
                self._makeups += 1
        elif self.stacks is not None:
            self._release(members)
            self._routed = None

    def call_key(self, active: list[Member]) -> tuple:
        """What a compiled forward's call depends on besides its tensors: the routing, the
        members seated in the slots and the slots stepped (for the guard skip,
        `trainer.compile_guards`)."""
        return (self._routings, self._makeups, tuple(m.slot for m in active))

    def running(self, active: list[Member]) -> tuple[list[int], torch.Tensor] | None:
        """The slots a compiled step runs through the LLM, in slot order: the `active`
        members', and as many others as make the count a power of two (2, 4, 8, ...; K at
        most), also as an int64 tensor on the stacks' device whose length is a dynamic
        dimension of the graph (`trainer.rows.stacked_rows_losses`). So a step of 2 members
        costs about what 2 slots cost, not K, and every count runs the one graph. None: run
        all K (members whose LoRA dropout rates differ drop out per slot, over all slots'
        rows).

        Powers of two, not the members' exact count: with CUDA graphs each count is a
        recording of its own, seconds each the first time, and an ASHA sweep passes
        through every count from K down; 2 at least, since Dynamo specialises a dimension
        of size 1 (another graph). The other slots' losses are never used."""
        st = self.stacks
        k = len(st.adapters)
        if len(set(st.rates)) > 1 or k < 2:
            return None
        slots = sorted(m.slot for m in active)
        target = min(k, max(2, 1 << (len(slots) - 1).bit_length()))
        spare = iter(s for s in range(k) if s not in slots)
        slots = sorted([*slots, *(next(spare) for _ in range(target - len(slots)))])
        key = tuple(slots)
        ids = self._running.get(key)
        if ids is None:
            ids = self._running[key] = torch.tensor(slots, device=st.flat.device)
            torch._dynamo.mark_dynamic(ids, 0)
        return slots, ids

    def slot_parts(self, active: list[Member], parts: list[Rows]) -> list[Rows]:
        """The compiled forward's input over fixed slots: one block of the slots' rows per
        slot, in slot order. A member's block is its rows, right-filled with rows that
        have no target; an empty slot's (or a waiting member's) is the slot's filler rows:
        zero features through the slot's filler projector (zero weights when empty; a
        waiting member's own), token 0 everywhere, all of it a target (its loss is never
        used, but finite: a 0/0 mean would make its zero gradient NaN)."""
        by_slot = {m.slot: p for m, p in zip(active, parts, strict=True)}
        like, rows = parts[0], self._rows
        out = []
        for k in range(len(self.stacks.adapters)):
            p = by_slot.get(k)
            if p is None:
                filler = self._filler_rows.get(k)
                if filler is None or filler.input_ids.shape[1] != like.input_ids.shape[1]:
                    filler = self._filler_rows[k] = Rows(
                        self.fillers[k], "",
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

    def open_cache(self, parts: list[Rows], ref: TrainConfig, llm: nn.Module,
                   device: torch.device, members: list[Member], inputs: Inputs) -> None:
        """Before the slots' first compile (else nothing): their artifacts' file, keyed by
        what fixes the graph (`parts`, the slots' inputs; the LLM; `ref`, the group's
        config), loaded if a group of the same shapes saved it before; saved after this
        step (`save_cache`) otherwise, or, with `model.compile_ahead`, by a helper process
        compiling a group of the `members`' configs on the group's `inputs`
        (`eager_while_compiling`)."""
        if not self._cache_open:
            return
        self._cache_open = False
        plain = ref.to_plain()
        # Not the LLM's path, nor whether a helper compiles: the helper's key is the group's.
        model = {k: v for k, v in plain["model"].items()
                 if k not in ("llm_path", "compile_ahead")}
        # The LLM's config, less the directory it was loaded from: the same LLM in another
        # storage or on another worker is the same graph.
        llm_config = {k: v for k, v in llm.config.to_dict().items() if k != "_name_or_path"}
        key = artifact_key({
            "inputs": [(list(t.shape), str(t.dtype)) for p in parts
                       for t in (p.features, p.input_ids, p.labels)],
            "projector": [list(q.shape) for q in parts[0].projector.parameters()],
            "lora_rates": self.stacks.rates, "llm": llm_config,
            "model": model, "precision": plain["phase2"]["precision"],
            "device": str(device)})
        self.cache = CompileCache(self.cache_dir, key, self.log)
        self.program = (TracedProgram(stacked_rows_losses, ref.model.compile, self.cache_dir,
                                      program_key(key, type(llm)), self.log)
                        if ref.model.compile_program else None)
        if self.cache.load():
            return
        if not ref.model.compile_ahead:
            self._cache_save = True
            return
        # In the order they joined, which names their adapters (member0, member1, ...).
        self.ahead = CompileAhead([m.run.cfg for m in members], inputs,
                                  len(self.stacks.adapters), self.cache.path, device, self.log)

    def eager_while_compiling(self) -> bool:
        """Whether this step runs the slots' forward eagerly, a helper still compiling it.
        Once the helper is done, its artifacts are loaded (the step compiles warm); had it
        failed, the step compiles cold here and saves them, as without it."""
        ahead = self.ahead
        if ahead is None:
            return False
        progress = ahead.poll()
        if progress == "running":
            self.ahead_steps += 1
            return True
        self.stop_ahead()
        if progress == "ready" and self.cache.load():
            self.log(f"[compile ahead] the helper is done after {self.ahead_steps} eager "
                     "group steps; compiling warm from its artifacts")
        else:
            self._cache_save = True
        return False

    def stop_ahead(self) -> None:
        """Stop the helper compiling the slots, if one is (the slots were rebuilt, or the
        group has no member left)."""
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None

    def save_cache(self) -> None:
        """After the step that compiled the slots (forward and backward), keep what they
        made; else nothing."""
        if not self._cache_save:
            return
        self._cache_save = False
        try:
            self.cache.save()
        except OSError as e:  # a full or read-only store costs the next start, not this
            self.log(f"[group] warning: compiled artifacts not saved: {e}")

    def _projector_fits(self, m: Member) -> bool:
        return all(q.shape == w.shape and q.dtype == w.dtype and q.device == w.device
                   for q, w in zip(m.run.model.projector.parameters(), self._weights[0],
                                   strict=True))

    def _bind_projector(self, slot: int, m: Member) -> None:
        """Seat `m` in `slot` for its projector: its weights are copied into the slot's
        storage and its parameters (the same objects: its optimizer keeps them) take that
        storage. A CUDA-graph forward reads its static inputs (parameters) at the addresses
        it recorded: a new member's own tensors would make it record again at every
        make-up change, and keep every recording."""
        with torch.no_grad():
            for q, w in zip(m.run.model.projector.parameters(), self._weights[slot],
                            strict=True):
                w.copy_(q.detach())
                q.data = w
        m.slot = slot

    def _unbind_projector(self, m: Member) -> None:
        """`m` leaves its slot: its projector gets storage of its own (same values), and
        the slot's storage is zeroed (what the member left there, non-finite included)."""
        with torch.no_grad():
            for q, w in zip(m.run.model.projector.parameters(), self._weights[m.slot],
                            strict=True):
                q.data = q.data.clone()
                w.zero_()

    def _release(self, members: list[Member]) -> None:
        # Every member's LoRA weights and projector get storage of their own again, before
        # new stacks are built from them (or the group goes on without).
        if self.stacks is not None:
            self.stacks.release()
            self.stacks = None
        for m in members:
            if self.fixed and m.slot is not None:
                self._unbind_projector(m)
            m.slot = None
        self.fixed = False
        self.fillers, self._filler_rows, self._weights, self._running = [], {}, [], {}
