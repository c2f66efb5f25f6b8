"""The codec-equivalence check itself: near-ties pass, anything else is an error."""

from __future__ import annotations

import numpy as np
import pytest

from tests.models.equivalence import (
    TIE_RTOL,
    QuantizerInput,
    assert_codes_equivalent,
    audio_rms_error,
    compare_codes,
)

D, K, BOOKS = 4, 8, 3


def quantize(latent: np.ndarray, books: np.ndarray) -> np.ndarray:
    """Reference RVQ in float64: [D] -> codes [BOOKS]."""
    r, codes = latent.copy(), []
    for book in books:
        c = int(((r[None] - book) ** 2).sum(1).argmin())
        codes.append(c)
        r = r - book[c]
    return np.array(codes)


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    books = rng.standard_normal((BOOKS, K, D)) * np.array([1.0, 0.3, 0.1])[:, None, None]
    latents = rng.standard_normal((2, D, 5))
    codes = np.stack([np.stack([quantize(latents[s, :, f], books) for f in range(5)], 1)
                      for s in range(2)])
    return books, latents, codes


def tie_latent(books: np.ndarray, near: np.ndarray, offset: float) -> tuple[np.ndarray, int, int]:
    """-> (latent, a, b): `near` moved onto the plane where its two best book-0 entries a and b
    tie, then `offset` towards a."""
    d = ((near[None] - books[0]) ** 2).sum(1)
    a, b = (int(i) for i in np.argsort(d)[:2])
    normal = (books[0, a] - books[0, b]) / np.linalg.norm(books[0, a] - books[0, b])
    mid = (books[0, a] + books[0, b]) / 2
    latent = near - ((near - mid) @ normal) * normal + offset * normal
    assert set(np.argsort(((latent[None] - books[0]) ** 2).sum(1))[:2]) == {a, b}
    return latent, a, b


def test_equal_codes_pass(setup):
    books, latents, codes = setup
    result = assert_codes_equivalent(codes, codes.copy(), QuantizerInput(latents, books, 0.0))
    assert result.differing_entries == 0 and not result.near_ties


def test_a_near_tie_and_its_consequences_pass(setup):
    books, latents, codes = setup
    latents = latents.copy()
    latents[1, :, 3], a, b = tie_latent(books, latents[1, :, 3], 1e-9)
    codes[1, :, 3] = quantize(latents[1, :, 3], books)
    assert codes[1, 0, 3] == a
    other = codes.copy()
    # The other run rounded to b's side: book 0 differs, and the later books follow b.
    r = latents[1, :, 3] - books[0, b]
    other[1, :, 3] = np.concatenate([[b], quantize(r, books[1:])])
    result = assert_codes_equivalent(codes, other, QuantizerInput(latents, books, 0.0))
    assert [(m.stream, m.frame, m.book, m.codes) for m in result.near_ties] == [(1, 3, 0, (a, b))]
    assert result.near_ties[0].slack <= TIE_RTOL


def test_a_wrong_code_is_an_error(setup):
    books, latents, codes = setup
    other = codes.copy()
    other[0, 2, 4] = (codes[0, 2, 4] + 1) % K  # the last book: nothing downstream
    result = compare_codes(codes, other, QuantizerInput(latents, books, 0.0))
    assert [(m.stream, m.frame, m.book) for m in result.errors] == [(0, 4, 2)]
    with pytest.raises(AssertionError, match="1 real error"):
        result.assert_equivalent()


def test_a_tie_followed_by_a_wrong_code_is_an_error(setup):
    books, latents, codes = setup
    latents = latents.copy()
    latents[0, :, 0], a, b = tie_latent(books, latents[0, :, 0], 1e-9)
    codes[0, :, 0] = quantize(latents[0, :, 0], books)
    other = codes.copy()
    r = latents[0, :, 0] - books[0, b]
    good = quantize(r, books[1:])
    other[0, :, 0] = [b, good[0], (good[1] + 1) % K]  # a tie, then garbage
    result = compare_codes(codes, other, QuantizerInput(latents, books, 0.0))
    assert len(result.errors) == 1 and not result.near_ties


def test_the_tolerance_scales_with_the_last_layer_bias(setup):
    """A miss of 1e-3 is a real error for a latent of norm ~2, a rounding-sized tie when the
    encoder computed values ~1e3 larger (a bias of that size cancelled)."""
    books, latents, codes = setup
    latents = latents.copy()
    latents[0, :, 1], a, b = tie_latent(books, latents[0, :, 1], -1e-3)  # a is 1e-3 wrong
    codes[0, :, 1] = quantize(latents[0, :, 1], books)
    other = codes.copy()
    other[0, :, 1] = np.concatenate([[a], quantize(latents[0, :, 1] - books[0, a], books[1:])])
    assert compare_codes(codes, other, QuantizerInput(latents, books, 0.0)).errors
    assert not compare_codes(codes, other, QuantizerInput(latents, books, 1e3)).errors


def test_shapes_must_match(setup):
    books, latents, codes = setup
    with pytest.raises(ValueError, match="code shapes differ"):
        compare_codes(codes, codes[:1], QuantizerInput(latents, books, 0.0))
    with pytest.raises(ValueError, match="do not match"):
        compare_codes(codes, codes, QuantizerInput(latents[:, :, :2], books, 0.0))


def test_audio_rms_error():
    x = np.sin(np.linspace(0, 20, 1000))
    assert audio_rms_error(x, x) == 0.0
    assert audio_rms_error(1.01 * x, x) == pytest.approx(0.01)
