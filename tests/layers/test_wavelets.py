"""The level-1 DTCWT of formers.layers.wavelets: perfect reconstruction, the border extension, the
pytorch_wavelets layout (orientation order, real/imag pairs), and the filters' defining sums.

The coefficients were compared with pytorch_wavelets 1.3.0 (DTCWTForward(J=1, biort='near_sym_b',
qshift='qshift_b') and DTCWTInverse, installed outside the venv): identical lowpass and highpass in float64
on 8x8, 16x12, 56x56, 6x10 and 4x4 inputs, inverse equal to 3e-15. The last test repeats that check when
pytorch_wavelets happens to be importable.
"""
import numpy as np
import pytest
import torch

from formers.layers.wavelets import BIORTHOGONAL_FILTERS, DTCWT, symmetric_pad


@pytest.fixture(scope="module")
def dtcwt():
    return DTCWT("near_sym_b")


@pytest.mark.parametrize("shape", [(2, 3, 56, 56), (1, 4, 16, 12), (3, 2, 8, 8), (1, 1, 6, 10), (1, 2, 2, 4)])
def test_perfect_reconstruction(dtcwt, shape):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape)
    low, high = dtcwt(x)
    assert low.shape == shape
    assert high.shape == (shape[0], shape[1], 6, shape[2] // 2, shape[3] // 2, 2)
    torch.testing.assert_close(dtcwt.inverse(low, high), x, atol=1e-5, rtol=0)


def test_symmetric_pad_matches_numpy():
    x = torch.arange(5.0)
    for pad in (1, 3, 5, 9, 12):       # also pads longer than the signal: reflect again
        ref = np.pad(np.arange(5.0), pad, mode="symmetric")
        np.testing.assert_array_equal(symmetric_pad(x, pad, 0).numpy(), ref)


def test_filters_are_a_normalised_pair():
    (h0, dh), (g0, dg) = BIORTHOGONAL_FILTERS["near_sym_b"]
    assert len(h0) == 13 and len(g0) == 19 and h0 == h0[::-1] and g0 == g0[::-1]
    assert sum(h0) == dh and sum(g0) == dg            # lowpasses sum to 1
    m = DTCWT()
    torch.testing.assert_close(m.analysis.sum(-1), torch.tensor([1.0, 0.0]))    # h0, h1 (sums 1, 0)
    torch.testing.assert_close(m.synthesis.sum(-1), torch.tensor([1.0, 0.0]))   # g0, g1


def test_constant_image_is_all_lowpass(dtcwt):
    x = torch.full((1, 2, 12, 12), 3.0)
    low, high = dtcwt(x)
    torch.testing.assert_close(low, x)
    assert high.abs().max() < 1e-5


def test_orientation_order(dtcwt):
    """An image that varies down the columns only (constant along each row) has no energy in the bands that
    are highpass along the rows: hl (75, 105 degrees) and hh (45, 135); only lh (15, 165) carries it, and
    as quads whose two columns agree, its two orientations hold the same pair with real and imaginary swapped:
    15 degrees (a - d, b + c) = (a - c, a + c), 165 degrees (a + d, b - c) = (a + c, a - c)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 1).expand(1, 1, 16, 16).contiguous()
    _, high = dtcwt(x)
    energy = high.pow(2).sum(dim=(0, 1, 3, 4, 5))
    assert energy[[1, 2, 3, 4]].max() < 1e-8 and energy[0] > 1e-2
    torch.testing.assert_close(energy[0], energy[5])
    torch.testing.assert_close(high[:, :, 0].flip(-1), high[:, :, 5])
    # the transposed image puts it in hl: 75 and 105 degrees
    _, high_t = dtcwt(x.transpose(-1, -2))
    energy_t = high_t.pow(2).sum(dim=(0, 1, 3, 4, 5))
    assert energy_t[[0, 1, 4, 5]].max() < 1e-8 and energy_t[2] > 1e-2


def test_meta_and_errors(dtcwt):
    with torch.device("meta"):
        m = DTCWT()
        low, high = m(torch.randn(2, 3, 8, 6))
        assert m.inverse(low, high).shape == (2, 3, 8, 6)
    with pytest.raises(ValueError, match="even"):
        dtcwt(torch.randn(1, 1, 7, 8))
    with pytest.raises(ValueError, match="highpass"):
        dtcwt.inverse(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 6, 2, 2, 2))


def test_against_pytorch_wavelets_when_installed(dtcwt):
    pw = pytest.importorskip("pytorch_wavelets")
    xfm = pw.DTCWTForward(J=1, biort="near_sym_b", qshift="qshift_b")
    ifm = pw.DTCWTInverse(biort="near_sym_b", qshift="qshift_b")
    x = torch.randn(2, 3, 16, 12)
    low, highs = xfm(x)
    ours_low, ours_high = dtcwt(x)
    torch.testing.assert_close(ours_low, low)
    torch.testing.assert_close(ours_high, highs[0])
    torch.testing.assert_close(dtcwt.inverse(ours_low, 1.5 * ours_high), ifm((low, [1.5 * highs[0]])))
