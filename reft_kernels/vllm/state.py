"""The worker side of ReFT serving, independent of vLLM's internals: adapters in site banks, requests and
their edited prompt positions, the plan of one engine step, and the registered op that edits a site.

    state = ServingState(sites=[(l, "block_output") for l in range(32)], hidden_size=4096, num_layers=32,
                         device="cuda")
    state.load("sentiment", served_adapter)                    # banks updated in place
    state.admit("req-1", "sentiment", prompt_len=37)           # when a request first appears
    state.plan_step(req_ids, index_of, query_start_loc, num_computed)    # before each forward
    with state.active():                                       # around the forward
        ... torch.ops.reft_kernels_vllm.edit_site(hidden, residual, site) at every site ...
    state.end_step()                                           # raises if a planned site was not edited

How a step is edited
- Rows. Each request with an adapter edits its prompt positions (ServedAdapter.positions_for). A step runs
  a chunk of each scheduled request: tokens [c, c + q) of request i sit at flat rows [qsl[i], qsl[i] + q),
  so position p is row qsl[i] + p - c when c <= p < c + q. Positions are resolved against the whole prompt
  before any chunk runs, so a prompt split over several steps (chunked prefill) is edited exactly as in one
  step, and a prompt partly found in the prefix cache (c > 0) edits only what it computes. Decode tokens lie
  past the prompt: a request whose prompt is done is no longer looked at, and a step with no prompt rows to
  edit has no plan: every site op returns at once (no kernel, no copy).
- Classes. A row's class is (adapter, position group); a matrix [n_site_passes, n_classes] maps it to the
  bank slot that edits it at each (site, pass), or -1. One step's plan is rows [N], and ids [n_sp, N] from
  one numpy gather; the edit of a site is one mixed-adapter call per pass (one pass unless an adapter puts
  several interventions of one group on one site) over every edited row of the step, whatever the mix of
  adapters: rows of other requests are not in the list and stay untouched.
- Block sites. vLLM carries the residual stream as two tensors (hidden, residual) whose sum is the block's
  output (it adds them in the next layer's fused add + RMSNorm). The edit of a block input or output adds
  residual into hidden at the edited rows (h = hidden + residual, rounded as vLLM's add rounds it), zeroes
  residual there and edits hidden: hidden = Φ(h), residual = 0, and the next layer's add sees exactly Φ(h)
  (x + 0 = x), bit for bit what an unsplit residual stream gives.
- Proof of edit. Every site op counts its calls; end_step raises when a site that had rows to edit in this
  step was never called (a compiled graph without the op, a model runner that bypassed the model, a stale
  compile cache): an edit is never silently skipped.

Adapters are added and removed between steps. A request holds its adapter until it finishes: removing an
adapter frees its slots once its last request is done, and a name can be loaded again at once.
"""
from __future__ import annotations

import dataclasses
import contextlib
import contextvars
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from ..integration.locate import COMPONENTS
from .adapters import ServedAdapter
from .bank import SiteBank
from .mixed_op import mixed_reft_edit_flat

ADAPTER_KEY = "reft_adapter"  # SamplingParams.extra_args / vllm_xargs key naming a request's adapter
FINGERPRINT_KEY = "reft_adapter_fingerprint"  # set by the front end: the adapter version it validated

# The state of the engine step now running in this thread (set by the model runner around its forward): the
# op finds it here rather than from an argument, so a compiled graph holds no per-process number and vLLM's
# compile cache can hand it to another process.
_ACTIVE: contextvars.ContextVar[Optional["ServingState"]] = contextvars.ContextVar("reft_kernels_vllm_step",
                                                                                  default=None)


@dataclasses.dataclass
class _Loaded:
    name: str
    adapter: ServedAdapter
    class_base: int
    slots: list[tuple[int, int]]  # (site pass, slot)
    requests: int = 0
    removed: bool = False


@dataclasses.dataclass
class _Request:
    loaded: _Loaded
    prompt_len: int
    pos: np.ndarray  # [M] int64 edited prompt positions, all groups
    cls: np.ndarray  # [M] int64 class of each


@dataclasses.dataclass
class _SitePlan:
    rows: torch.Tensor  # [n] int64 flat rows this site edits in this step
    passes: list[int]  # the site passes with work, in order
    ids: list[torch.Tensor]  # per pass with work: [n] int32 bank slot of each row, -1: not in this pass


@dataclasses.dataclass
class _Plan:
    sites: list[Optional[_SitePlan]]  # per site; None: nothing to edit there in this step
    n_rows: int


class ServingState:
    """ReFT serving state of one model runner (module docstring).

    Args:
        sites: the (layer, component) sites this engine edits (the model was built with an op at each);
            adapters editing elsewhere are refused at load.
        hidden_size, num_layers: the served model's; adapters of another width or depth are refused.
        device: where the banks live (the model's device).
        model_type: the served model's, for the loaders' model_type warning.
    """

    def __init__(self, sites: Sequence[tuple[int, str]], hidden_size: int, num_layers: int,
                 device, model_type: Optional[str] = None):
        for layer, component in sites:
            if component not in COMPONENTS or not 0 <= layer < num_layers:
                raise ValueError(f"site ({layer}, {component!r}) is not a (layer < {num_layers}, component in "
                                 f"{COMPONENTS}) pair")
        self.sites = sorted(set(map(tuple, sites)), key=lambda s: (s[0], COMPONENTS.index(s[1])))
        self.site_index = {s: k for k, s in enumerate(self.sites)}
        self.hidden_size, self.num_layers, self.model_type = hidden_size, num_layers, model_type
        self.device = torch.device(device)
        self.installed: set[int] = set()  # sites whose op is in this rank's model (pipeline stages hold some)
        self.site_passes: list[tuple[int, int]] = []  # (site, pass)
        self.passes_of_site: list[list[int]] = [[] for _ in self.sites]
        self.banks: list[SiteBank] = []
        self.slot_matrix = np.full((0, 8), -1, dtype=np.int32)
        self.free_classes: list[int] = list(range(8))
        self.adapters: dict[str, _Loaded] = {}
        self.requests: dict[str, _Request] = {}
        self.pending: set[str] = set()
        self.plan: Optional[_Plan] = None
        self.calls = np.zeros(len(self.sites), dtype=np.int64)
        self.steps_edited = 0  # steps that edited at least one row (tests read it)
        self.rows_edited = 0

    # -- adapters ----------------------------------------------------------------------------------

    def _site_pass(self, site: int, pass_index: int) -> int:
        while len(self.passes_of_site[site]) <= pass_index:
            self.passes_of_site[site].append(len(self.site_passes))
            self.site_passes.append((site, len(self.passes_of_site[site]) - 1))
            self.banks.append(SiteBank(self.hidden_size, self.device))
            self.slot_matrix = np.concatenate(
                [self.slot_matrix, np.full((1, self.slot_matrix.shape[1]), -1, dtype=np.int32)])
        return self.passes_of_site[site][pass_index]

    def _classes(self, n: int) -> int:
        """n consecutive free class ids (the matrix grows when needed)."""
        free = sorted(self.free_classes)
        for k in range(len(free) - n + 1):
            if free[k + n - 1] - free[k] == n - 1:
                base = free[k]
                break
        else:
            base = self.slot_matrix.shape[1]
            grow = max(n, self.slot_matrix.shape[1])
            self.slot_matrix = np.concatenate(
                [self.slot_matrix, np.full((self.slot_matrix.shape[0], grow), -1, dtype=np.int32)], 1)
            free += list(range(base, base + grow))
        self.free_classes = [c for c in free if not base <= c < base + n]
        return base

    def check(self, name: str, adapter: ServedAdapter) -> None:
        """ValueError when `adapter` cannot be served here under `name` (the name is taken, another width or
        depth, or a site this engine was not started with)."""
        if name in self.adapters:
            raise ValueError(f"a ReFT adapter named {name!r} is already loaded; remove it first "
                             "(remove_reft_adapter) or choose another name")
        if adapter.hidden_size != self.hidden_size or adapter.num_layers != self.num_layers:
            raise ValueError(f"adapter {name!r} was read for width {adapter.hidden_size} and {adapter.num_layers} "
                             f"layers; this model has {self.hidden_size} and {self.num_layers}")
        missing = [s for s in adapter.sites if s not in self.site_index]
        if missing:
            raise ValueError(f"adapter {name!r} edits {missing}, which this engine was not started with (its sites: "
                             f"{self.sites}); start it with reft_sites covering them (e.g. reft_sites='all')")

    def load(self, name: str, adapter: ServedAdapter) -> None:
        self.check(name, adapter)
        base = self._classes(adapter.num_groups)
        loaded = _Loaded(name, adapter, base, [])
        for it in adapter.interventions:
            sp = self._site_pass(self.site_index[it.site], it.pass_index)
            slot = self.banks[sp].add(it.params)
            self.slot_matrix[sp, base + it.group] = slot
            loaded.slots.append((sp, slot))
        self.adapters[name] = loaded

    def remove(self, name: str) -> None:
        loaded = self.adapters.pop(name, None)
        if loaded is None:
            raise KeyError(f"no ReFT adapter named {name!r} is loaded (loaded: {sorted(self.adapters)})")
        loaded.removed = True
        if loaded.requests == 0:
            self._free(loaded)

    def _free(self, loaded: _Loaded) -> None:
        for sp, slot in loaded.slots:
            self.banks[sp].clear(slot)
        cls = range(loaded.class_base, loaded.class_base + loaded.adapter.num_groups)
        self.slot_matrix[:, list(cls)] = -1
        self.free_classes += list(cls)
        loaded.slots = []

    # -- requests ----------------------------------------------------------------------------------

    def admit(self, req_id: str, name: Optional[str], prompt_len: int, fingerprint: Optional[str] = None) -> None:
        """Registers a request when it first appears (name None: unedited, nothing is kept)."""
        if name is None:
            return
        loaded = self.adapters.get(name)
        if loaded is None:
            raise ValueError(f"request {req_id} asks for ReFT adapter {name!r}, which is not loaded here (loaded: "
                             f"{sorted(self.adapters)})")
        if fingerprint is not None and fingerprint != loaded.adapter.fingerprint:
            raise RuntimeError(f"request {req_id} was accepted for a version of ReFT adapter {name!r} that is no "
                               "longer loaded (it was replaced while the request waited)")
        pos = loaded.adapter.positions_for(prompt_len)
        cls = [np.full(len(p), loaded.class_base + g, dtype=np.int64) for g, p in enumerate(pos)]
        self.requests[req_id] = _Request(loaded, prompt_len, np.concatenate(pos), np.concatenate(cls))
        loaded.requests += 1
        self.pending.add(req_id)

    def resume(self, req_ids: Iterable[str]) -> None:
        """Preempted requests that run again recompute their prompt: edit it again."""
        for rid in req_ids:
            if rid in self.requests:
                self.pending.add(rid)

    def finish(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            rec = self.requests.pop(rid, None)
            if rec is None:
                continue
            self.pending.discard(rid)
            rec.loaded.requests -= 1
            if rec.loaded.removed and rec.loaded.requests == 0:
                self._free(rec.loaded)

    # -- steps -------------------------------------------------------------------------------------

    def plan_step(self, index_of: Callable[[str], Optional[int]], query_start_loc: np.ndarray,
                  num_computed: np.ndarray) -> None:
        """The rows to edit in this step (module docstring). index_of(req_id): the request's index in this
        step's batch (None when not scheduled); query_start_loc [n_reqs + 1] and num_computed [n_reqs]: the
        step's token offsets and each request's tokens computed before it (host arrays)."""
        self.plan = None
        self.calls[:] = 0
        if not self.pending:
            return
        ids, recs, batch = [], [], []
        for rid in self.pending:
            i = index_of(rid)
            if i is not None:
                ids.append(rid)
                recs.append(self.requests[rid])
                batch.append(i)
        if not batch:
            return
        # one numpy pass over every pending request's positions (a Python loop per request cost ~19 us each)
        at = np.asarray(batch)
        c = np.asarray(num_computed)[at].astype(np.int64)
        start = np.asarray(query_start_loc)[at].astype(np.int64)
        end = c + (np.asarray(query_start_loc)[at + 1] - start)
        n = np.fromiter((r.prompt_len for r in recs), np.int64, len(recs))
        self.pending.difference_update([rid for rid, e, m in zip(ids, end, n) if e >= m])
        counts = np.fromiter((r.pos.size for r in recs), np.int64, len(recs))
        pos = np.concatenate([r.pos for r in recs])
        req = np.repeat(np.arange(len(recs)), counts)
        keep = (pos >= c[req]) & (pos < end[req])
        if not keep.any():
            return
        rows_np = pos[keep] + (start - c)[req[keep]]
        classes = [np.concatenate([r.cls for r in recs])[keep]]
        ids_np = self.slot_matrix[:, np.concatenate(classes)]  # [n_sp, N]
        live = ids_np >= 0
        dev = self.device
        full: Optional[tuple] = None
        sites: list[Optional[_SitePlan]] = []
        for sps in self.passes_of_site:
            sps = [sp for sp in sps if live[sp].any()]
            if not sps:
                sites.append(None)
                continue
            mine = live[sps].any(0)
            if mine.all():  # every edited row of the step is edited here (the common case): shared tensors
                if full is None:
                    full = (torch.from_numpy(rows_np).to(dev, non_blocking=True),
                            torch.from_numpy(ids_np).to(dev, non_blocking=True))
                sites.append(_SitePlan(full[0], sps, [full[1][sp] for sp in sps]))
            else:  # only some adapters edit here: the others' rows stay out, bit for bit untouched
                sites.append(_SitePlan(torch.from_numpy(rows_np[mine]).to(dev, non_blocking=True), sps,
                                       [torch.from_numpy(np.ascontiguousarray(ids_np[sp, mine])).to(dev, non_blocking=True)
                                        for sp in sps]))
        self.plan = _Plan(sites, int(rows_np.size))

    def end_step(self) -> None:
        """Checks that every installed site with rows to edit in this step was edited; clears the plan."""
        plan, self.plan = self.plan, None
        if plan is None:
            return
        skipped = [self.sites[s] for s, site in enumerate(plan.sites)
                   if site is not None and s in self.installed and self.calls[s] == 0]
        if skipped:
            raise RuntimeError(
                f"ReFT edits were planned at {skipped} in this step but the model never ran them: the forward "
                "bypassed reft_kernels' site op (a compiled graph or CUDA graph built without it, e.g. a stale "
                "vLLM compile cache, or a model runner the plugin does not know). Nothing was silently left "
                "unedited; this step's output is wrong and the engine stops here.")
        self.steps_edited += 1
        self.rows_edited += plan.n_rows

    # -- the edit ----------------------------------------------------------------------------------

    def edit(self, site: int, hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        plan = self.plan
        if plan is None:
            return
        self.calls[site] += 1
        work = plan.sites[site]
        if work is None:
            return
        if residual is not None:
            # a block site: hidden[rows] += residual[rows], residual[rows] = 0, then edit hidden in place (two
            # small index ops and a gather; gathering h = hidden + residual into a buffer and writing it back
            # took five: index ops were 90% of the edit's time in a CPU prefill step, the kernel 2%)
            hidden.index_add_(0, work.rows, residual.index_select(0, work.rows))
            residual.index_fill_(0, work.rows, 0)
        for sp, ids in zip(work.passes, work.ids):
            mixed_reft_edit_flat(hidden, work.rows, ids, self.banks[sp].bank, rows_unique=True)

    @contextlib.contextmanager
    def active(self):
        """The block runs this engine's step: its model's site ops edit with this state."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


# -- the registered op: what a compiled model graph calls at each site ---------------------------------------
# Registered with torch.library.Library (schema + one CompositeExplicitAutograd kernel) rather than
# torch.library.custom_op: a decode step calls it once per site and it returns at once, so its call cost is
# the whole of ReFT's decode-time cost. An empty op took 5.2 us a call this way against 52 us as a custom_op
# (a one-off timing on the loaded 2-core CPU); the serve suite's idle_us (8 site ops of a decode step:
# 25-28 us in all) is the measured figure. Both ways are opaque to torch.compile with a fake kernel.

_LIB = torch.library.Library("reft_kernels_vllm", "DEF")
_LIB.define("edit_site(Tensor(a!) hidden, Tensor(b!)? residual, int site) -> ()")


def edit_site(hidden: torch.Tensor, residual: Optional[torch.Tensor], site: int) -> None:
    """Edits the rows of this engine step at one site, in place: hidden [n_tokens, d] (a component's output,
    or with residual [n_tokens, d] a block's residual stream as the pair whose sum it is). Opaque to
    torch.compile: the step's plan and the banks are read at run time (from the state of the step running,
    ServingState.active), so the graph is traced once. Outside a step (vLLM's warm-up and profiling runs), or
    in a step with nothing to edit, it returns at once."""
    owner = _ACTIVE.get()
    if owner is None or owner.plan is None:
        return
    if hidden.dim() != 2 or (residual is not None and residual.shape != hidden.shape):
        raise ValueError(f"reft_kernels_vllm::edit_site: hidden must be [n_tokens, d] and residual None or the same "
                         f"shape; got {tuple(hidden.shape)}, {None if residual is None else tuple(residual.shape)}")
    owner.edit(site, hidden, residual)


_LIB.impl("edit_site", edit_site, "CompositeExplicitAutograd")


@torch.library.register_fake("reft_kernels_vllm::edit_site")
def _(hidden, residual, site):
    return None


__all__ = ["ADAPTER_KEY", "FINGERPRINT_KEY", "ServingState", "edit_site"]
