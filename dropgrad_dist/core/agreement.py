"""Rank agreement: one mechanism checks that what must be equal on every rank is equal.

Seeds, rates, schedules, step counts, random draws and histories must be identical on every
rank of a data-parallel run, or ranks silently diverge. Every regularizer checks them here:

    check = AgreementCheck("DropGrad", process_group)
    pending = check.start({"seed": seed, "step_index": t, ...})   # asynchronous
    ...                                                            # overlap with other work
    pending.wait()                                                 # raises RankDisagreement

Each check all-reduces (MAX) one int64 vector ``[f_1..f_K, -f_1..-f_K]`` of per-field
fingerprints, so ``max == -max(-f) = min`` for every field iff the ranks agree. The vector has
a fixed length whatever the owner, so two ranks running different checks (or one rank loading
a checkpoint and the other not) still run the same collective and see a mismatch instead of
hanging. Every rank gets the same result and takes the same path: only on a mismatch do all
ranks all-gather the fingerprints to name the ranks that differ, then all raise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .collectives import SentTensors

__all__ = ["AgreementCheck", "PendingCheck", "RankDisagreement", "all_ranks_ok", "collective_device", "fingerprint"]

FIELDS = 12  # fingerprints per check; more fields are folded into the last one
_FINGERPRINT_BITS = 62  # |f| < 2**62, so -f never overflows int64


class RankDisagreement(ValueError):
    """Ranks hold different values of a field that must be equal on every rank."""


def fingerprint(value: object) -> int:
    """A stable 62-bit digest of ``repr(value)`` (exact for ints, floats, strings and tuples of them)."""
    digest = hashlib.blake2b(repr(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _FINGERPRINT_BITS)


def all_ranks_ok(ok: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether every rank of ``group`` is ``ok`` (one MIN all-reduce of one integer; ``ok`` itself in one process).

    A checkpoint load that one rank refuses must stop every rank, not only the one that refused.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device small collectives of ``group`` run on, from its real backend and the devices present.

    CPU for gloo and MPI, and whenever no accelerator is usable (a CUDA build of torch on a
    machine without a GPU reports CUDA as its accelerator); else the current accelerator device
    (NCCL and the other device backends take only device tensors).
    """
    backend = str(dist.get_backend(group)).lower()
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _fold(fields: Mapping[str, object]) -> list[tuple[str, object]]:
    items = list(fields.items())
    if len(items) <= FIELDS:
        return items
    head, tail = items[:FIELDS - 1], items[FIELDS - 1:]
    return [*head, (" + ".join(name for name, _ in tail), tuple(value for _, value in tail))]


def _names(value: object) -> bool:
    """A string or a tuple of strings and tuples of them: equal values have equal reprs."""
    return type(value) is str or (type(value) is tuple and all(map(_names, value)))


class PendingCheck:
    """An agreement all-reduce in flight; :meth:`wait` raises if the ranks disagree."""

    def __init__(self, check: AgreementCheck, items: list[tuple[str, object]], prints: list[int],
                 vector: torch.Tensor, work: Any) -> None:
        self._check, self._items, self._prints, self._vector, self._work = check, items, prints, vector, work

    def wait(self) -> None:
        self._work.wait()
        reduced = self._vector.tolist()
        split = [i for i in range(FIELDS) if reduced[i] != -reduced[FIELDS + i]]
        if split:
            mine = torch.tensor(self._prints, dtype=torch.int64, device=self._vector.device)
            self._check._explain(self._items, mine, split[0])


class AgreementCheck:
    """Checks that every rank of ``group`` holds equal values of named fields.

    ``owner`` names who checks (it appears in errors and is itself a checked field, so ranks
    running different checks at the same point are told so). A no-op outside
    ``torch.distributed`` or on a group of one rank.
    """

    def __init__(self, owner: str, group: dist.ProcessGroup | None = None) -> None:
        self.owner = owner
        self.group = group
        self._prints: dict[str, tuple[object, int]] = {}  # name -> (value, fingerprint): reuse for the same object
        self._sent = SentTensors()  # the last check's vector (see collectives.py)

    @property
    def active(self) -> bool:
        """True when there are other ranks to agree with."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def start(self, fields: Mapping[str, object], device: torch.device | None = None) -> PendingCheck | None:
        """Launch the check of ``fields`` (name -> value) asynchronously; None when inactive."""
        if not self.active:
            return None
        items = _fold({"checked by": (self.owner, tuple(fields)), **fields})
        prints = [self._fingerprint(name, value) for name, value in items]
        prints += [0] * (FIELDS - len(prints))
        # One tensor from one list (no cat): a round's fixed cost counts at a thousand tensors a step. Its
        # storage is torch's own, never a numpy array's: a gloo worker may drop it without the GIL at exit.
        device = device if device is not None else collective_device(self.group)
        vector = torch.tensor(prints + [-f for f in prints], dtype=torch.int64, device=device)
        self._sent.release()  # an owner waits for one check before it starts the next
        self._sent.hold(vector)
        work = dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return PendingCheck(self, items, prints, vector, work)

    def _fingerprint(self, name: str, value: object) -> int:
        # Owners pass the same config object every step (or an equal tuple of names): hash its repr once.
        cached = self._prints.get(name)
        if cached is not None and (cached[0] is value or (_names(value) and cached[0] == value)):
            return cached[1]
        digest = fingerprint(value)
        self._prints[name] = (value, digest)
        return digest

    def check(self, fields: Mapping[str, object], device: torch.device | None = None) -> None:
        """Check ``fields`` now (blocking); raises :class:`RankDisagreement` naming field and ranks."""
        pending = self.start(fields, device)
        if pending is not None:
            pending.wait()

    def _explain(self, items: list[tuple[str, object]], mine: torch.Tensor, first_split: int) -> None:
        # Every rank saw the same mismatch, so every rank gathers: the collective stays symmetric.
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, mine.contiguous(), group=self.group)
        table = torch.stack(gathered).cpu().tolist()
        column = next((c for c in range(FIELDS) if len({row[c] for row in table}) > 1), first_split)
        by_print: dict[int, list[int]] = {}
        for rank, row in enumerate(table):
            global_rank = rank if self.group is None else dist.get_global_rank(self.group, rank)
            by_print.setdefault(row[column], []).append(global_rank)
        split = " vs ".join(str(ranks) for ranks in by_print.values())
        name, value = items[column] if column < len(items) else ("(a field this rank does not check)", None)
        raise RankDisagreement(
            f"{self.owner}: ranks disagree on {name!r} (ranks {split}); rank {dist.get_rank(self.group)} has "
            f"{name}={value!r}. Every rank must build it with the same arguments, load the same checkpoint "
            f"and take the same optimizer steps")
