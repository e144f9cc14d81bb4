"""The Triton kernels beyond the op-level tests: tiling, padding, chunking and dtype paths.

The per-op tests (``tests/test_<op>.py``) check every op against the reference on the shapes users hit. Here the
shapes are chosen to drive each kernel through its less common paths: an embedding dimension that
takes several column chunks (partial row sums added atomically), class counts padded to a larger
tile, programs that loop over several row tiles or all steps, half-precision inputs, counters past
``2**32``; and, on a GPU, large shapes (the tensor-core products) and CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, fused_backend_or_skip
from noprop import ops, reference, rng

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _row_tile_budgets() -> tuple[int, ...]:
    """The tile budgets of the row-tiled kernels (denoising loss, latent update; forward and backward)."""
    from noprop.kernels import _common

    return (_common.LOSS_FORWARD_TILE, _common.LOSS_BACKWARD_TILE, _common.LATENT_UPDATE_TILE,
            _common.LATENT_UPDATE_BACKWARD_TILE)


@pytest.fixture(autouse=True)
def _triton_runs_here():
    fused_backend_or_skip("triton", DEVICE)


def _compare_all_ops(T: int, B: int, C: int, D: int, seed: int = 0, device: str = DEVICE) -> None:
    """Every fused op against the reference, values and gradients, with per-example coefficients
    (the latent update on all ``T * B`` rows)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    W, a, b, logits = rand(C, D), rand(T, B).abs(), rand(T, B).abs(), rand(T, B, C, scale=3.0)
    weight, noise_coef, upstream = rand(T, B).abs() + 0.1, rand(T, B), rand(T, B, D)
    z, p, q, r = rand(T, B, D), rand(T, B), rand(T, B), rand(T, B)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    results = {}
    for name in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (W, a, b)]
        latents = ops.noised_latents(*leaves[:1], y, *leaves[1:], 5, backend=name)
        out = [latents.detach(), *torch.autograd.grad(latents, leaves, upstream)]
        for readout, coef in (("softmax", None), ("linear", noise_coef)):
            leaves = [t.clone().requires_grad_() for t in (logits, W, weight)]
            loss, rows = ops.denoising_loss(
                leaves[0], leaves[1], y, leaves[2], readout=readout, noise_coef=coef, seed=6, backend=name,
                return_row_errors=True,
            )
            out += [loss.detach(), rows, *torch.autograd.grad(loss, leaves, torch.tensor(0.7, device=device))]
            leaves = [t.clone().requires_grad_() for t in (logits, W, z, p, q, r)]
            z_new = ops.latent_update(*leaves, 8, readout=readout, backend=name)
            out += [z_new.detach(), *torch.autograd.grad(z_new, leaves, upstream)]
        results[name] = out
    for index, (expected, actual) in enumerate(zip(results["reference"], results["triton"])):
        assert actual.shape == expected.shape, index
        assert_close(actual, expected, msg=f"output {index} for T={T} B={B} C={C} D={D}")


# ---------------------------------------------------------------------------------------------- tiling heuristics


def test_column_chunks_pad_little():
    from noprop.kernels._common import column_chunk

    assert [column_chunk(d, 128) for d in (7, 20, 100, 130, 784, 3072)] == [16, 32, 128, 32, 128, 128]
    assert column_chunk(3072, 32) == 32
    for dim in range(1, 400, 7):
        width = column_chunk(dim, 128)
        assert width & (width - 1) == 0 and 16 <= width <= 128


@pytest.mark.parametrize("num_rows,num_classes,dim", [(1, 3, 7), (1280, 10, 20), (655360, 10, 20), (1280, 100, 3072), (40000, 40, 300)])
def test_row_tiling_respects_its_budgets(num_rows, num_classes, dim):
    from noprop.kernels import _common

    for budget in _row_tile_budgets():
        tiling = _common.row_tiling(num_rows, num_classes, dim, budget)
        assert tiling.block_classes >= max(16, num_classes)
        assert tiling.block_classes * tiling.block_cols <= _common.DOT_OPERAND_ELEMENTS
        assert tiling.block_rows >= 16 and tiling.block_rows * tiling.block_cols <= max(budget, 16 * tiling.block_cols)
        assert tiling.block_rows * tiling.block_classes <= max(_common.CLASS_TILE_ELEMENTS, 16 * tiling.block_classes)
        assert tiling.num_programs * tiling.tiles_per_program * tiling.block_rows >= num_rows
        assert (tiling.num_programs - 1) * tiling.tiles_per_program * tiling.block_rows < num_rows
        assert tiling.single_chunk == (dim <= tiling.block_cols)


@pytest.mark.parametrize("steps,batch,dim", [(1, 1, 7), (10, 128, 20), (10, 65536, 20), (10, 128, 3072)])
def test_example_tiling_covers_everything(steps, batch, dim):
    from noprop.kernels._common import example_tiling

    tiling = example_tiling(steps, batch, dim)
    examples, cols, groups = tiling.grid
    assert examples * tiling.block_examples >= batch and cols * tiling.block_cols >= dim
    assert 1 <= tiling.step_groups == groups <= steps


@pytest.mark.parametrize(
    "batch,M,N,K", [(10, 128, 256, 2048), (10, 2048, 256, 128), (10, 128, 10, 128), (1, 1, 7, 3), (3, 130, 129, 256)]
)
@pytest.mark.parametrize("element_size", [4, 2])
def test_stacked_linear_tiles_fill_the_sms_within_bounds(batch, M, N, K, element_size):
    from noprop.kernels.stacked_linear import MAX_TILE, MIN_SHRUNK_TILE, gemm_tiling

    for num_sms in (1, 132):
        tiling = gemm_tiling(batch, M, N, K, element_size, num_sms)
        for block in (tiling.block_m, tiling.block_n, tiling.block_k):
            assert 16 <= block <= MAX_TILE and block & (block - 1) == 0
        assert tiling.grid == (-(-M // tiling.block_m) * -(-N // tiling.block_n), batch)
        programs = tiling.grid[0] * tiling.grid[1]
        shrinkable = max(tiling.block_m, tiling.block_n) > MIN_SHRUNK_TILE
        assert programs >= num_sms or not shrinkable
    largest = gemm_tiling(batch, M, N, K, element_size, 1)
    assert largest.block_m == min(MAX_TILE, max(16, 1 << (M - 1).bit_length()))


# ---------------------------------------------------------------------------------------------- kernel paths


def test_embedding_dimension_in_several_chunks_and_padded_classes():
    """D = 300 takes five 64-wide chunks (gW and the row gradients of the noise added atomically); C = 40 pads to 64."""
    _compare_all_ops(T=2, B=5, C=40, D=300)


def test_programs_that_loop_over_several_tiles_and_all_steps(monkeypatch):
    """Few allowed programs: each takes several row tiles (ragged last one), and one program walks all T steps."""
    from noprop.kernels import _common

    monkeypatch.setattr(_common, "MAX_PROGRAMS", 1)
    monkeypatch.setattr(_common, "FILL_PROGRAMS", 1)
    T, B, C, D = 3, 100, 10, 20
    rows = T * B  # every kernel here, the latent update included, runs on all T * B rows
    for budget in _row_tile_budgets():
        tiling = _common.row_tiling(rows, C, D, budget)
        assert tiling.tiles_per_program > 1 and tiling.single_chunk
        assert tiling.num_programs * tiling.tiles_per_program * tiling.block_rows > rows  # a ragged last tile
    assert _common.example_tiling(T, B, D).step_groups == 1
    _compare_all_ops(T, B, C, D, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """Half-precision logits, embedding and latents are read as float32; outputs keep their dtype."""
    from noprop import kernels

    g = torch.Generator().manual_seed(2)
    T, B, C, D = 3, 6, 10, 20
    logits = (3 * torch.randn(T, B, C, generator=g)).to(DEVICE, dtype)
    W = torch.randn(C, D, generator=g).to(DEVICE)
    y = torch.randint(0, C, (B,), generator=g).to(DEVICE)
    weight = torch.rand(T, B, generator=g).to(DEVICE)
    seed = rng.as_seed_tensor(4, DEVICE)
    grad_loss = torch.tensor(0.5, device=DEVICE)
    loss, rows = kernels.denoising_loss_forward(logits, W, y, weight, None, seed, "softmax")
    glogits, gW = kernels.denoising_loss_backward(grad_loss, logits, W, y, weight, None, seed, "softmax", True)
    leaves = [logits.float().requires_grad_(), W.clone().requires_grad_()]
    ref_loss, ref_rows = reference.denoising_loss(leaves[0], leaves[1], y, weight, None, seed, "softmax")
    ref_glogits, ref_gW = torch.autograd.grad(ref_loss, leaves, grad_loss)
    assert glogits.dtype == dtype
    for actual, expected in ((loss, ref_loss), (rows, ref_rows), (glogits, ref_glogits), (gW, ref_gW)):
        assert_close(actual, expected, dtype)

    W_half = W.to(dtype)
    z = kernels.noised_latents_forward(W_half, y, weight, weight, seed)
    assert z.dtype == dtype
    assert_close(z, reference.noised_latents(W_half.float(), y, weight, weight, seed), dtype)
    z_new = kernels.latent_update_forward(logits[0], W_half, z[0], weight[0], weight[0], weight[0], seed, "linear")
    assert z_new.dtype == dtype
    expected = reference.latent_update(logits[0].float(), W_half.float(), z[0].float(), weight[0], weight[0], weight[0], seed, "linear")
    assert_close(z_new, expected, dtype)
    coefficients = (weight[0], weight[1], weight[2])
    grads = kernels.latent_update_backward(z_new, logits[0], W_half, z[0], *coefficients, seed, "softmax", *(True,) * 6)
    leaves = [t.float().requires_grad_() for t in (logits[0], W_half, z[0], *coefficients)]
    expected = torch.autograd.grad(reference.latent_update(*leaves, seed, "softmax"), leaves, z_new.float())
    assert [t.dtype for t in grads] == [dtype] * 3 + [torch.float32] * 3
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, dtype)


def test_unneeded_gradients_are_empty():
    from noprop import kernels

    T, B, C, D = 2, 3, 4, 5
    W, a = torch.randn(C, D, device=DEVICE), torch.rand(T, B, device=DEVICE)
    y = torch.tensor([0, 3, 1], device=DEVICE)
    seed = rng.as_seed_tensor(1, DEVICE)
    gW, ga, gb = kernels.noised_latents_backward(torch.ones(T, B, D, device=DEVICE), W, y, a, a, seed, False, False, True)
    assert gW.numel() == 0 and ga.numel() == 0 and gb.shape == (T, B)
    logits = torch.randn(T, B, C, device=DEVICE)
    glogits, gW = kernels.denoising_loss_backward(torch.tensor(1.0, device=DEVICE), logits, W, y, a, None, None, "softmax", False)
    assert glogits.shape == logits.shape and gW.numel() == 0
    z, row = torch.randn(B, D, device=DEVICE), a[0]
    needs = (False, True, False, False, True, False)  # logits, W, z, p, q, r
    glogits, gW, gz, gp, gq, gr = kernels.latent_update_backward(z, logits[0], W, z, row, row, row, seed, "linear", *needs)
    assert gW.shape == (C, D) and gq.shape == (B,) and all(t.numel() == 0 for t in (glogits, gz, gp, gr))


def test_normal_counters_past_2_to_the_40():
    offset = 2**40 + 3
    expected = rng.normal(2**33 + 1, (3, 700), offset=offset)
    assert_close(ops.normal(2**33 + 1, (3, 700), offset=offset, device=DEVICE, backend="triton").cpu(), expected)


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,C,D", [(10, 128, 100, 3072), (10, 128, 10, 784), (10, 8192, 10, 20), (2, 4096, 100, 20)])
def test_large_shapes_on_gpu(T, B, C, D):
    """Tensor-core products (tf32x3) and multi-tile programs keep float32 accuracy at training sizes."""
    _compare_all_ops(T, B, C, D, seed=3, device="cuda")


@pytest.mark.gpu
def test_training_step_captures_in_a_cuda_graph():
    """Forward and backward of the fused ops read the seed and the upstream gradient on the device:
    a captured step replays with a new seed written into the same tensor."""
    T, B, C, D = 4, 64, 10, 20
    g = torch.Generator().manual_seed(5)
    W = torch.randn(C, D, generator=g).cuda().requires_grad_()
    logits = torch.randn(T, B, C, generator=g).cuda().requires_grad_()
    y = torch.randint(0, C, (B,), generator=g).cuda()
    a, b, weight = (torch.rand(T, generator=g).cuda() for _ in range(3))
    upstream = torch.randn(T, B, D, generator=g).cuda()
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")

    def step():
        z = ops.noised_latents(W, y, a, b, seed, backend="triton")
        loss = ops.denoising_loss(
            logits, W, y, weight, readout="linear", noise_coef=-torch.ones(T, device="cuda"), seed=seed, backend="triton"
        )
        total = loss + (z * upstream).sum()
        return (total.detach(), *torch.autograd.grad(total, (W, logits)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    seed.fill_(12)
    graph.replay()
    torch.cuda.synchronize()
    for actual, expected in zip(captured, step()):
        assert_close(actual, expected)
