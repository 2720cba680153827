"""Flat batch arrays shared by the eager step (`runner.py`) and the static decode path
(`graphs.py`): block tables and slot mapping (`transfer.py` makes the one host-to-device copy per array)."""

from __future__ import annotations

from typing import Sequence as Seq

import numpy as np

from .scheduler import ScheduledChunk


def block_table_array(chunks: Seq[ScheduledChunk], rows: int, width: int, fill: int = 0) -> np.ndarray:
    """[rows, width] int32: chunk i's block table in row i, the rest `fill`."""
    tables = np.full((rows, width), fill, np.int32)
    for i, c in enumerate(chunks):
        tables[i, :len(c.seq.block_table)] = c.seq.block_table
    return tables


def slot_mapping(tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Flat KV slot of each token: its row's block_table[pos // bs] * bs + pos % bs, int64."""
    return tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
