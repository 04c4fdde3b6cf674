"""Sparse 3D ops and the MinkUNet student (clip2scene.md, "Tests to pin"): voxelisation round
trip, the pure-torch sparse convolutions against torch's dense ones on fully occupied grids,
gradients, spconv parity (requires_spconv), MinkUNet shapes, training and the authors' key map."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from ovseg.errors import WeightsError
from ovseg.layers.sparse import (
    SparseBackendError,
    SparseTensor,
    batch_coordinates,
    dense_weight,
    kernel_offsets,
    pool_to_voxels,
    resolve_backend,
    sparse_conv,
    spconv_available,
    voxelize,
    voxels_to_points,
)
from ovseg.layers.sparse.conv import _GatherMatmulScatter, kernel_map
from ovseg.modeling.minkunet import (
    AUTHOR_KEYS_DROPPED,
    MINKUNET_14A,
    MinkUNet,
    MinkUNetPlan,
    author_key_map,
    author_key_to_ours,
    build_minkunet,
    load_authors_checkpoint,
    student_input,
)
from tests.fixtures.checkpoints import minkowski_minkunet_state

requires_spconv = pytest.mark.skipif(not spconv_available(), reason="spconv is not installed")


# --------------------------------------------------------------------------- voxelisation


def test_voxelize_floors_and_maps_points_both_ways():
    points = torch.tensor([[0.01, 0.01, 0.01], [-0.07, 0.0, 0.0], [0.06, 0.0, 0.0],
                           [0.04, 0.049, 0.0], [-0.051, 0.0, 0.0]])
    coords, point_to_voxel, voxel_to_point = voxelize(points, 0.05, centre=False)
    # floor(p / 5 cm), sorted: -0.07 and -0.051 -> -2, 0.01 and 0.04 -> 0, 0.06 -> 1
    assert coords.tolist() == [[-2, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert coords.dtype == torch.int32
    assert point_to_voxel.tolist() == [1, 0, 2, 1, 0]
    assert voxel_to_point.tolist() == [1, 0, 2]  # the first point of each voxel
    # round trip: every point gets its voxel's prediction
    prediction = torch.tensor([7, 8, 9])
    assert voxels_to_points(prediction, voxelize(points, 0.05, centre=False)).tolist() == [
        8, 7, 9, 8, 7]


def test_voxelize_centres_and_pools():
    points = torch.tensor([[10.0, 20.0, 30.0], [10.25, 20.0, 30.0]])  # mean (10.125, 20, 30)
    voxels = voxelize(points, 0.05)
    assert voxels.coords.tolist() == [[-3, 0, 0], [2, 0, 0]]  # floor(+-2.5 voxels)
    values = torch.tensor([[1.0], [3.0], [5.0]])
    three = voxelize(torch.tensor([[0.0, 0, 0], [0.01, 0, 0], [0.3, 0, 0]]), 0.05, centre=False)
    assert pool_to_voxels(values, three, "first").tolist() == [[1.0], [5.0]]
    assert pool_to_voxels(values, three, "mean").tolist() == [[2.0], [5.0]]
    # a scene's round trip: the gather of voxel ids gives back each point's own voxel
    cloud = torch.rand(2000, 3) * 2
    voxels = voxelize(cloud, 0.05)
    ids = voxels_to_points(torch.arange(len(voxels.coords)), voxels)
    grid = torch.floor((cloud.double() - cloud.double().mean(0)) / 0.05).int()
    assert torch.equal(voxels.coords[ids], grid)
    assert torch.equal(voxels.point_to_voxel[voxels.voxel_to_point],
                       torch.arange(len(voxels.coords)))


# --------------------------------------------------------------------------- convolution


def full_grid(low: int, size: int, batches: int = 2) -> torch.Tensor:
    axis = torch.arange(low, low + size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    rows = [torch.cat([torch.full((len(grid), 1), b), grid], 1) for b in range(batches)]
    return torch.cat(rows).int()


def to_dense(coords, feats, low, size, stride=1, batches=2):
    dense = torch.zeros(batches, feats.shape[1], size, size, size, dtype=feats.dtype)
    at = torch.div(coords[:, 1:].long() - low, stride, rounding_mode="floor")
    dense[coords[:, 0].long(), :, at[:, 0], at[:, 1], at[:, 2]] = feats
    return dense


def test_kernel_offsets_run_x_fastest():
    assert kernel_offsets(3)[:4].tolist() == [[-1, -1, -1], [0, -1, -1], [1, -1, -1],
                                             [-1, 0, -1]]
    assert kernel_offsets(2).tolist()[1] == [1, 0, 0]


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_submanifold_conv_equals_dense_conv3d(kernel_size):
    torch.manual_seed(0)
    coords = full_grid(-3, 5)  # negative coordinates and two batch items
    feats = torch.randn(len(coords), 3, dtype=torch.float64)
    kernel = torch.randn(kernel_size ** 3, 3, 4, dtype=torch.float64)
    out = sparse_conv(SparseTensor(coords, feats), kernel, kernel_size)
    assert torch.equal(out.coords, coords)
    expected = F.conv3d(to_dense(coords, feats, -3, 5), dense_weight(kernel, kernel_size),
                        padding=kernel_size // 2)
    assert torch.allclose(to_dense(out.coords, out.feats, -3, 5), expected, atol=1e-12)


def test_submanifold_conv_on_a_sparse_set_is_dense_conv_at_occupied_sites():
    torch.manual_seed(1)
    coords = full_grid(0, 6)
    coords = coords[torch.rand(len(coords)) < 0.3]
    feats = torch.randn(len(coords), 2, dtype=torch.float64)
    kernel = torch.randn(27, 2, 3, dtype=torch.float64)
    out = sparse_conv(SparseTensor(coords, feats), kernel, 3)
    dense = F.conv3d(to_dense(coords, feats, 0, 6), dense_weight(kernel, 3), padding=1)
    at = coords.long()
    assert torch.allclose(out.feats, dense[at[:, 0], :, at[:, 1], at[:, 2], at[:, 3]])


def test_strided_and_transposed_convs_equal_dense_equivalents():
    torch.manual_seed(2)
    coords = full_grid(-4, 8)
    feats = torch.randn(len(coords), 3, dtype=torch.float64)
    down_kernel = torch.randn(8, 3, 5, dtype=torch.float64)
    down = sparse_conv(SparseTensor(coords, feats), down_kernel, 2, stride=2)
    assert down.stride == 2 and len(down.coords) == 2 * 4 ** 3
    assert (down.coords[:, 1:] % 2 == 0).all()  # floor(p / 2) * 2, MinkowskiEngine's rule
    expected_down = F.conv3d(to_dense(coords, feats, -4, 8), dense_weight(down_kernel, 2),
                             stride=2)
    assert torch.allclose(to_dense(down.coords, down.feats, -4, 4, stride=2), expected_down)
    up_kernel = torch.randn(8, 5, 2, dtype=torch.float64)
    up = sparse_conv(down, up_kernel, 2, stride=2, transposed=True)
    assert up.stride == 1 and torch.equal(up.coords, coords)  # back on the finer set
    expected_up = F.conv_transpose3d(expected_down, dense_weight(up_kernel, 2, True), stride=2)
    assert torch.allclose(to_dense(up.coords, up.feats, -4, 8), expected_up)


def test_gradients_match_autograd_of_the_dense_conv():
    torch.manual_seed(3)
    coords = full_grid(0, 4, batches=1)
    coords = coords[torch.rand(len(coords)) < 0.6]
    x = SparseTensor(coords, torch.randn(len(coords), 2, dtype=torch.float64,
                                         requires_grad=True))
    for stride in (1, 2):
        size = 3 if stride == 1 else 2
        kernel = torch.randn(size ** 3, 2, 3, dtype=torch.float64, requires_grad=True)
        kmap = kernel_map(x, size, stride)
        assert torch.autograd.gradcheck(_GatherMatmulScatter.apply, (x.feats, kernel, kmap))


def test_backend_selector(monkeypatch):
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setitem(sys.modules, "spconv", None)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)
    with pytest.raises(SparseBackendError, match="sparse backend 'spconv' was asked for"):
        resolve_backend("spconv", "cpu")
    x = SparseTensor(full_grid(0, 2), torch.randn(16, 2))
    with pytest.raises(SparseBackendError, match="pip install"):
        sparse_conv(x, torch.randn(27, 2, 2), 3, backend="spconv")
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("minkowski", "cpu")


@pytest.mark.requires_spconv
@requires_spconv
@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (2, 2)])
def test_spconv_forward_equals_ours(kernel_size, stride):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(4)
    coords = full_grid(-5, 10)
    coords = coords[torch.rand(len(coords)) < 0.4].to(device)
    feats = torch.randn(len(coords), 4, device=device)
    # spconv's CPU backward calls torch.cuda (spconv 2.3.6): gradients only on a GPU
    kernel = torch.randn(kernel_size ** 3, 4, 6, device=device, requires_grad=device == "cuda")
    ours = sparse_conv(SparseTensor(coords, feats), kernel, kernel_size, stride)
    theirs = sparse_conv(SparseTensor(coords, feats), kernel, kernel_size, stride,
                         backend="spconv")
    assert torch.equal(ours.coords, theirs.coords)
    assert torch.allclose(ours.feats, theirs.feats, atol=1e-4)
    if device == "cuda":
        grad_ours, = torch.autograd.grad(ours.feats.sum(), kernel)
        grad_theirs, = torch.autograd.grad(theirs.feats.sum(), kernel)
        assert torch.allclose(grad_ours, grad_theirs, atol=1e-3)


@pytest.mark.requires_spconv
@requires_spconv
def test_spconv_refuses_training_on_the_cpu():
    x = SparseTensor(full_grid(0, 3), torch.randn(54, 2))
    kernel = torch.randn(27, 2, 2, requires_grad=True)
    with pytest.raises(SparseBackendError, match="backward"):
        sparse_conv(x, kernel, 3, backend="spconv")


# --------------------------------------------------------------------------- MinkUNet

TINY = {"planes": (8, 8, 8, 8, 8, 8, 6, 6), "init_dim": 4, "head_dim": 5}


def random_scene(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(count, 3, generator=generator) * torch.tensor([1.2, 1.0, 0.8])
    colors = torch.randint(0, 256, (count, 3), generator=generator)
    return points, colors


def test_student_input_scales_colour_and_centres():
    points = torch.tensor([[0.0, 1.0, 1.0], [0.01, 1.0, 1.0], [0.35, 1.0, 1.0]])
    colors = torch.tensor([[255, 0, 0], [0, 0, 0], [0, 255, 127]])
    x, voxels = student_input([points, points + 5], [colors, colors])
    assert x.coords[:, 0].tolist() == [0, 0, 1, 1]  # batch index per scene
    # centred on x = 0.12 m: -2.4, -2.2 and 4.6 voxels, floored
    assert x.coords[:2, 1:].tolist() == [[-3, 0, 0], [4, 0, 0]]
    assert torch.allclose(x.feats[0], torch.tensor([1.0, -1.0, -1.0]))  # first point's RGB
    assert torch.allclose(x.feats[1], torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))
    assert voxels[1].point_to_voxel.tolist() == [0, 0, 1]


def test_minkunet14a_output_shapes_at_a_tiny_width():
    net = MinkUNet(MinkUNetPlan(**TINY)).eval()
    scenes = [random_scene(400, 0), random_scene(300, 1)]
    x, voxels = student_input([s[0] for s in scenes], [s[1] for s in scenes])
    with torch.no_grad():
        out = net(x)
    count = len(x.coords)
    assert out.features.shape == (count, 6)
    assert out.final.shape == (count, 5) and out.local.shape == (count, 5)
    assert count == sum(len(v.coords) for v in voxels)
    # the full-size plans: 14A's stages hold one block, 18A's two; heads 96 -> 512
    assert len(build_minkunet("MinkUNet18A", **TINY).block3) == 2
    assert len(MinkUNet(MinkUNetPlan(**TINY)).block3) == 1
    full = MinkUNet(MINKUNET_14A)
    assert full.final.kernel.shape == (96, 512) and full.local.bias.shape == (1, 512)
    assert full.conv0p1s1.kernel.shape == (27, 3, 32)
    assert full.block5[0].conv1.kernel.shape == (27, 128 + 128, 128)


def test_tiny_minkunet_trains_on_random_points():
    torch.manual_seed(5)
    net = MinkUNet(MinkUNetPlan(**{**TINY, "head_dim": 2}))
    points, colors = random_scene(600, 2)
    x, (voxels,) = student_input([points], [colors])
    labels = (x.coords[:, 1] > 0).long()  # left / right half of the scene
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x).final, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None for name, p in net.named_parameters()
               if not name.startswith("local."))  # the local head is not in this loss
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- authors' weights


def authors_minkunet14a_state() -> dict[str, torch.Tensor]:
    """A fake of the authors' checkpoint at full width: CLIP2Scene's MinkUNet14A (3 -> ...,
    model_n_out 512, 20 text categories)."""
    return minkowski_minkunet_state()


def test_authors_checkpoint_loads_one_to_one(tmp_path):
    state = authors_minkunet14a_state()
    net = MinkUNet(MINKUNET_14A)
    key_map = author_key_map(net)
    assert set(key_map) == set(state) - set(AUTHOR_KEYS_DROPPED)
    assert all(author_key_to_ours(theirs) == ours for theirs, ours in key_map.items())
    assert key_map["bn0.bn.running_var"] == "bn0.running_var"
    assert key_map["block8.0.downsample.1.bn.weight"] == "block8.0.downsample.1.weight"
    assert key_map["local_feature.kernel"] == "local.kernel"
    # a Lightning-style file: {'state_dict': {'model_points.<key>': ...}} beside the images'
    wrapped = {f"model_points.{k}": v for k, v in state.items()}
    wrapped["model_images.proj.weight"] = torch.zeros(2)
    path = tmp_path / "clip2scene.ckpt"
    torch.save({"state_dict": wrapped, "epoch": 30}, path)
    load_authors_checkpoint(net, path)
    assert torch.equal(net.block1[0].norm1.running_var, state["block1.0.norm1.bn.running_var"])
    assert torch.equal(net.local.bias, state["local_feature.bias"])
    assert torch.equal(net.convtr7p2s2.kernel, state["convtr7p2s2.kernel"])
    assert int(net.bn0.num_batches_tracked) == 7


def test_a_wrong_checkpoint_lists_unmatched_keys_in_one_line():
    state = authors_minkunet14a_state()
    del state["block3.0.conv2.kernel"]
    state["block9.0.conv1.kernel"] = torch.zeros(27, 96, 96)
    state["final.kernel"] = torch.zeros(96, 256)
    with pytest.raises(WeightsError) as error:
        load_authors_checkpoint(MinkUNet(MINKUNET_14A), {f"module.{k}": v
                                                         for k, v in state.items()})
    message = str(error.value)
    assert "\n" not in message
    assert "missing keys: block3.0.conv2.kernel" in message
    assert "unexpected keys: block9.0.conv1.kernel" in message
    assert "final.kernel (file (96, 256), model (96, 512))" in message


def test_batch_coordinates_prefix_the_batch_index():
    rows = batch_coordinates([torch.zeros(2, 3, dtype=torch.int32),
                              torch.ones(1, 3, dtype=torch.int32)])
    assert rows.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
