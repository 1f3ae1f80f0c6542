"""Multi-scale deformable attention: the grid_sample core equals an explicit loop with hand-written bilinear
interpolation, the Deformable DETR init, reference points (points, boxes, broadcasting), the padding mask,
spatial shapes as a list or a tensor, and gradients (gradcheck in float64)."""
import math

import pytest
import torch

from formers.layers import MSDeformAttn, ms_deform_attn


def _bilinear_zero_pad(img, x, y):
    """img (D, h, w) at continuous location (x, y) in [0, 1] coordinates (align_corners=False):
    pixel (i, j) has its centre at ((j + 0.5) / w, (i + 0.5) / h); taps outside the map read zero."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = img.new_zeros(d)
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * img[:, yy, xx]
    return out


def _naive(value, shapes, locations, weights):
    b, _, heads, dim = value.shape
    lq, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    out = value.new_zeros(b, lq, heads, dim)
    start = 0
    maps = []
    for h, w in shapes:
        maps.append(value[:, start:start + h * w].reshape(b, h, w, heads, dim).permute(0, 3, 4, 1, 2))
        start += h * w
    for n in range(b):
        for q in range(lq):
            for m in range(heads):
                for lvl in range(levels):
                    for p in range(points):
                        x, y = locations[n, q, m, lvl, p].tolist()
                        out[n, q, m] += weights[n, q, m, lvl, p] * _bilinear_zero_pad(maps[lvl][n, m], x, y)
    return out.flatten(2)


def _random_inputs(shapes, b=2, lq=5, heads=2, dim=3, points=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, heads, dim, generator=g, dtype=dtype)
    # a margin around [0, 1], so that samples fall outside the maps and on their borders too
    locations = torch.rand(b, lq, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(b, lq, heads, len(shapes), points, generator=g, dtype=dtype)
    return value, locations, weights


def test_core_equals_naive_bilinear_loop():
    shapes = [(4, 5), (3, 2), (1, 1)]
    value, loc, wts = _random_inputs(shapes)
    out = ms_deform_attn(value, shapes, loc, wts)
    assert out.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(out, _naive(value, shapes, loc, wts), atol=1e-5, rtol=1e-5)
    # a (levels, 2) tensor of shapes gives the same result as the list
    torch.testing.assert_close(ms_deform_attn(value, torch.tensor(shapes), loc, wts), out)


def test_pixel_centres_read_the_pixel_and_outside_reads_zero():
    value = torch.arange(12.0).reshape(1, 12, 1, 1)           # one 3x4 level
    cx, cy = (2 + 0.5) / 4, (1 + 0.5) / 3                      # centre of pixel row 1, column 2
    loc = torch.tensor([cx, cy, 1.5, 0.5]).reshape(1, 2, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(3, 4)], loc, torch.ones(1, 2, 1, 1, 1))
    assert out.flatten().tolist() == [6.0, 0.0]


def test_offsets_bias_pattern_and_zero_init():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    bias = m.sampling_offsets.bias.detach().view(8, 3, 4, 2)
    units = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]   # 8 directions, max-norm 1
    for h, (ux, uy) in enumerate(units):
        for p in range(4):
            for lvl in range(3):
                torch.testing.assert_close(bias[h, lvl, p], torch.tensor([ux * (p + 1.0), uy * (p + 1.0)]),
                                           atol=1e-5, rtol=0)
    torch.testing.assert_close(bias.abs().amax(-1), torch.arange(1.0, 5.0).expand(8, 3, 4))
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any()
    assert not m.attention_weights.bias.any() and not m.value_proj.bias.any() and not m.output_proj.bias.any()
    assert m.value_proj.weight.std() > 0
    assert m.sampling_offsets.out_features == 8 * 3 * 4 * 2 and m.attention_weights.out_features == 8 * 3 * 4


def _module_inputs(m, shapes, b=2, lq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, lq, m.d_model, generator=g)
    feats = torch.randn(b, sum(h * w for h, w in shapes), m.d_model, generator=g)
    ref = torch.rand(b, lq, len(shapes), 2, generator=g)
    return query, feats, ref


def _randomise(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def test_module_locations_from_reference_points():
    """The module is value_proj -> core at ref + offset / (w, h) -> output_proj; boxes scale by (w, h) / 2 / P."""
    shapes = [(4, 6), (2, 3)]
    m = _randomise(MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3))
    query, feats, ref = _module_inputs(m, shapes)
    out = m(query, ref, feats, shapes, None)
    b, lq = query.shape[:2]
    value = m.value_proj(feats).view(b, -1, 2, 4)
    offsets = m.sampling_offsets(query).view(b, lq, 2, 2, 3, 2)
    weights = m.attention_weights(query).view(b, lq, 2, 6).softmax(-1).view(b, lq, 2, 2, 3)
    norm = torch.tensor([[6.0, 4.0], [3.0, 2.0]])
    loc = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
    torch.testing.assert_close(out, m.output_proj(_naive(value, shapes, loc, weights)), atol=1e-5, rtol=1e-5)

    boxes = torch.cat([ref, torch.rand(b, lq, 2, 2) * 0.5], -1)
    loc = boxes[:, :, None, :, None, :2] + offsets / 3 * boxes[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(m(query, boxes, feats, shapes), m.output_proj(_naive(value, shapes, loc, weights)),
                               atol=1e-5, rtol=1e-5)

    # one reference point for every level (and for the whole batch) broadcasts, as ViT-CoMer passes them
    one = ref[:1, :, :1]
    torch.testing.assert_close(m(query, one, feats, shapes), m(query, one.expand(b, lq, 2, 2), feats, shapes))
    with pytest.raises(ValueError, match="end in 2"):
        m(query, ref[..., :1], feats, shapes)
    with pytest.raises(ValueError, match="hold 30 positions"):
        m(query, ref, feats[:, :-1], shapes)
    with pytest.raises(ValueError, match="built for 2 levels"):
        m(query, ref, feats, [(5, 6)])


def test_init_samples_along_head_directions():
    """At init every head averages (uniform weights) its 4 points stepped 1..4 pixels along its direction."""
    m = MSDeformAttn(d_model=4, n_levels=1, n_heads=4, n_points=2)
    with torch.no_grad():
        m.value_proj.weight.copy_(torch.eye(4))
        m.output_proj.weight.copy_(torch.eye(4))
    img = torch.arange(1.0, 50.0).reshape(7, 7)
    feats = img.reshape(1, 49, 1).expand(1, 49, 4)
    ref = torch.tensor([[[[3.5 / 7, 3.5 / 7]]]])                # the centre pixel (3, 3)
    out = m(torch.zeros(1, 1, 4), ref, feats, [(7, 7)]).flatten()
    # heads point +x, +y, -x, -y (1 and 2 pixels away); head h reads channel h
    expected = [(img[3, 4] + img[3, 5]) / 2, (img[4, 3] + img[5, 3]) / 2, (img[3, 2] + img[3, 1]) / 2,
                (img[2, 3] + img[1, 3]) / 2]
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-5, rtol=0)


def test_padding_mask_zeros_padded_values():
    shapes = [(3, 3), (2, 2)]
    m = _randomise(MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2))
    query, feats, ref = _module_inputs(m, shapes)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[0, 9:] = True                     # sample 0: its whole second level is padding
    mask[1, ::2] = True
    out = m(query, ref, feats, shapes, None, mask)
    # the same as inputs whose projected values are zero there: change the padded features freely
    feats2 = feats.clone()
    feats2[mask] = 1e3
    torch.testing.assert_close(m(query, ref, feats2, shapes, None, mask), out)
    assert not torch.allclose(m(query, ref, feats2, shapes), m(query, ref, feats, shapes))
    # and equal to the naive sum with those values set to zero
    b, lq = 2, query.shape[1]
    value = m.value_proj(feats).masked_fill(mask[..., None], 0).view(b, -1, 2, 4)
    offsets = m.sampling_offsets(query).view(b, lq, 2, 2, 2, 2)
    weights = m.attention_weights(query).view(b, lq, 2, 4).softmax(-1).view(b, lq, 2, 2, 2)
    loc = ref[:, :, None, :, None, :] + offsets / torch.tensor([[3.0, 3.0], [2.0, 2.0]])[None, None, None, :, None]
    torch.testing.assert_close(out, m.output_proj(_naive(value, shapes, loc, weights)), atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    shapes = [(3, 2), (2, 2)]
    value, loc, wts = _random_inputs(shapes, b=1, lq=2, heads=2, dim=2, points=2, dtype=torch.float64)
    # random locations (some outside the maps) are almost surely off the pixel-centre kinks of bilinear sampling
    inputs = (value.requires_grad_(), loc.requires_grad_(), wts.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn(v, shapes, l, w), inputs)


def test_module_backward_reaches_every_parameter_and_input():
    shapes = [(4, 4), (2, 2)]
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2, ratio=0.5)
    assert m.value_proj.out_features == 8 and m.head_dim == 2
    query, feats, ref = _module_inputs(m, shapes)
    m(query, ref, feats, shapes).square().sum().backward()     # at init: offsets / weights ignore the query,
    for name, p in m.named_parameters():                        # but their weights get gradients
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    _randomise(m)
    query.requires_grad_()
    feats.requires_grad_()
    ref.requires_grad_()
    m(query, ref, feats, shapes).square().sum().backward()
    assert query.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0 and ref.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        MSDeformAttn(d_model=16, n_heads=3)


def test_compiles_in_one_graph_with_list_shapes():
    shapes = [(4, 4), (2, 2)]
    m = _randomise(MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)).eval()
    query, feats, ref = _module_inputs(m, shapes, b=1, lq=3)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = m

        def forward(self, q, r, f):
            return self.attn(q, r, f, shapes)

    expected = m(query, ref, feats, shapes)
    compiled = torch.compile(Wrap(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(query, ref, feats), expected)
