"""Point-to-point transfers between pipeline ranks over torch.distributed, with errors that say which peer and
which transfer failed. Arrays are numpy arrays on the ref target, or torch tensors on the rank's device on the cuda
target: NCCL moves those GPU to GPU, gloo through host copies.

A dead peer surfaces in gloo either at once (its sockets close: "Connection closed by peer") or after the process
group's timeout; both become a `PeerError`, and the rank stops (its own exit then closes its sockets, so the
failure travels down the pipeline to every rank instead of leaving one waiting).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

# Tags keep the two directions and the micro-batches apart; the ranks' orders already match, this makes a
# mismatch an error (a wrong-shape receive) rather than silently swapped data. GATHER: a replica's results sent to
# the rank that joins them (expert-parallel inference); its "micro-batch" is the sending replica.
FORWARD, BACKWARD, GATHER = 0, 1, 2
_CARRIES = ("activation {i} of micro-batch {m}", "cotangent {i} of micro-batch {m}", "result {i} of replica {m}")


class PeerError(RuntimeError):
    """A transfer with another rank failed: the peer died, or did not answer within the timeout."""


def tag(kind: int, micro_batch: int, index: int) -> int:
    return (micro_batch * len(_CARRIES) + kind) * 4096 + index


class Channel:
    def __init__(
        self, rank: int, world: int, timeout_s: float, device: torch.device | None = None, nccl: bool = False
    ) -> None:
        """`device`: received arrays are torch tensors there (None: numpy arrays); `nccl`: the process group is
        NCCL's, whose transfers read and write GPU tensors."""
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.device, self.nccl = device, nccl
        self.wire = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._pending: list[tuple[dist.Work, torch.Tensor, int, str]] = []

    def _fail(self, what: str, peer: int | None, e: Exception) -> PeerError:
        who = f"rank {peer}" if peer is not None else "the other ranks"
        # gloo's message: "[file:line] Connection closed by peer [addr]:port. This is typically caused by ..."
        detail = (str(e).splitlines() or [""])[0].split(" This is typically")[0]
        return PeerError(
            f"rank {self.rank}: {what} with {who} failed (a rank died or did not answer within "
            f"{self.timeout_s:g} s): {type(e).__name__}: {detail}"
        )

    def send(self, arrays: list[np.ndarray], dst: int, kind: int, micro_batch: int) -> None:
        """Start sending; `flush` waits for completion (the receiver may not have posted its receive yet)."""
        for i, x in enumerate(arrays):
            t = self._wire(x)
            what = "sending " + _CARRIES[kind].format(i=i, m=micro_batch)
            try:
                work = dist.isend(t, dst, tag=tag(kind, micro_batch, i))
            except RuntimeError as e:
                raise self._fail(what, dst, e) from None
            self._pending.append((work, t, dst, what))  # keep t alive until the send completes

    def recv(
        self, specs: list[tuple[tuple[int, ...], np.dtype | torch.dtype]], src: int, kind: int, micro_batch: int
    ) -> list[np.ndarray | torch.Tensor]:
        out = []
        for i, (shape, dtype) in enumerate(specs):
            # a torch dtype: a device tensor's own (bf16 activations of a cuda stage); else a numpy one
            is_torch = isinstance(dtype, torch.dtype)
            t = torch.empty(shape, dtype=dtype if is_torch else _torch_dtype(np.dtype(dtype)), device=self.wire)
            what = "receiving " + _CARRIES[kind].format(i=i, m=micro_batch)
            try:
                dist.recv(t, src, tag=tag(kind, micro_batch, i))
            except RuntimeError as e:
                raise self._fail(what, src, e) from None
            if self.device is None:
                out.append(_from_tensor(t, np.dtype(dtype)))
            else:
                out.append((t.bool() if not is_torch and np.dtype(dtype) == np.dtype(bool) else t).to(self.device))
        return out

    def _wire(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`x` as a contiguous tensor where the process group reads it (a copy: sends are asynchronous)."""
        if not isinstance(x, torch.Tensor):
            return _to_tensor(x).to(self.wire)
        t = x.to(torch.uint8) if x.dtype == torch.bool else x
        return t.to(self.wire, copy=True).contiguous()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for work, _, dst, what in pending:
            try:
                work.wait()
            except RuntimeError as e:
                raise self._fail(what, dst, e) from None

    def all_reduce_sum(
        self, values: np.ndarray | torch.Tensor, what: str, group: dist.ProcessGroup | None = None
    ) -> np.ndarray | torch.Tensor:
        """The float64 sum over every rank (or over `group`'s ranks: the replicas of one stage), as a numpy array
        or as a tensor on the input's device (NCCL reduces GPU tensors in place)."""
        if isinstance(values, torch.Tensor):
            t = values.to(self.wire, torch.float64, copy=True)
        else:
            t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64).copy()).to(self.wire)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        except RuntimeError as e:
            raise self._fail(what, None, e) from None
        return t.to(values.device) if isinstance(values, torch.Tensor) else t.cpu().numpy()

    def broadcast(self, value: object, what: str, src: int = 0) -> object:
        """Rank `src`'s picklable `value` on every rank (the others pass anything, e.g. None)."""
        box = [value]
        try:
            dist.broadcast_object_list(box, src=src)
        except RuntimeError as e:
            raise self._fail(what, None if self.rank == src else src, e) from None
        return box[0]

    def all_to_all(
        self,
        rows: np.ndarray,
        counts: np.ndarray,
        what: str,
        group: dist.ProcessGroup,
        recv_counts: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Send rows[:counts[0]] to `group`'s rank 0, the next counts[1] rows to its rank 1, ...; returns the rows
        every group rank sent this one (group-rank order, float64) and their counts, which are exchanged first
        unless given (`recv_counts`: a reply to an exchange whose counts are known)."""
        try:
            if recv_counts is None:
                got = torch.empty(len(counts), dtype=torch.int64)
                dist.all_to_all_single(got, torch.from_numpy(counts.astype(np.int64)), group=group)
                recv_counts = got.numpy()
            out = torch.empty((int(recv_counts.sum()), rows.shape[1]), dtype=torch.float64)
            send = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64))
            dist.all_to_all_single(out, send, recv_counts.tolist(), counts.tolist(), group=group)
        except RuntimeError as e:
            raise self._fail(what, None, e) from None
        return out.numpy(), recv_counts


_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.uint8): torch.uint8,
}


def _torch_dtype(d: np.dtype) -> torch.dtype:
    if d == np.dtype(bool):
        return torch.uint8  # sent as bytes: gloo's bool support varies between versions
    if d not in _DTYPES:
        raise PeerError(f"cannot send arrays of dtype {d} between pipeline stages (supported: bool, {list(_DTYPES)})")
    return _DTYPES[d]


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    x = np.ascontiguousarray(x)
    if x.dtype == np.dtype(bool):
        x = x.view(np.uint8)
    _torch_dtype(x.dtype)
    return torch.from_numpy(x.copy())


def _from_tensor(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    x = t.numpy()
    return x.view(bool) if dtype == np.dtype(bool) else x
