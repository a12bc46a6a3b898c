"""Learning coefficients: Aoyagi's deep linear formula against references derived independently of it.

- L = 2: Aoyagi & Watanabe (2005), reduced rank regression, all four cases (written out here on its own).
- any L: Lehalleur & Rimanyi (arXiv 2411.19920), lambda = codim(product^-1(B)) / 2 (Thm 8.6), with the
  codimension computed two ways: by brute force over quiver orbits (Cor 3.5, Lemmas 4.5-4.6) and by their
  quadratic integer program (Thm 6.1); plus the codimensions their paper works out by hand.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from trainer import learning_coefficient as lc


# ---------------------------------------------------------------------------------------------- references
def rrr(m: int, n: int, h: int, r: int) -> tuple[Fraction, int]:
    """Aoyagi & Watanabe (2005), Theorem 1: reduced rank regression y = B A x, x in R^M, y in R^N, H hidden,
    true rank r. Returns (lambda, multiplicity)."""
    if m + h < n + r:
        return Fraction(h * m - h * r + n * r, 2), 1
    if n + h < m + r:
        return Fraction(h * n - h * r + m * r, 2), 1
    if m + n < h + r:
        return Fraction(m * n, 2), 1
    odd = (m + n + h + r) % 2
    return Fraction(2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2 + odd, 8), 1 + odd


def kostant_partitions(d: tuple[int, ...]):
    """Every Kostant partition of the dimension vector d: multiplicities m[(i, j)] of the interval modules
    [i, j] (0 <= i <= j <= N) such that the intervals covering each vertex k add up to d[k]."""
    n = len(d) - 1
    intervals = [(i, j) for i in range(n + 1) for j in range(n, i - 1, -1)]

    def fill(pos: int, left: list[int], m: dict):
        if pos == len(intervals):
            if not any(left):
                yield dict(m)
            return
        i, j = intervals[pos]
        if pos > 0 and intervals[pos - 1][0] < i and left[i - 1]:
            return  # vertex i - 1 has no interval left to cover it
        for k in range(min(left[i:j + 1]) + 1):
            m[(i, j)] = k
            yield from fill(pos + 1, left[:i] + [x - k for x in left[i:j + 1]] + left[j + 1:], m)

    yield from fill(0, list(d), {})


def orbit_codim(m: dict) -> int:
    """Codimension of the orbit of m: dim Ext(M, M), with dim Ext([a, b], [u, v]) = 1 iff a+1 <= u <= b+1 <= v
    (Lehalleur & Rimanyi, Cor 3.5)."""
    return sum(x * y for (a, b), x in m.items() for (u, v), y in m.items() if a + 1 <= u <= b + 1 <= v)


def lambda_from_orbits(widths: tuple[int, ...], r: int) -> Fraction:
    """codim of the fibre / 2: the smallest orbit codimension with r full-length intervals (= product of rank r),
    plus the codimension r (H_1 + H_{L+1} - r) of the rank-r matrices (Lemma 4.6, Thm 8.6)."""
    n = len(widths) - 1
    core = min(orbit_codim(m) for m in kostant_partitions(widths) if m[(0, n)] == r)
    return Fraction(core + r * (widths[0] + widths[-1] - r), 2)


def lambda_from_qip(widths: tuple[int, ...], r: int) -> Fraction:
    """Same, with codim Sigma^r = the quadratic integer program of Thm 6.1 on the sorted widths minus r."""
    d = sorted(w - r for w in widths)
    n = len(d) - 1
    best = min(sum(e[i - 1] * (e[j - 1] + d[j] - d[j - 1]) for i in range(1, n + 1) for j in range(1, i + 1))
               for e in compositions(d[0], n))
    return Fraction(best + r * (widths[0] + widths[-1] - r), 2)


def compositions(total: int, parts: int):
    """Every tuple of `parts` non-negative integers adding up to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


def n_params(widths) -> int:
    return sum(a * b for a, b in zip(widths, widths[1:]))


def grid(sizes, depths):
    """All (widths, rank) with widths in `sizes` and L in `depths` weight matrices."""
    for n in depths:
        for widths in itertools.product(sizes, repeat=n + 1):
            for r in range(min(widths) + 1):
                yield widths, r


# ---------------------------------------------------------------------------------------------- regular
def test_regular_is_half_the_parameter_count():
    assert lc.regular(0) == 0.0
    assert lc.regular(7) == 3.5
    assert lc.regular(np.int64(10)) == 5.0


@pytest.mark.parametrize("widths", [(1, 1), (3, 2), (2, 5), (7, 4)])
def test_one_matrix_is_regular(widths):
    # L = 1: y = W x with no constraint on W, for any true rank
    for r in range(min(widths) + 1):
        assert lc.deep_linear(list(widths), r) == widths[0] * widths[1] / 2
        assert lc.deep_linear_multiplicity(list(widths), r) == 1


# ---------------------------------------------------------------------------------------------- L = 2
def test_two_matrices_match_reduced_rank_regression():
    cases, bad = set(), []
    for (m, h, n), r in grid(range(1, 8), [2]):
        want, mult = rrr(m, n, h, r)
        got = lc.deep_linear([m, h, n], r)
        if got != float(want) or lc.deep_linear_multiplicity([m, h, n], r) != mult:
            bad.append(((m, h, n), r, got, float(want)))
        cases.add(("2" if m + h < n + r else "3" if n + h < m + r else "4" if m + n < h + r
                   else f"1{'odd' if mult == 2 else 'even'}"))
    assert not bad, bad[:10]
    assert cases == {"1odd", "1even", "2", "3", "4"}  # the grid reaches every case of the theorem


@pytest.mark.parametrize("m, h, n, r, want", [
    (5, 3, 5, 0, 6.5),   # case 1, odd: (2*3*10 - 0 - 9 + 1) / 8
    (5, 4, 5, 0, 8.0),   # case 1, even: (2*4*10 - 0 - 16) / 8
    (4, 3, 8, 0, 6.0),   # case 2: M H / 2
    (8, 3, 4, 0, 6.0),   # case 3: N H / 2
    (3, 8, 4, 0, 6.0),   # case 4: M N / 2
    (3, 2, 3, 1, 3.5),   # case 1, odd, rank 1: (2*3*6 - 0 - 9 + 1) / 8
])
def test_reduced_rank_regression_by_hand(m, h, n, r, want):
    assert lc.deep_linear([m, h, n], r) == want


# ---------------------------------------------------------------------------------------------- any L
def test_matches_orbit_codimension():
    bad = [(w, r, lc.deep_linear(list(w), r), float(lambda_from_orbits(w, r)))
           for w, r in itertools.chain(grid(range(1, 4), [2, 3]), grid(range(1, 3), [4]))
           if lc.deep_linear(list(w), r) != lambda_from_orbits(w, r)]
    assert not bad, bad[:10]


def test_matches_quadratic_integer_program():
    bad = [(w, r, lc.deep_linear(list(w), r), float(lambda_from_qip(w, r)))
           for w, r in grid(range(1, 6), [2, 3, 4])
           if lc.deep_linear(list(w), r) != lambda_from_qip(w, r)]
    assert not bad, bad[:10]


def test_orbit_brute_force_agrees_with_paper_counts():
    # the reference itself, on the paper's Example 4.3: Sigma^0 of (2,2,2) has codim 3, of (2,3,2) codim 4
    assert 2 * lambda_from_orbits((2, 2, 2), 0) == 3
    assert 2 * lambda_from_orbits((2, 3, 2), 0) == 4
    # the paper lists 6 Kostant partitions of (2,2,2): those with m_02 = 0; with m_02 = 1 or 2 there are 3 + 1 more
    assert sorted(m[(0, 2)] for m in kostant_partitions((2, 2, 2))) == [0] * 6 + [1] * 3 + [2]


@pytest.mark.parametrize("widths, codim", [
    # codim of {W_L ... W_1 = 0} (rank 0, so lambda = codim / 2), worked out in Lehalleur & Rimanyi
    ((2, 2, 2), 3),                                 # Example 4.3 (three components, codim 4, 4, 3)
    ((2, 3, 2), 4),                                 # Example 4.3
    ((2, 4, 2), 4),                                 # Example 4.3
    ((2, 2, 3), 4),                                 # Sec. 6 example: QIP minimum 4, attained twice
    ((3, 3, 3), 7),                                 # Sec. 5 example: Q = 2q^7 + ...
    ((5, 5, 6, 6, 6, 6), 19),                       # Example 4.3
    ((7, 7, 8, 9, 12, 13), 39),                     # Sec. 7 closest-lattice-point example
    ((8, 8, 11, 11, 11, 13, 13, 13, 15), 55),       # Sec. 6 example, QIP minimum 55
    ((4, 4, 4, 5, 5, 5, 5, 5, 5, 6, 6, 6), 12),     # Sec. 5 example: Q = 28q^12 + ...
    ((6, 5, 4, 5, 6, 5, 4, 5, 6, 5, 4, 5), 12),     # ... "the same for any permutation"
])
def test_paper_examples(widths, codim):
    assert lc.deep_linear(list(widths), 0) == codim / 2


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_depth_beyond_width_saturates(d):
    # Lehalleur & Rimanyi, Sec. 7 example: constant width d, depth N > d: codim = d (d + 1) / 2 whatever N
    # (Aoyagi: the learning coefficient stays bounded as the number of layers grows)
    for n in range(d + 1, d + 6):
        assert lc.deep_linear([d] * (n + 1), 0) == d * (d + 1) / 4


# ---------------------------------------------------------------------------------------------- properties
def test_properties():
    for w, r in grid(range(1, 6), [1, 2, 3, 4]):
        lam = lc.deep_linear(list(w), r)
        assert lam == lc.deep_linear(list(w[::-1]), r)  # transposing the network changes nothing
        assert 0 <= lam <= n_params(w) / 2  # never more than a regular model of the same size
        assert (2 * lam).is_integer()  # half a codimension
        assert lc.deep_linear_multiplicity(list(w), r) >= 1


def test_core_is_permutation_invariant():
    # lambda - r (H_1 + H_{L+1} - r) / 2 = codim Sigma^r / 2, invariant under permuting widths (L & R Cor 5.10)
    for w, r in grid(range(1, 5), [3]):
        cores = {lc.deep_linear(list(p), r) - r * (p[0] + p[-1] - r) / 2 for p in itertools.permutations(w)}
        assert len(cores) == 1, (w, r, cores)


def test_full_rank_is_the_rank_r_manifold():
    # r = min width: Sigma^r is open (codim 0) and the fibre smooth (L & R, Sec. 4), so by Lemma 4.6 lambda is
    # half the codimension r (H_1 + H_{L+1} - r) of the fibre, i.e. half the dimension of the rank-r matrices
    for w, r in grid(range(1, 6), [1, 2, 3, 4]):
        if r == min(w):
            assert lc.deep_linear(list(w), r) == r * (w[0] + w[-1] - r) / 2


def test_accepts_numpy_integers_and_tuples():
    assert lc.deep_linear(np.array([5, 3, 5]), np.int64(0)) == 6.5
    assert lc.deep_linear((5, 3, 5), 0) == 6.5


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("widths, rank", [
    ([3, -1, 2], 0),     # negative width
    ([3, 0, 2], 0),      # a layer with no units
    ([3, 2, 4], 3),      # rank above the narrowest layer: not realisable
    ([3, 2, 4], -1),     # negative rank
    ([4], 0),            # no output
    ([], 0),
    ([3, 2.5, 4], 1),    # non-integer width
    ([3, 2, 4], 1.0),    # non-integer rank
    ([3, True, 4], 1),
    ("354", 1),
    (5, 1),
])
def test_bad_input(widths, rank):
    with pytest.raises(ValueError):
        lc.deep_linear(widths, rank)
    with pytest.raises(ValueError):
        lc.deep_linear_multiplicity(widths, rank)


@pytest.mark.parametrize("d", [-1, 2.0, "4"])
def test_regular_bad_input(d):
    with pytest.raises(ValueError):
        lc.regular(d)


def test_error_message_names_the_problem():
    with pytest.raises(ValueError, match=r"rank must be in \[0, min\(widths\)\] = \[0, 2\]"):
        lc.deep_linear([3, 2, 4], 3)
    with pytest.raises(ValueError, match="every width must be >= 1"):
        lc.deep_linear([3, -1, 2], 0)
