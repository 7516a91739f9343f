"""O(1)-memory seeded bijection on [0, N), evaluated for whole numpy arrays of positions at once.

A keyed Feistel network permutes the bit domain [0, 2**m) with 2**m the smallest power of two ≥ N (m ≥ 2);
cycle-walking (re-encrypting values that land at or above N) restricts it to [0, N) and keeps it a bijection
(Black & Rogaway, "Ciphers with Arbitrary Finite Domains", 2002). For odd m the halves differ by one bit and
alternate sides every round, each round staying invertible. Since 2**m < 2N, each element needs fewer than two
encryptions on average. No N-length array is ever built: memory is O(len(positions)).
"""

from __future__ import annotations

import numpy as np

__all__ = ["Permutation"]

_NUM_ROUNDS = 6
_MUL1 = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 / splitmix64 finaliser constants
_MUL2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT = np.uint64(33)


def _round_keys(seed: int, epoch: int, n: int) -> np.ndarray:
    """Derive the Feistel round keys from (seed, epoch, n) with numpy's SeedSequence hash."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed {seed} and epoch {epoch} must be non-negative")
    return np.random.SeedSequence([seed, epoch, n]).generate_state(_NUM_ROUNDS, dtype=np.uint64)


class Permutation:
    """Seeded pseudo-random bijection on [0, n); the same (n, seed, epoch) always gives the same order."""

    def __init__(self, n: int, seed: int = 0, epoch: int = 0) -> None:
        if n < 1:
            raise ValueError(f"permutation size n={n} must be at least 1")
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = int(epoch)
        bits = max(2, (self.n - 1).bit_length())
        # Half widths of the Feistel state: (left, right); they swap after every round.
        self._widths = ((bits + 1) // 2, bits // 2)
        self._keys = _round_keys(self.seed, self.epoch, self.n)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Permutation(n={self.n}, seed={self.seed}, epoch={self.epoch})"

    def __getitem__(self, position: int) -> int:
        """Return the image of one position (negative positions count from the end, like a list)."""
        if position < 0:
            position += self.n
        if not 0 <= position < self.n:
            raise IndexError(f"position {position} out of range for permutation of size {self.n}")
        return int(self(np.array([position], dtype=np.uint64))[0])

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Map an integer array of positions in [0, n) to their images (int64 array of the same shape)."""
        pos = np.asarray(positions)
        if pos.size == 0:
            return np.zeros(pos.shape, dtype=np.int64)
        if not np.issubdtype(pos.dtype, np.integer):
            raise TypeError(f"positions must be an integer array, got dtype {pos.dtype}")
        low, high = int(pos.min()), int(pos.max())
        if low < 0 or high >= self.n:
            raise IndexError(f"positions span [{low}, {high}], outside [0, {self.n})")
        out = self._encrypt(pos.astype(np.uint64).ravel())
        todo = np.flatnonzero(out >= self.n)
        while todo.size:  # cycle-walk only the elements still outside [0, n)
            values = self._encrypt(out[todo])
            out[todo] = values
            todo = todo[values >= self.n]
        return out.astype(np.int64).reshape(pos.shape)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over [0, 2**bits); returns a new uint64 array."""
        left_bits, right_bits = self._widths
        left = x >> np.uint64(right_bits)
        right = x & np.uint64((1 << right_bits) - 1)
        tmp = np.empty_like(x)
        for key in self._keys:
            # (L, R) -> (R, L ^ F(R)): invertible whatever F is; the widths swap with the halves.
            _mix(right, key, tmp)
            tmp &= np.uint64((1 << left_bits) - 1)
            tmp ^= left
            left, right, tmp = right, tmp, left
            left_bits, right_bits = right_bits, left_bits
        left <<= np.uint64(right_bits)
        left |= right
        return left


def _mix(x: np.ndarray, key: np.uint64, out: np.ndarray) -> None:
    """Keyed Feistel round function: the murmur3 64-bit finaliser of x ^ key, written into out."""
    np.bitwise_xor(x, key, out=out)
    out ^= out >> _SHIFT
    out *= _MUL1
    out ^= out >> _SHIFT
    out *= _MUL2
    out ^= out >> _SHIFT
