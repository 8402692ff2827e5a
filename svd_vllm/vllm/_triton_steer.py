"""Triton kernels for ``kernel.steer_rows_`` (imported lazily: only where Triton is installed).

Grid (row, chunk) of ``BLOCK`` tokens each, two launches, no host sync:

1. ``_partials``: per chunk, ``m = max z``, ``l = sum exp(z - m)``, ``q = sum exp(z - m) s``
   into the workspace (a row's chunks are spread over many SMs, so batch 1 is not one SM's work).
2. ``_apply``: every program combines its row's partials (``M = max m``,
   ``L = sum l e^(m-M)``, ``<p,s> = sum q e^(m-M) / L``), reads its chunk again and writes
   ``z + mu p (<p,s> - s)`` on the mask ``z >= M + log alpha`` and ``-inf`` elsewhere; ``s`` is
   read only where the mask holds.

Rows whose state has ``table_idx < 0`` return at once in both launches; all ``-inf`` rows are
left untouched. Traffic: the logits are read twice and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel import SlotTensors

__all__ = ["BLOCK", "steer_rows_", "workspace"]

#: Tokens per program. 4096 fp32 = 16 KiB per program: 38 programs for one 152k row.
BLOCK = 4096


def _chunks(vocab: int) -> int:
    return int(triton.cdiv(vocab, BLOCK))


def workspace(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The per-(row, chunk) partials buffer: ``[rows, chunks, 3]`` float32."""
    return torch.empty((rows, _chunks(vocab), 3), dtype=torch.float32, device=device)


@triton.jit
def _row_state(state_ptr, tidx_ptr, HAS_STATE: tl.constexpr):
    """This program's logits row, its state index and its table row (-1: not steered)."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_STATE:
        st = tl.load(state_ptr + row).to(tl.int64)
    else:
        st = row
    return row, st, tl.load(tidx_ptr + st).to(tl.int64)


@triton.jit
def _partials(
    z_ptr, z_stride, state_ptr, tidx_ptr, table_ptr, t_stride, part_ptr, V, NCHUNK,
    HAS_STATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row, _, t = _row_state(state_ptr, tidx_ptr, HAS_STATE)
    chunk = tl.program_id(1)
    if t >= 0:
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        inb = offs < V
        z = tl.load(z_ptr + row * z_stride + offs, mask=inb, other=-float("inf")).to(tl.float32)
        s = tl.load(table_ptr + t * t_stride + offs, mask=inb, other=0.0)
        m = tl.max(z, axis=0)
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        e = tl.exp(z - m_safe)  # -inf tokens (and padding) give 0
        base = part_ptr + (row * NCHUNK + chunk) * 3
        tl.store(base, m)
        tl.store(base + 1, tl.sum(e, axis=0))
        tl.store(base + 2, tl.sum(e * s, axis=0))


@triton.jit
def _apply(
    z_ptr, z_stride, state_ptr, tidx_ptr, mu_ptr, la_ptr, table_ptr, t_stride, part_ptr, V,
    NCHUNK, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr, CPAD: tl.constexpr,
):  # fmt: skip
    row, st, t = _row_state(state_ptr, tidx_ptr, HAS_STATE)
    chunk = tl.program_id(1)
    if t >= 0:
        c = tl.arange(0, CPAD)
        cm = c < NCHUNK
        pbase = part_ptr + (row * NCHUNK + c) * 3
        pm = tl.load(pbase, mask=cm, other=-float("inf"))
        pl = tl.load(pbase + 1, mask=cm, other=0.0)
        pq = tl.load(pbase + 2, mask=cm, other=0.0)
        big = tl.max(pm, axis=0)
        if big > -float("inf"):  # an all -inf row stays as it is
            w = tl.exp(pm - big)
            total = tl.sum(pl * w, axis=0)
            ps = tl.sum(pq * w, axis=0) / total
            mu = tl.load(mu_ptr + st)
            thr = big + tl.load(la_ptr + st)
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            inb = offs < V
            zp = z_ptr + row * z_stride + offs
            zin = tl.load(zp, mask=inb, other=-float("inf"))
            z = zin.to(tl.float32)
            keep = (z >= thr) & inb
            s = tl.load(table_ptr + t * t_stride + offs, mask=keep, other=0.0)
            p = tl.exp(z - big) / total
            out = tl.where(keep, z + mu * p * (ps - s), -float("inf"))
            tl.store(zp, out.to(zin.dtype), mask=inb)


def steer_rows_(
    logits: torch.Tensor,
    table: torch.Tensor,
    slots: SlotTensors,
    row_state: torch.Tensor | None,
    work: torch.Tensor,
) -> None:
    """Launch both kernels on the current stream (see the module doc)."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    table_idx, mu, log_alpha = slots
    nchunk = _chunks(vocab)
    grid = (rows, nchunk)
    state = row_state if row_state is not None else table_idx  # unused when HAS_STATE is False
    has_state = row_state is not None
    _partials[grid](
        logits, logits.stride(0), state, table_idx, table, table.stride(0), work, vocab, nchunk,
        HAS_STATE=has_state, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    _apply[grid](
        logits, logits.stride(0), state, table_idx, mu, log_alpha, table, table.stride(0), work,
        vocab, nchunk, HAS_STATE=has_state, BLOCK=BLOCK, CPAD=triton.next_power_of_2(nchunk),
        num_warps=8,
    )  # fmt: skip
