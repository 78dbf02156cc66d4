"""The quantized weight formats as kt_ops.reference defines them: int8 with one scale per
output row, int4 with one scale per group of the reduction, fp8 e4m3 with one scale per
128 x 128 block. Codes in range, the largest magnitude of each row / group / block exact,
every value within half a step of the weight, scale shapes, and bad group sizes."""
import pytest
import torch

from kt_ops import reference as ref


def weights(*shape, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    w[..., 1, :] = 0  # a row of zeros: scale 1, codes 0
    return w


@pytest.mark.parametrize("shape", [(5, 48), (3, 7, 40)])
def test_int8_per_row(shape):
    w = weights(*shape)
    q, scale = ref.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == w.shape[:-1]
    assert q.abs().max() <= ref.INT8_MAX and (q.abs().amax(-1)[..., [0, 2]] == ref.INT8_MAX).all()
    assert (scale[..., 1] == 1).all() and not q[..., 1, :].any()
    back = ref.dequantize_int8(q, scale)
    assert ((back - w).abs() <= scale[..., None] / 2 * (1 + 1e-6)).all()
    # The row maximum is a code of +-127 exactly, so it comes back to a rounding of fp32.
    torch.testing.assert_close(back.abs().amax(-1), w.abs().amax(-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("group_size", ref.INT4_GROUP_SIZES)
def test_int4_per_group(group_size):
    w = weights(2, 4, 256)
    q, scale = ref.quantize_int4(w, group_size)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (2, 4, 256 // group_size)
    assert scale.dtype == torch.bfloat16
    assert q.abs().max() <= ref.INT4_MAX
    per_element = scale.float().repeat_interleave(group_size, -1)
    back = ref.dequantize_int4(q, scale, group_size)
    # Half a step, plus the bf16 rounding of a product of at most 7 steps.
    assert ((back - w).abs() <= per_element * (0.5 + 7 * 2**-9)).all()
    # The group maximum is a code of +-7 times the bf16 scale: max|group| to bf16's precision.
    groups = w.unflatten(-1, (-1, group_size)).abs().amax(-1)
    torch.testing.assert_close(back.unflatten(-1, (-1, group_size)).abs().amax(-1), groups, rtol=2**-7, atol=0)
    # Checkpoints may use the code -8; it reads as -8 steps.
    q8 = q.clone()
    q8[0, 0, 0] = -8
    assert ref.dequantize_int4(q8, scale, group_size)[0, 0, 0] == -8 * scale[0, 0, 0].float()


def test_int4_group_size_must_be_supported_and_divide_the_reduction():
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\), got 48"):
        ref.quantize_int4(torch.zeros(2, 96), 48)
    with pytest.raises(ValueError, match="group_size 64 does not divide the reduction size 96"):
        ref.quantize_int4(torch.zeros(2, 96), 64)
    with pytest.raises(ValueError, match="does not divide"):
        ref.dequantize_int4(torch.zeros(2, 96, dtype=torch.int8), torch.ones(2, 1), 64)


@pytest.mark.parametrize("shape", [(130, 300), (2, 128, 128)])
def test_fp8_per_block(shape):
    w = weights(*shape) * 3
    q, scale_inv = ref.quantize_fp8(w)
    n, k = shape[-2:]
    blocks = (-(-n // ref.FP8_BLOCK), -(-k // ref.FP8_BLOCK))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale_inv.shape == (*shape[:-2], *blocks)
    assert q.float().abs().max() <= ref.FP8_MAX
    back = ref.dequantize_fp8(q, scale_inv)
    # e4m3 keeps 3 mantissa bits: a normal value is within 2^-4 of itself; below the
    # smallest normal (2^-6 steps of the block scale) the spacing is 2^-9 steps.
    step = ref._per_element(scale_inv, n, k)
    assert ((back - w).abs() <= torch.maximum(w.abs() * 2.0 ** -4, step * 2.0 ** -10)).all()
    # Each block's largest magnitude is the code 448, exact.
    padded = torch.nn.functional.pad(w, (0, -k % 128, 0, -n % 128)).abs()
    amax = padded.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128)).amax(dim=(-3, -1))
    torch.testing.assert_close(scale_inv * ref.FP8_MAX, amax, rtol=1e-6, atol=0)


def test_the_checkpoint_loader_dequantizes_fp8_as_the_reference_does():
    from kt_ops.weights import _dequantize

    q, scale_inv = ref.quantize_fp8(weights(200, 150))
    assert torch.equal(_dequantize(q, scale_inv), ref.dequantize_fp8(q, scale_inv).bfloat16())
