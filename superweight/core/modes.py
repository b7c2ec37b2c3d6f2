"""Comparison groups (modes): which weights compete with which. A mode only groups weights; what is picked
inside a group comes from the selection's `Rule` (its ranking key and informative-entry rule, or a uniform
draw), so a new selection needs no change here.

* `global`     one group: every candidate weight of every scored tensor. Never concatenates all scores:
               the top-K of each chunk of a tensor is merged into a running buffer, so extra memory is
               O(K + CHUNK).
* `per_layer`  one group per parameter tensor.
* `per_row`    one group per output neuron (Wanda's comparison group): the weights feeding one output
               feature, whatever the storage layout (nn.Linear [out, in], GPT-2 Conv1D [in, out], fused
               experts [E, out, in] or transposed [E, in, out]): `in_axis(name)` names the input axis.

In the grouped modes a control given `quota` (the Top-K's count per group) selects in each group exactly
as many weights as Top-K selected there, so Top-K and control compare equal numbers of weights in the same
tensors and rows; without a quota each group takes up to K. The ranking's `support` is the largest number
of informative entries in one group (past it no group's Top-K grows), the total in global mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry
from .draws import generator, sample_without_replacement
from .ranking import (SHIFT, Mask, Ranking, Scores, best, bound_in, gather, groups, mask_at, mask_count, mask_excluded,
                      tie_hash)

MODES = Registry("mode")
CHUNK = 1 << 20  # scores per step of the global merge: its temporaries are O(CHUNK + K), not O(tensor)
TIE_BUDGET = 1 << 22  # scores a ranking keeps for its tie counts at most (past it: the tie counts read again)
PLAN_SHORT: list = []  # rankings whose scan plan came up short and were read in full (never, by its counts)
InAxis = Callable[[str], int]  # parameter name -> its input axis (the axis a row of one output neuron runs along)


@dataclass(frozen=True)
class Rule:
    """What a mode needs from a selection: its name (salts its random stream), its ranking key (score ->
    key, larger first; None = a uniform random order), which entries it may rank (None = every candidate),
    and whether the ranking reports its support."""

    name: str
    key: Callable[[torch.Tensor], torch.Tensor] | None
    informative: Callable[[torch.Tensor], torch.Tensor] | None = None
    support: bool = False
    order: str | None = None  # "desc": key = s, informative s finite > 0; "asc": key = -s, informative finite

    def candidates(self, scores: Scores, name: str, mask_fn: Mask | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranking key, candidate bool mask) of one tensor, flat."""
        m = mask_fn(name) if mask_fn is not None else None
        return self.keys(scores[name].detach().reshape(-1), m.reshape(-1) if m is not None else None)

    def keys(self, s: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranking key, candidate bool mask) of flat scores `s` with candidate mask `m` (None: all). Keys
        compare in fp64 for fp64 and integer scores, fp32 otherwise; NaN ranks last."""
        ok = self.informative(s) if self.informative is not None else torch.ones_like(s, dtype=torch.bool)
        if m is not None:
            ok = ok & m.to(ok.device)
        if self.key is None:
            return torch.zeros(s.numel(), dtype=torch.float64, device=s.device), ok
        x = s.double() if s.dtype == torch.float64 or not s.is_floating_point() else s.float()
        x = self.key(x)
        return torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")), ok


def _empty(names, shapes, mode, rule, n_cand) -> Ranking:
    e = torch.empty(0, dtype=torch.int64)
    return Ranking(names, shapes, e, e, torch.empty(0), e, mode, rule.name, 0 if rule.support else None, n_cand)


def _scan_plan(scores, k: int, rule: Rule, mask_fn) -> tuple | None:
    """(first floor, informative candidates, scan) of a ranking by score whose score set carries an exact
    scan (scan.py) and whose mask names its excluded weights, else None. The support comes from the scan's
    counts less the informative scores of the excluded weights; the first floor is one that at least
    min(K, support) informative candidates reach (None when there are none: the ranking is empty)."""
    scan = getattr(scores, "scan", None) if rule.order is not None else None
    if scan is None or not scan.exact:
        return None
    names = list(scores)
    n_inf = scan.positive() if rule.order == "desc" else scan.finite()
    ex_vals = [torch.empty(0, dtype=torch.float64)]
    for pid, n in enumerate(names):
        try:
            ex = mask_excluded(mask_fn, n)
        except LookupError:  # a dense mask: key every score
            return None
        if ex is None or ex.numel() == 0:
            continue
        v = scores[n].detach().reshape(-1)[ex.to(scores[n].device)].cpu()
        v = v[rule.informative(v)].double()
        n_inf[pid] -= v.numel()
        ex_vals.append(v)
    n_cand = int(n_inf.sum())
    if n_cand == 0:
        return (None, 0, scan)  # nothing to rank: no pass at all
    floor = scan.first_floor(rule.order, min(k, n_cand), torch.cat(ex_vals))
    return None if floor is None else (floor, n_cand, scan)


def _past(rule: Rule, x: torch.Tensor, floor: float) -> torch.Tensor:
    """Raw scores whose key can reach `floor` (a prefilter in the scores' own dtype, exact below)."""
    if rule.order == "desc":
        return x >= bound_in(floor, x.dtype, up=False) if floor > 0 else x > 0
    return x <= bound_in(-floor, x.dtype, up=True)


def _candidates_only(mask_fn, name: str, flat: torch.Tensor, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`arrays` (aligned with the flat positions `flat` of tensor `name`) kept where the weight is a candidate."""
    m = mask_at(mask_fn, name, flat)
    if m is None:
        return arrays
    m = m.to(arrays[0].device)
    return tuple(a[m] for a in arrays)


def _ranked_global(scores, k, rule: Rule, seed, mask_fn) -> Ranking:
    """The K best candidates by (key desc, u asc), merged tensor by tensor. Once K entries are held, the
    K-th best key so far is a floor: a chunk's entries below it can never enter, so a chunk costs one
    comparison per entry and a top-k only over the few at or above the floor (ties at the floor stay in:
    the tie-break u decides them). With a scan of the scores (scan.py) the support needs no pass, a floor
    holds from the first chunk, and a chunk with no score past the floor is skipped unread."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    plan = _scan_plan(scores, k, rule, mask_fn)
    vals, us, pids, idxs = [], [], [], []
    n_cand = plan[1] if plan is not None else 0
    waiting = 0
    floor = floor_u = None  # (key, u) of the K-th best entry held (None: fewer than K held so far)
    if plan is not None and n_cand == 0:
        return _empty(names, shapes, "global", rule, 0)

    def compact():
        nonlocal vals, us, pids, idxs, waiting, floor, floor_u
        v, u, p, i = torch.cat(vals), torch.cat(us), torch.cat(pids), torch.cat(idxs)
        pos = best(v, u, k)
        vals, us, pids, idxs, waiting = [v[pos]], [u[pos]], [p[pos]], [i[pos]], pos.numel()
        if pos.numel() == k:
            floor, floor_u = float(v[pos[-1]]), int(u[pos[-1]])

    def hold(pid, cand, x, u):  # a chunk's entries that enter: at most its k best, merged when many wait
        nonlocal waiting
        if cand.numel() > k:
            pos = best(x, u, k)
            cand, x, u = cand[pos], x[pos], u[pos]
        vals.append(x.cpu().double())
        us.append(u.cpu())
        pids.append(torch.full((cand.numel(),), pid, dtype=torch.int64))
        idxs.append(cand.cpu())
        waiting += cand.numel()
        if waiting > 2 * k or (floor is None and waiting >= k):
            compact()

    # the scores read past the floor (scores equal to a final one among them, every one): the tie counts
    seen, n_seen = ([], 0) if plan is not None else (None, 0)
    # Bottom-K's key of a zero score (-0.0): a chunk of zeros at a floor of 0 is all ties (below)
    zero_key = float(rule.key(torch.zeros(1))) if plan is not None and rule.order == "asc" else None
    for pid, n in enumerate(names):
        s = scores[n].detach().reshape(-1)
        m = None
        if plan is None and mask_fn is not None:
            m = mask_fn(n)
            m = m.reshape(-1) if m is not None else None
        step = max(CHUNK, 4 * k)  # a chunk's temporaries at a time, never a whole tensor's (chunks >> K)
        for st in range(0, s.numel(), step):
            if plan is not None:  # only entries past the floor are read beyond one comparison
                f = plan[0] if floor is None else max(plan[0], floor)
                if rule.order == "desc" and f > 0 and not plan[2].may_reach(pid, st, st + step, f):
                    continue
                if rule.order == "asc" and f > -math.inf and not plan[2].may_hold_below(pid, st, st + step, -f):
                    continue
                chunk = s[st : st + step]
                if floor is not None and zero_key == floor and plan[2].all_zero(pid, st, st + step):
                    # a mass of ties at a floor of 0 (act_outlier's Bottom-K: 10^8 zeros): every entry is
                    # at the floor, so only the tie-break decides; no comparison, no key, no index first
                    u = tie_hash(seed, n, torch.arange(st, st + chunk.numel(), device=chunk.device))
                    sel = torch.nonzero(u < floor_u).squeeze(1)
                    cand, u = sel + st, u[sel]
                    x = torch.full((cand.numel(),), zero_key, dtype=torch.float32, device=chunk.device)
                    hold(pid, *_candidates_only(mask_fn, n, cand, cand, x, u))
                    continue
                cand = torch.nonzero(_past(rule, chunk, f)).squeeze(1)
                if cand.numel() == 0:
                    continue
                raw = chunk[cand]
                x, ok = rule.keys(raw, None)  # the mask later, at the few past the floor when it holds
                if not bool(ok.all()):
                    cand, x, raw = cand[ok], x[ok], raw[ok]
                if seen is not None:  # every score tied with a final one is past the floor when read: kept,
                    nz = raw != 0  # but zeros (the scan counts them; a mass of zeros would fill the budget)
                    seen.append((pid, cand[nz] + st, raw[nz].double().cpu()))
                    n_seen += seen[-1][1].numel()
                    seen = seen if n_seen <= TIE_BUDGET else None
                if floor is None:
                    cand, x = _candidates_only(mask_fn, n, cand + st, cand, x)
                    if cand.numel() > k:  # this chunk's own k best (u for the tied entries only)
                        sel = torch.nonzero(x >= torch.topk(x, k, sorted=False).values.min()).squeeze(1)
                        cand, x = cand[sel], x[sel]
            else:
                x, ok = rule.keys(s[st : st + step], m[st : st + step] if m is not None else None)
                n_ok = int(ok.sum())
                n_cand += n_ok
                if n_ok == 0:
                    continue
                if floor is not None:  # only entries at or above the floor can enter (exactly: below, in fp64)
                    cand = torch.nonzero(ok & (x >= bound_in(floor, x.dtype, up=False))).squeeze(1)
                elif n_ok > k:  # this chunk's own k best (no index of every candidate: memory)
                    x = x.masked_fill_(~ok, float("-inf"))  # a fresh key copy (nan_to_num); -inf marks non-candidates
                    del ok
                    cand = torch.nonzero(x >= torch.topk(x, k, sorted=False).values.min()).squeeze(1)
                else:
                    cand = torch.nonzero(ok).squeeze(1)
                x = x[cand]
            if cand.numel() == 0:
                continue
            cand = cand + st
            u = tie_hash(seed, n, cand)
            if floor is not None:  # at the floor, only a tie-break that beats the K-th held entry's enters
                # a superset first, in x's dtype (a mass of ties: only the few small u pass), then exactly
                sel = torch.nonzero((x > bound_in(floor, x.dtype, up=False)) | (u < floor_u)).squeeze(1)
                cand, x, u = cand[sel], x[sel], u[sel]
                xd = x.double()
                keep = (xd > floor) | ((xd == floor) & (u < floor_u))
                cand, x, u = cand[keep], x[keep], u[keep]
                if plan is not None:
                    cand, x, u = _candidates_only(mask_fn, n, cand, cand, x, u)
            hold(pid, cand, x, u)
    if plan is not None and sum(v.numel() for v in vals) < min(k, n_cand):
        PLAN_SHORT.append((rule.name, k, n_cand))  # the scan's counts promised more: read every score instead
        return _ranked_global(dict(scores), k, rule, seed, mask_fn)
    if not vals:
        return _empty(names, shapes, "global", rule, n_cand)
    compact()
    best_p, best_i = pids[0], idxs[0]
    r = Ranking(names, shapes, best_p, best_i, gather(scores, names, best_p, best_i),
                torch.arange(best_p.numel()), "global", rule.name, n_cand if rule.support else None, n_cand)
    counts = _tied_of(seen, r, mask_fn) if seen is not None else None
    if counts is not None:
        r.tied = (mask_fn, counts)
    return r


def _tied_of(seen: list, r: Ranking, mask_fn) -> dict | None:
    """{score: candidates scoring exactly that} for each nonzero score of ranking `r`, from the entries the
    ranking read past its floor (`seen`: (pid, flat, score) per chunk). The floor only rises to the K-th key,
    so every score equal to one of r's was past it when read: the count is exact. Zeros are left to the
    scan's zero counts (a chunk of zeros at the floor is hashed, not read); None if a count comes up empty."""
    want = torch.unique(r.score.double())
    want = want[(want != 0) & ~want.isnan()]
    if want.numel() == 0:
        return {}
    v = torch.cat([x for _, _, x in seen])
    hit = torch.isin(v, want)
    p = torch.cat([torch.full((f.numel(),), pid, dtype=torch.int64) for pid, f, _ in seen])[hit]
    f = torch.cat([f.cpu() for _, f, _ in seen])[hit]
    v = v[hit]
    keep = torch.ones(v.numel(), dtype=torch.bool)
    for pid, sel in groups(p):
        m = mask_at(mask_fn, r.names[pid], f[sel])
        if m is not None:
            keep[sel] = m.cpu()
    vals, counts = torch.unique(v[keep], return_counts=True)
    got = dict(zip(vals.tolist(), counts.tolist()))
    out = {x: got.get(x, 0) for x in want.tolist()}
    return None if min(out.values()) < 1 else out


def _candidate_flat(mask_fn: Mask, name: str, ordinal: torch.Tensor) -> torch.Tensor:
    """The flat index of the j-th candidate of tensor `name` for each j in `ordinal`. From the list of the
    excluded weights e_0 < e_1 < ... when the mask keeps one: e_i has e_i - i candidates before it, so the
    j-th candidate sits at j + #{i: e_i - i <= j} (O(K log E), no pass over the tensor); else from the mask."""
    try:
        ex = mask_excluded(mask_fn, name)
    except LookupError:  # a dense mask: read it
        ex = None
    if ex is None:
        m = mask_fn(name)
        return ordinal if m is None else torch.nonzero(m.reshape(-1)).squeeze(1).cpu()[ordinal]
    ex = ex.to(torch.int64).cpu()
    return ordinal + torch.searchsorted(ex - torch.arange(ex.numel()), ordinal, right=True)


def _uniform_global(scores, k, rule: Rule, seed, draw, mask_fn) -> Ranking:
    """K uniform draws without replacement over the concatenated candidate index space, in draw order."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    counts = [mask_count(mask_fn, n, scores[n].numel()) for n in names]
    sizes = torch.tensor(counts, dtype=torch.int64)
    total = int(sizes.sum())
    k = min(k, total)
    pos = sample_without_replacement(total, k, generator(seed, f"{rule.name}/global/{draw}"))
    ends = torch.cumsum(sizes, 0)
    pid = torch.searchsorted(ends, pos, right=True)
    ordinal = pos - (ends - sizes)[pid]
    flat = ordinal.clone()
    for p, sel in groups(pid):
        if mask_fn is not None and counts[p] < scores[names[p]].numel():  # ordinal among the candidates -> flat
            flat[sel] = _candidate_flat(mask_fn, names[p], ordinal[sel])
    return Ranking(names, shapes, pid, flat, gather(scores, names, pid, flat), torch.arange(k), "global",
                   rule.name, None, total)


@MODES.register("global")
def rank_global(scores, k, rule: Rule, seed=0, draw=0, mask_fn: Mask | None = None, quota=None, in_axis=None) -> Ranking:
    """K over all candidate weights of all scored tensors."""
    if rule.key is None:
        return _uniform_global(scores, k, rule, seed, draw, mask_fn)
    return _ranked_global(scores, k, rule, seed, mask_fn)


@MODES.register("per_layer")
def rank_per_layer(scores, k, rule: Rule, seed=0, draw=0, mask_fn: Mask | None = None, quota: dict | None = None,
                   in_axis=None) -> Ranking:
    """Per parameter tensor (group id = its index), K or its quota, ordered within the tensor by (key desc,
    u asc); a uniform rule draws without replacement per tensor (an independent seeded stream per tensor
    name and draw)."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    P, I, S, R = [], [], [], []
    n_cand = sup = 0
    for pid, n in enumerate(names):
        cap = k if quota is None else min(k, quota.get(pid, 0))
        if rule.key is None:
            m = mask_fn(n) if mask_fn is not None else None
            cand = torch.nonzero(m.reshape(-1)).squeeze(1).cpu() if m is not None else None
            size = cand.numel() if cand is not None else scores[n].numel()
            pick = sample_without_replacement(size, min(cap, size), generator(seed, f"{rule.name}/{n}/{draw}"))
            i = cand[pick] if cand is not None else pick
        else:
            x, ok = rule.candidates(scores, n, mask_fn)
            cand = torch.nonzero(ok).squeeze(1)
            size = cand.numel()
            pos = best(x[cand], tie_hash(seed, n, cand), min(cap, size))
            i = cand[pos].cpu()
        n_cand += size
        sup = max(sup, size)
        P.append(torch.full((i.numel(),), pid, dtype=torch.int64))
        I.append(i)
        S.append(scores[n].detach().reshape(-1)[i.to(scores[n].device)].float().cpu())
        R.append(torch.arange(i.numel()))
    pid = torch.cat(P)
    return Ranking(names, shapes, pid, torch.cat(I), torch.cat(S), torch.cat(R), "per_layer", rule.name,
                   sup if rule.support else None, n_cand, group=pid.clone())


def row_index(shape: tuple[int, ...], in_axis: int) -> torch.Tensor:
    """Flat indices arranged [output neurons, row length]: row r holds the weights feeding output neuron r
    (for each expert), i.e. every coordinate but the input axis fixed. 1-D: one row."""
    n = 1
    for d in shape:
        n *= d
    if len(shape) < 2:
        return torch.arange(n).reshape(1, n)
    return torch.arange(n).reshape(shape).movedim(in_axis, -1).reshape(-1, shape[in_axis])


@MODES.register("per_row")
def rank_per_row(scores, k, rule: Rule, seed=0, draw=0, mask_fn: Mask | None = None, quota: dict | None = None,
                 in_axis: InAxis | None = None) -> Ranking:
    """Per output neuron (group id = param index << 40 | row), K or its quota, within a row by (key desc,
    u asc); a uniform rule ranks each row's candidates by a seeded uniform key salted by the draw, i.e. a
    uniform random subset per row. `in_axis(name)` (default: the last axis, nn.Linear [out, in]) is the
    axis a row runs along."""
    names = list(scores)
    shapes = [tuple(scores[n].shape) for n in names]
    P, I, S, R, G = [], [], [], [], []
    n_cand = sup = 0
    for pid, n in enumerate(names):
        s = scores[n]
        ax = (in_axis(n) if in_axis is not None else s.ndim - 1) % max(s.ndim, 1)
        idx = row_index(tuple(s.shape), ax)
        rows, cols = idx.shape
        x, ok = rule.candidates(scores, n, mask_fn)
        x, ok = x.cpu()[idx], ok.cpu()[idx]
        u = tie_hash(seed, n, idx, salt=0 if rule.key is not None else 1 + draw)
        per_row = ok.sum(1)
        n_cand += int(per_row.sum())
        sup = max(sup, int(per_row.max()) if rows else 0)
        x = torch.where(ok, x, torch.full_like(x, float("-inf")))
        o1 = torch.argsort(u, dim=1, stable=True)
        o2 = torch.argsort(torch.gather(x, 1, o1), dim=1, descending=True, stable=True)
        order = torch.gather(o1, 1, o2)[:, :k]
        rank_in_row = torch.arange(order.size(1)).expand(rows, -1)
        keep = torch.gather(ok, 1, order)
        if quota is not None:
            gid = (pid << SHIFT) | torch.arange(rows)
            cap = torch.tensor([quota.get(g, 0) for g in gid.tolist()], dtype=torch.int64)
            keep &= rank_in_row < cap.unsqueeze(1)
        flat = torch.gather(idx, 1, order)[keep]
        row = torch.arange(rows).unsqueeze(1).expand(-1, order.size(1))[keep]
        P.append(torch.full((flat.numel(),), pid, dtype=torch.int64))
        I.append(flat)
        S.append(s.detach().reshape(-1)[flat.to(s.device)].float().cpu())
        R.append(rank_in_row[keep])
        G.append((pid << SHIFT) | row)
    return Ranking(names, shapes, torch.cat(P), torch.cat(I), torch.cat(S), torch.cat(R), "per_row", rule.name,
                   sup if rule.support else None, n_cand, group=torch.cat(G))
