"""Exact substring search over an instruction-tuning dataset: a positional byte-trigram index.

The borrowing analysis asks, for each hallucinated phrase, "which IT instances contain exactly this
string?" (the paper's string search). Scanning 326k instances per phrase is too slow, so the texts
are concatenated as UTF-8 bytes (a NUL byte between documents) and every byte position is filed
under the trigram that starts there. Candidate start positions come from the query's rarest
trigram; each is then checked byte by byte against the query in the joined buffer (vectorised
gathers), so a match is exactly "the query occurs here". Queries of 1-2 bytes are contiguous ranges of trigram codes. Because UTF-8 is
self-synchronising, byte matches are character matches. Results equal :func:`scan` exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SEPARATOR = 0  # NUL byte between documents; a query containing it matches nothing
_NCODES = 1 << 24


def _normalise(text: str, ignore_case: bool) -> str:
    return text.casefold() if ignore_case else text


def scan(texts: Sequence[str], query: str, *, ignore_case: bool = False) -> list[int]:
    """Brute-force reference: indices of ``texts`` that contain ``query`` (NUL in a text reads as a space)."""
    q = _normalise(query, ignore_case)
    if "\x00" in q:
        return []
    return [i for i, t in enumerate(texts) if q in _normalise(t, ignore_case).replace("\x00", " ")]


class TextIndex:
    """Which documents contain a string, exactly; built once, queried in about a millisecond."""

    def __init__(self, buffer: np.ndarray, doc_starts: np.ndarray, offsets: np.ndarray, positions: np.ndarray,
                 ignore_case: bool):
        self._buf = buffer  # uint8, documents joined by SEPARATOR, padded with 2 separators
        self._doc_starts = doc_starts  # int64, byte offset of each document
        self._offsets = offsets  # trigram code -> slice of ``positions``
        self._positions = positions  # byte positions sorted by (trigram code, position)
        self.ignore_case = ignore_case

    @classmethod
    def build(cls, texts: Sequence[str], *, ignore_case: bool = False) -> "TextIndex":
        """Index ``texts`` (e.g. each IT instance's instruction + response)."""
        chunks = [_normalise(t, ignore_case).replace("\x00", " ").encode("utf-8", "surrogatepass")
                  for t in texts]  # surrogatepass: a lone surrogate (valid JSON) encodes as its own bytes
        lengths = np.fromiter((len(c) + 1 for c in chunks), dtype=np.int64, count=len(chunks))
        doc_starts = np.zeros(len(chunks), dtype=np.int64)
        if len(chunks) > 1:
            np.cumsum(lengths[:-1], out=doc_starts[1:])
        joined = b"\x00".join(chunks) + b"\x00\x00\x00"
        buf = np.frombuffer(joined, dtype=np.uint8)
        n = len(buf) - 2
        codes = (buf[:n].astype(np.int32) << 16) | (buf[1:n + 1].astype(np.int32) << 8) | buf[2:n + 2]
        counts = np.bincount(codes, minlength=_NCODES)
        if n < 2**31:  # sort (code << 32 | position): unique keys, so the fast SIMD sort is exact
            key = codes.astype(np.int64)
            del codes
            key <<= 32
            key |= np.arange(n, dtype=np.int64)
            key.sort()
            positions = key.astype(np.int32)  # the low 32 bits: the position
            del key
        else:
            positions = np.argsort(codes, kind="stable")
            del codes
        offsets = np.zeros(_NCODES + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(buf, doc_starts, offsets, positions, ignore_case)

    def __len__(self) -> int:
        return len(self._doc_starts)

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes + self._doc_starts.nbytes + self._offsets.nbytes + self._positions.nbytes)

    def _code_range(self, lo_code: int, hi_code: int) -> np.ndarray:
        return self._positions[self._offsets[lo_code]:self._offsets[hi_code]]

    def occurrences(self, query: str) -> np.ndarray:
        """Sorted byte positions (in the joined buffer) where ``query`` starts."""
        q = _normalise(query, self.ignore_case).encode("utf-8", "surrogatepass")
        if b"\x00" in q:
            return np.zeros(0, dtype=np.int64)
        if len(q) == 0:
            raise ValueError("empty query")
        if len(q) < 3:  # every trigram that starts with the query: one contiguous code range
            lo = q[0] << 16 | (q[1] << 8 if len(q) == 2 else 0)
            hi = lo + (1 << 8 if len(q) == 2 else 1 << 16)
            return np.sort(self._code_range(lo, hi)).astype(np.int64)
        # Candidates from the rarest trigram of the query, then a vectorised byte-by-byte check.
        qa = np.frombuffer(q, dtype=np.uint8)
        codes = (qa[:-2].astype(np.int64) << 16) | (qa[1:-1].astype(np.int64) << 8) | qa[2:]
        sizes = self._offsets[codes + 1] - self._offsets[codes]
        k0 = int(np.argmin(sizes))
        if sizes[k0] == 0:
            return np.zeros(0, dtype=np.int64)
        cand = self._code_range(int(codes[k0]), int(codes[k0]) + 1).astype(np.int64) - k0
        cand = cand[cand >= 0]
        last = len(self._buf) - 1  # a separator byte: never equal to a query byte
        for j in range(len(q)):
            if k0 <= j < k0 + 3 or len(cand) == 0:
                continue
            cand = cand[self._buf[np.minimum(cand + j, last)] == qa[j]]
        return cand

    def find(self, query: str) -> list[int]:
        """Sorted indices of the documents that contain ``query`` (same as :func:`scan`)."""
        pos = self.occurrences(query)
        if len(pos) == 0:
            return []
        docs = np.searchsorted(self._doc_starts, pos, side="right") - 1  # sorted, since pos is
        return docs[np.r_[True, docs[1:] != docs[:-1]]].tolist()

    def count(self, query: str) -> int:
        """Number of documents that contain ``query``."""
        return len(self.find(query))

    def contains(self, query: str) -> bool:
        return len(self.occurrences(query)) > 0
