"""Triton kernels for ``kernel.steer_rows_`` (imported lazily: only where Triton is installed).

Grid (row, chunk) of ``block`` tokens each, two launches, no host sync:

1. ``_partials``: per chunk, ``m = max z``, ``l = sum exp(z - m)``, ``q = sum exp(z - m) s``
   into the workspace (a row's chunks are spread over many SMs, so batch 1 is not one SM's work).
2. ``_apply``: every program combines its row's partials (``M = max m``,
   ``L = sum l e^(m-M)``, ``<p,s> = sum q e^(m-M) / L``), reads its chunk again and writes
   ``z + mu p (<p,s> - s)`` on the mask ``z >= M + log alpha`` and ``-inf`` elsewhere; ``s`` is
   read only where the mask holds.

Rows whose state has ``table_row < 0`` return at once in both launches; all ``-inf`` rows are
left untouched. Traffic: the logits are read twice and written once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .request_slots import SlotTensors

__all__ = ["LaunchSettings", "launch_settings", "steer_rows_", "workspace"]

#: Tokens per program at most: 4096 fp32 = 16 KiB per program, 38 programs for a 152k row.
MAX_BLOCK = 4096
#: Chunks per row at least (small vocabularies still spread a row over several programs).
MIN_CHUNKS = 4


class LaunchSettings(NamedTuple):
    block: int  # tokens per program, a power of two
    num_chunks: int  # programs per row
    num_warps: int


def launch_settings(vocab_size: int) -> LaunchSettings:
    """The one place block size and warps are chosen: ``MAX_BLOCK`` tokens per program, fewer
    (a power of two, down to 16) where that would leave a row fewer than ``MIN_CHUNKS``
    programs."""
    per_chunk = triton.cdiv(vocab_size, MIN_CHUNKS)
    block = max(16, min(MAX_BLOCK, 1 << (per_chunk.bit_length() - 1)))
    return LaunchSettings(block, triton.cdiv(vocab_size, block), max(1, min(8, block // 512)))


def workspace(rows: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The per-(row, chunk) partials buffer: ``[rows, chunks, 3]`` float32."""
    chunks = launch_settings(vocab_size).num_chunks
    return torch.empty((rows, chunks, 3), dtype=torch.float32, device=device)


@triton.jit
def _idx_mapping(idx_mapping_ptr, table_row_ptr, HAS_IDX_MAPPING: tl.constexpr):
    """This program's logits row, its state index and its table row (-1: not steered)."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_IDX_MAPPING:
        state_idx = tl.load(idx_mapping_ptr + row).to(tl.int64)
    else:
        state_idx = row
    return row, state_idx, tl.load(table_row_ptr + state_idx).to(tl.int64)


@triton.jit
def _partials(
    logits_ptr,
    logits_row_stride,
    idx_mapping_ptr,
    table_row_ptr,
    table_ptr,
    table_row_stride,
    partials_ptr,
    vocab_size,
    num_chunks,
    HAS_IDX_MAPPING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, _, table_row = _idx_mapping(idx_mapping_ptr, table_row_ptr, HAS_IDX_MAPPING)
    chunk = tl.program_id(1)
    if table_row >= 0:
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        in_vocab = offs < vocab_size
        z_ptrs = logits_ptr + row * logits_row_stride + offs
        z = tl.load(z_ptrs, mask=in_vocab, other=-float("inf")).to(tl.float32)
        s = tl.load(table_ptr + table_row * table_row_stride + offs, mask=in_vocab, other=0.0)
        chunk_max = tl.max(z, axis=0)
        safe_max = tl.where(chunk_max == -float("inf"), 0.0, chunk_max)
        e = tl.exp(z - safe_max)  # -inf tokens (and padding) give 0
        out = partials_ptr + (row * num_chunks + chunk) * 3
        tl.store(out, chunk_max)
        tl.store(out + 1, tl.sum(e, axis=0))
        tl.store(out + 2, tl.sum(e * s, axis=0))


@triton.jit
def _apply(
    logits_ptr,
    logits_row_stride,
    idx_mapping_ptr,
    table_row_ptr,
    mu_ptr,
    log_alpha_ptr,
    table_ptr,
    table_row_stride,
    partials_ptr,
    vocab_size,
    num_chunks,
    HAS_IDX_MAPPING: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,
):
    row, state_idx, table_row = _idx_mapping(idx_mapping_ptr, table_row_ptr, HAS_IDX_MAPPING)
    chunk = tl.program_id(1)
    if table_row >= 0:
        c = tl.arange(0, CHUNKS_POW2)
        is_chunk = c < num_chunks
        partials = partials_ptr + (row * num_chunks + c) * 3
        chunk_max = tl.load(partials, mask=is_chunk, other=-float("inf"))
        chunk_sum = tl.load(partials + 1, mask=is_chunk, other=0.0)
        chunk_dot = tl.load(partials + 2, mask=is_chunk, other=0.0)
        row_max = tl.max(chunk_max, axis=0)
        if row_max > -float("inf"):  # an all -inf row stays as it is
            w = tl.exp(chunk_max - row_max)
            total = tl.sum(chunk_sum * w, axis=0)
            ps = tl.sum(chunk_dot * w, axis=0) / total
            mu = tl.load(mu_ptr + state_idx)
            threshold = row_max + tl.load(log_alpha_ptr + state_idx)
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            in_vocab = offs < vocab_size
            z_ptrs = logits_ptr + row * logits_row_stride + offs
            z_in = tl.load(z_ptrs, mask=in_vocab, other=-float("inf"))
            z = z_in.to(tl.float32)
            keep = (z >= threshold) & in_vocab
            s = tl.load(table_ptr + table_row * table_row_stride + offs, mask=keep, other=0.0)
            p = tl.exp(z - row_max) / total
            out = tl.where(keep, z + mu * p * (ps - s), -float("inf"))
            tl.store(z_ptrs, out.to(z_in.dtype), mask=in_vocab)


def steer_rows_(
    logits: torch.Tensor,
    table: torch.Tensor,
    state: SlotTensors,
    idx_mapping: torch.Tensor | None,
    work: torch.Tensor,
) -> None:
    """Launch both kernels on the current stream (see the module doc)."""
    rows, vocab_size = logits.shape
    if rows == 0:
        return
    table_row, mu, log_alpha = state
    launch = launch_settings(vocab_size)
    grid = (rows, launch.num_chunks)
    has_idx_mapping = idx_mapping is not None
    idx_mapping = (
        idx_mapping if idx_mapping is not None else table_row
    )  # unread without an idx_mapping
    # What both launches read: the rows, their state, the table, the partials, the launch shape.
    shared = dict(
        logits_ptr=logits,
        logits_row_stride=logits.stride(0),
        idx_mapping_ptr=idx_mapping,
        table_row_ptr=table_row,
        table_ptr=table,
        table_row_stride=table.stride(0),
        partials_ptr=work,
        vocab_size=vocab_size,
        num_chunks=launch.num_chunks,
        HAS_IDX_MAPPING=has_idx_mapping,
        BLOCK=launch.block,
        num_warps=launch.num_warps,
    )
    _partials[grid](**shared)
    _apply[grid](
        **shared,
        mu_ptr=mu,
        log_alpha_ptr=log_alpha,
        CHUNKS_POW2=triton.next_power_of_2(launch.num_chunks),
    )
