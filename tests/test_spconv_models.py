"""Whole models written against spconv's namespace run unchanged on ``pointconv.sparse``.

The issue's promise: replace ``import spconv.pytorch as spconv`` with ``import pointconv.sparse as
spconv`` and an existing model builds, runs, trains and gives the same numbers with the same
weights. Each model here is written once, in the style of its source (OpenPCDet's
``VoxelBackBone8x`` / ``VoxelResBackBone8x`` / ``UNetV2``, a Cylinder3D-style asymmetric UNet),
as a function of the ``spconv`` module it is given; the test builds it with spconv 2.3.8 (CPU
wheel, where installed) and with pointconv, loads spconv's state_dict into ours and compares
every output. spconv runs on one thread (its multi-threaded CPU kernels race, see
test_spconv_parity.py); its backward does not run on a CPU-only torch, so the gradients of the
ported models are checked with ``gradcheck`` instead.
"""
from functools import partial

import pytest
import torch
from torch import nn

import pointconv.sparse as ours


def _post_act_block(spconv, cin, cout, k, norm_fn, indice_key, stride=1, padding=0, conv_type="subm"):
    # OpenPCDet's pcdet/models/backbones_3d/spconv_backbone.py: post_act_block
    if conv_type == "subm":
        conv = spconv.SubMConv3d(cin, cout, k, bias=False, indice_key=indice_key)
    elif conv_type == "spconv":
        conv = spconv.SparseConv3d(cin, cout, k, stride=stride, padding=padding, bias=False,
                                   indice_key=indice_key)
    else:
        conv = spconv.SparseInverseConv3d(cin, cout, k, indice_key=indice_key, bias=False)
    return spconv.SparseSequential(conv, norm_fn(cout), nn.ReLU())


class VoxelBackBone8x(nn.Module):
    """OpenPCDet's SECOND / PV-RCNN backbone at reduced width: 8x down, then a (3, 1, 1) conv out."""

    def __init__(self, spconv, cin, sparse_shape):
        super().__init__()
        self.spconv, self.sparse_shape = spconv, sparse_shape
        norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
        block = partial(_post_act_block, spconv, norm_fn=norm_fn)
        self.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(cin, 8, 3, padding=1, bias=False, indice_key="subm1"), norm_fn(8), nn.ReLU())
        self.conv1 = spconv.SparseSequential(block(8, 8, 3, indice_key="subm1"))
        self.conv2 = spconv.SparseSequential(
            block(8, 12, 3, stride=2, padding=1, indice_key="spconv2", conv_type="spconv"),
            block(12, 12, 3, indice_key="subm2"), block(12, 12, 3, indice_key="subm2"))
        self.conv3 = spconv.SparseSequential(
            block(12, 16, 3, stride=2, padding=1, indice_key="spconv3", conv_type="spconv"),
            block(16, 16, 3, indice_key="subm3"))
        self.conv4 = spconv.SparseSequential(
            block(16, 16, 3, stride=2, padding=(0, 1, 1), indice_key="spconv4", conv_type="spconv"),
            block(16, 16, 3, indice_key="subm4"))
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(16, 24, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                                indice_key="spconv_down2"), norm_fn(24), nn.ReLU())

    def forward(self, voxel_features, voxel_coords, batch_size):
        x = self.spconv.SparseConvTensor(features=voxel_features, indices=voxel_coords.int(),
                                         spatial_shape=self.sparse_shape, batch_size=batch_size)
        x_conv1 = self.conv1(self.conv_input(x))
        x_conv4 = self.conv4(self.conv3(self.conv2(x_conv1)))
        out = self.conv_out(x_conv4)
        dense = out.dense()  # OpenPCDet's HeightCompression: (N, C, D, H, W) -> (N, C * D, H, W)
        n, c, d, h, w = dense.shape
        return [x_conv4, out], dense.view(n, c * d, h, w)


class _SparseBasicBlock(nn.Module):
    """OpenPCDet's residual block (VoxelResBackBone8x, CenterPoint): replace_feature, then add.

    A ``spconv.SparseModule`` there, so that ``SparseSequential`` hands it the whole tensor (plain
    modules get the features): ``SparseBasicBlock`` below mixes in the given namespace's class.
    """

    def __init__(self, spconv, planes, indice_key, norm_fn):
        super().__init__()
        self.conv1 = spconv.SubMConv3d(planes, planes, 3, stride=1, padding=1, bias=True, indice_key=indice_key)
        self.bn1, self.relu = norm_fn(planes), nn.ReLU()
        self.conv2 = spconv.SubMConv3d(planes, planes, 3, stride=1, padding=1, bias=True, indice_key=indice_key)
        self.bn2 = norm_fn(planes)

    def forward(self, x):
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features))
        out = out.replace_feature(out.features + x.features)
        return out.replace_feature(self.relu(out.features))


def SparseBasicBlock(spconv, planes, indice_key, norm_fn):
    cls = type("SparseBasicBlock", (_SparseBasicBlock, spconv.SparseModule), {})
    return cls(spconv, planes, indice_key, norm_fn)


class UNetV2(nn.Module):
    """OpenPCDet's UNetV2 (PartA2) decoder pattern: lateral concat, channel reduction, inverse convs."""

    def __init__(self, spconv, cin, sparse_shape, width=8):
        super().__init__()
        self.spconv, self.sparse_shape = spconv, sparse_shape
        norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
        block = partial(_post_act_block, spconv, norm_fn=norm_fn)
        c1, c2 = width, 2 * width
        self.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(cin, c1, 3, padding=1, bias=False, indice_key="subm1"), norm_fn(c1), nn.ReLU())
        self.res1 = SparseBasicBlock(spconv, c1, "subm1", norm_fn)
        self.conv2 = spconv.SparseSequential(
            block(c1, c2, 3, stride=2, padding=1, indice_key="spconv2", conv_type="spconv"),
            SparseBasicBlock(spconv, c2, "subm2", norm_fn))
        self.conv_up_t2 = SparseBasicBlock(spconv, c2, "subm2", norm_fn)
        self.conv_up_m2 = block(2 * c2, c2, 3, indice_key="subm2")
        self.inv_conv2 = block(c2, c1, 3, indice_key="spconv2", conv_type="inverseconv")
        self.conv_up_t1 = SparseBasicBlock(spconv, c1, "subm1", norm_fn)
        self.conv_up_m1 = block(2 * c1, c1, 3, indice_key="subm1")
        self.conv5 = spconv.SparseSequential(block(c1, c1, 3, indice_key="subm1"))

    @staticmethod
    def channel_reduction(x, out_channels):
        features = x.features
        n, in_channels = features.shape
        features = features.view(n, out_channels, -1).sum(dim=2)
        return x.replace_feature(features)

    def up_block(self, x_lateral, x_bottom, conv_t, conv_m, conv_inv):
        x_trans = conv_t(x_lateral)
        x = x_trans.replace_feature(torch.cat((x_bottom.features, x_trans.features), dim=1))
        x_m = conv_m(x)
        x = self.channel_reduction(x, x_m.features.shape[1])
        x = x_m.replace_feature(x_m.features + x.features)
        return conv_inv(x)

    def forward(self, voxel_features, voxel_coords, batch_size):
        x = self.spconv.SparseConvTensor(voxel_features, voxel_coords.int(), self.sparse_shape, batch_size)
        x_conv1 = self.res1(self.conv_input(x))
        x_conv2 = self.conv2(x_conv1)
        x_up2 = self.up_block(x_conv2, x_conv2, self.conv_up_t2, self.conv_up_m2, self.inv_conv2)
        x_up1 = self.up_block(x_conv1, x_up2, self.conv_up_t1, self.conv_up_m1, self.conv5)
        return [x_conv2, x_up2, x_up1], x_up1.features


class AsymmetricUNet(nn.Module):
    """Cylinder3D-style: asymmetric (1,3,3)/(3,1,3) SubM kernels, (2,2,1) strided down, inverse up, gating."""

    def __init__(self, spconv, cin, sparse_shape, width=8):
        super().__init__()
        self.spconv, self.sparse_shape = spconv, sparse_shape
        self.a1 = spconv.SubMConv3d(cin, width, (1, 3, 3), padding=(0, 1, 1), bias=False, indice_key="pre")
        self.a2 = spconv.SubMConv3d(width, width, (3, 1, 3), padding=(1, 0, 1), bias=False, indice_key="pre2")
        self.bn, self.act = nn.BatchNorm1d(width), nn.LeakyReLU()
        self.down = spconv.SparseConv3d(width, 2 * width, 3, stride=(2, 2, 1), padding=1, bias=False,
                                        indice_key="down2")
        self.mid = spconv.SubMConv3d(2 * width, 2 * width, (3, 3, 1), padding=(1, 1, 0), indice_key="mid")
        self.up = spconv.SparseInverseConv3d(2 * width, width, 3, indice_key="down2", bias=False)
        self.gate = spconv.SubMConv3d(width, width, (1, 1, 3), padding=(0, 0, 1), bias=True, indice_key="g")
        self.head = spconv.SubMConv3d(2 * width, 5, 3, padding=1, bias=True, indice_key="logit")

    def forward(self, voxel_features, voxel_coords, batch_size):
        x = self.spconv.SparseConvTensor(voxel_features, voxel_coords.int(), self.sparse_shape, batch_size)
        a = self.a1(x)
        a = a.replace_feature(self.act(self.bn(a.features)))
        a = self.a2(a)
        d = self.down(a)
        d = self.mid(d)
        d = d.replace_feature(self.act(d.features))
        u = self.up(d)
        g = self.gate(u)
        u = u.replace_feature(u.features * torch.sigmoid(g.features) + a.features)
        u = u.replace_feature(torch.cat((u.features, a.features), 1))
        logits = self.head(u)
        return [d, u, logits], logits.dense()


class MnistNet(nn.Module):
    """spconv's own example (examples/mnist_sparse.py), 2D, at reduced width, with spconv's
    feature-wise modules (their state_dict keys must match), ``algo=`` and ``RemoveGrid``."""

    def __init__(self, spconv, cin, sparse_shape, width=8):
        super().__init__()
        self.spconv, self.sparse_shape = spconv, sparse_shape
        self.net = spconv.SparseSequential(
            nn.BatchNorm1d(cin),
            spconv.SubMConv2d(cin, width, 3, 1, algo=spconv.ConvAlgo.Native),
            nn.ReLU(),
            spconv.SubMConv2d(width, 2 * width, 3, 1),
            spconv.SparseReLU(),
            spconv.SparseConv2d(2 * width, 2 * width, 2, 2, algo=spconv.ConvAlgo.Native),  # the CPU wheel runs no other
            spconv.SparseBatchNorm(2 * width),
            nn.ReLU(),
            spconv.SubMConv2d(2 * width, 2 * width, 3, 1),
            spconv.SparseIdentity(),
            nn.ReLU(),
            spconv.RemoveGrid(),
        )
        self.pool, self.to_dense = spconv.SparseMaxPool2d(2, 2), spconv.ToDense()

    def forward(self, voxel_features, voxel_coords, batch_size):
        x = self.spconv.SparseConvTensor(voxel_features, voxel_coords.int(), self.sparse_shape, batch_size)
        x = self.net(x)
        return [x], self.to_dense(self.pool(x))


MODELS = {  # the class, a grid for the parity test, a smaller one for gradcheck
    "VoxelBackBone8x": (VoxelBackBone8x, [41, 16, 14], [41, 6, 5]),  # 41 -> 21 -> 11 -> 5 -> 2 in z
    "UNetV2": (UNetV2, [11, 12, 10], [6, 6, 5]),
    "Cylinder3D-style": (AsymmetricUNet, [12, 10, 9], [6, 5, 5]),
    "spconv's MNIST example": (MnistNet, [28, 28], [12, 12]),
}


def _voxels(shape, cin=4, batch=2, density=0.08, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, *shape, generator=g) < density
    coords = torch.nonzero(active).int()
    coords = coords[torch.randperm(coords.shape[0], generator=g)].contiguous()  # voxelizers' order
    return torch.randn(coords.shape[0], cin, generator=g, dtype=dtype), coords


def _by_site(t):
    order = torch.unique(t.indices.long(), dim=0, return_inverse=True)[1].argsort()
    return t.features[order], t.indices[order].long()


def _randomize_batch_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_ports_give_spconvs_numbers(name, train):
    spconv = pytest.importorskip("spconv.pytorch")
    cls, shape, _ = MODELS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        theirs = cls(spconv, 4, shape)
        _randomize_batch_norms(theirs, seed=1)
        mine = cls(ours, 4, shape)
        mine.load_state_dict(theirs.state_dict())  # spconv checkpoints load unchanged
        theirs.train(train), mine.train(train)
        for m in theirs.modules():  # spconv 2.3.8 fuses the bias in eval mode, and that path is CUDA only
            if isinstance(m, spconv.conv.SparseConvolution):
                m.training = True  # (changes only where the bias is added)
        feats, coords = _voxels(shape)
        with torch.no_grad():
            tensors_t, out_t = theirs(feats, coords, 2)
            tensors_m, out_m = mine(feats, coords, 2)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(tensors_m, tensors_t):
        assert list(a.spatial_shape) == list(b.spatial_shape)
        fa, ia = _by_site(a)
        fb, ib = _by_site(b)
        assert torch.equal(ia, ib), "the active sites differ"
        torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_m, out_t, rtol=1e-4, atol=1e-4)
    if train:  # batch statistics moved the same way
        for (n, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def _smooth(model):
    """ReLU kinks would trip gradcheck's finite differences: swap each activation module for Tanh."""
    for m in list(model.modules()):
        for child_name, child in m.named_children():
            if isinstance(child, (nn.ReLU, nn.LeakyReLU)):
                setattr(m, child_name, nn.Tanh())
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_model_ports_gradients(name):
    """Gradients of a whole ported model w.r.t. its input features and every parameter are exact.

    For each input on its own, the directional derivative along a random direction (autograd)
    matches the central difference of the forward pass in float64: gradcheck's fast mode, one
    direction per input, without its full-Jacobian error report (minutes at these sizes).
    """
    cls, _, shape = MODELS[name]
    torch.manual_seed(0)
    model = _smooth(cls(ours, 2, shape).double()).eval()
    _randomize_batch_norms(model, seed=2)
    feats, coords = _voxels(model.sparse_shape, cin=2, density=0.2, seed=3, dtype=torch.float64)
    names = ["features"] + [n for n, _ in model.named_parameters()]
    inputs = [feats] + [p.detach() for p in model.parameters()]
    cotangent = torch.randn(model(feats, coords, 2)[1].shape, dtype=torch.float64)

    def loss(values):
        out = torch.func.functional_call(model, dict(zip(names[1:], values[1:])), (values[0], coords, 2))[1]
        return (out * cotangent).sum()

    leaves = [v.clone().requires_grad_(True) for v in inputs]
    grads = torch.autograd.grad(loss(leaves), leaves)
    g = torch.Generator().manual_seed(4)
    eps = 1e-6
    for i, (name_i, v, grad) in enumerate(zip(names, inputs, grads)):
        direction = torch.randn(v.shape, generator=g, dtype=v.dtype)
        with torch.no_grad():
            up = loss([w + eps * direction if j == i else w for j, w in enumerate(inputs)])
            down = loss([w - eps * direction if j == i else w for j, w in enumerate(inputs)])
        numeric = (up - down) / (2 * eps)
        analytic = (grad * direction).sum()
        assert abs(numeric) > 1e-6, name_i  # the input matters
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7, msg=name_i)
