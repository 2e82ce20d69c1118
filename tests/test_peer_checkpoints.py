"""Peer weights load into the dynconv modules (dynconv.nn.peers) and give the peer's outputs.

The peers are not installed: each is re-typed here from its published definition (constructor,
parameter names and shapes, forward), in plain PyTorch (the CUDA-only kernels of DWNet and megvii as
unfold sums). Every check runs in float64: the peer's output, input gradient and parameter
gradients against ours.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv.nn import Involution2d
from dynconv.nn import peers
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("nan_poison")
f64 = torch.float64


def _randomised(module: nn.Module) -> nn.Module:
    """Every parameter and BatchNorm statistic random, so a mismatched key cannot hide."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return module.double()


def _compare(peer_call, ours_call, x, name, peer=None, ours=None, convert=None):
    """Output and input gradient of ours against the peer's; with ``peer``, ``ours`` and ``convert``
    (the conversion, a linear map of the parameters) also every parameter gradient: the peer's
    gradients, converted as its weights are, must be ours."""
    xp = x.detach().clone().requires_grad_()
    xo = x.detach().clone().requires_grad_()
    expected, actual = peer_call(xp), ours_call(xo)
    assert_close(actual.detach(), expected.detach(), f64, name)
    g = torch.randn_like(expected)
    expected.backward(g)
    actual.backward(g)
    assert_close(xo.grad, xp.grad, f64, f"{name} input gradient")
    if convert is None:
        return
    grads = copy.deepcopy(peer)
    with torch.no_grad():
        for p, source in zip(grads.parameters(), peer.parameters()):
            p.copy_(source.grad if source.grad is not None else torch.zeros_like(p))
    expected_grads = convert(grads).state_dict()
    for pname, p in ours.named_parameters():
        assert_close(p.grad, expected_grads[pname], f64, f"{name} gradient of {pname}")


# --- timm CondConv2d (EfficientNet-CondConv) -------------------------------------------------

def _timm_pad(padding, k, s, d):
    if padding == "":
        return ((s - 1) + d * (k - 1)) // 2, False
    if padding == "same":
        return (((s - 1) + d * (k - 1)) // 2, False) if s == 1 and d * (k - 1) % 2 == 0 else (0, True)
    return 0, False


class TimmCondConv2d(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, padding="", dilation=1, groups=1, bias=False, num_experts=4):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.dilation, self.groups = cin, cout, k, stride, dilation, groups
        self.pad, self.dynamic = _timm_pad(padding, k, stride, dilation)
        self.weight = nn.Parameter(torch.empty(num_experts, cout * cin // groups * k * k))
        self.bias = nn.Parameter(torch.empty(num_experts, cout)) if bias else None

    def forward(self, x, routing_weights):
        B, C, H, W = x.shape
        w = (routing_weights @ self.weight).view(B * self.cout, self.cin // self.groups, self.k, self.k)
        b = (routing_weights @ self.bias).view(-1) if self.bias is not None else None
        x = x.reshape(1, B * C, H, W)
        if self.dynamic:  # TensorFlow SAME
            ph, pw = (max((math.ceil(n / self.stride) - 1) * self.stride + (self.k - 1) * self.dilation + 1 - n, 0)
                      for n in (H, W))
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        y = F.conv2d(x, w, b, self.stride, self.pad, self.dilation, self.groups * B)
        return y.permute(1, 0, 2, 3).view(B, self.cout, y.shape[-2], y.shape[-1])


@pytest.mark.parametrize("geometry", [(3, 1, "", 1), (3, 2, "", 1), (4, 1, "same", 1), (3, 1, "same", 2),
                                      (1, 1, "valid", 1)], ids=str)
def test_timm_condconv2d(geometry, device):
    k, s, p, d = geometry
    timm = _randomised(TimmCondConv2d(4, 6, k, s, p, d, groups=2, bias=True, num_experts=3)).to(device)
    def convert(m):
        return peers.condconv2d_from_timm(m, 4, 6, k, s, p, d, groups=2, bias=True, num_experts=3)

    ours = convert(timm)
    routing = torch.rand(2, 3, dtype=f64, device=device)
    x = torch.randn(2, 4, 5, 6, dtype=f64, device=device)
    _compare(lambda x: timm(x, routing), lambda x: ours(x, routing), x, f"timm {geometry}", timm, ours, convert)


def test_timm_dynamic_same_padding_at_stride_two_is_refused():
    with pytest.raises(ValueError, match="depends on the input size"):
        peers.condconv2d_from_timm(TimmCondConv2d(4, 6, 3, 2, "same").double(), 4, 6, 3, 2, "same")


def test_efficientnet_condconv_block_shares_one_routing(device):
    """timm's CondConvResidual: one routing, sigmoid(Linear(GAP(x))), for its three convs."""
    C, E = 4, 2
    routing_fn = nn.Linear(C, E).double().to(device)
    timm_convs = [_randomised(TimmCondConv2d(C, 8, 1, num_experts=E)), _randomised(TimmCondConv2d(8, 8, 3, groups=8,
                                                                                                 num_experts=E)),
                  _randomised(TimmCondConv2d(8, C, 1, num_experts=E))]
    ours = [peers.condconv2d_from_timm(timm_convs[0].to(device), C, 8, 1, num_experts=E),
            peers.condconv2d_from_timm(timm_convs[1].to(device), 8, 8, 3, groups=8, num_experts=E),
            peers.condconv2d_from_timm(timm_convs[2].to(device), 8, C, 1, num_experts=E)]
    assert all(m.routing_fn is None for m in ours)

    def block(convs):
        def run(x):
            routing = torch.sigmoid(routing_fn(x.mean((2, 3))))
            y = F.relu(convs[0](x, routing))
            y = F.relu(convs[1](y, routing))
            return convs[2](y, routing) + x
        return run

    _compare(block(timm_convs), block(ours), torch.randn(2, C, 5, 5, dtype=f64, device=device), "EfficientNet-CC")


# --- OSVAI ODConv ----------------------------------------------------------------------------

class OsvaiAttention(nn.Module):
    def __init__(self, cin, cout, k, groups=1, reduction=0.0625, kernel_num=4, min_channel=16):
        super().__init__()
        width = max(int(cin * reduction), min_channel)
        self.k, self.kernel_num, self.temperature = k, kernel_num, 1.0
        self.fc = nn.Conv2d(cin, width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.channel_fc = nn.Conv2d(width, cin, 1)
        self.filter_fc = None if (cin == groups and cin == cout) else nn.Conv2d(width, cout, 1)
        self.spatial_fc = None if k == 1 else nn.Conv2d(width, k * k, 1)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(width, kernel_num, 1)

    def forward(self, x):
        t = self.temperature
        x = F.relu(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        B = x.shape[0]
        channel = torch.sigmoid(self.channel_fc(x).view(B, -1, 1, 1) / t)
        filt = 1.0 if self.filter_fc is None else torch.sigmoid(self.filter_fc(x).view(B, -1, 1, 1) / t)
        spatial = 1.0 if self.spatial_fc is None else torch.sigmoid(
            self.spatial_fc(x).view(B, 1, 1, 1, self.k, self.k) / t)
        kernel = 1.0 if self.kernel_fc is None else F.softmax(self.kernel_fc(x).view(B, -1, 1, 1, 1, 1) / t, dim=1)
        return channel, filt, spatial, kernel


class OsvaiODConv2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, dilation=1, groups=1, reduction=0.0625, kernel_num=4):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.padding, self.dilation, self.groups = (
            cin, cout, k, stride, padding, dilation, groups)
        self.attention = OsvaiAttention(cin, cout, k, groups, reduction, kernel_num)
        self.weight = nn.Parameter(torch.randn(kernel_num, cout, cin // groups, k, k))

    def forward(self, x):
        channel, filt, spatial, kernel = self.attention(x)
        if self.k == 1 and self.weight.shape[0] == 1:  # the reference's pointwise single-kernel path
            return F.conv2d(x * channel, self.weight.squeeze(0), None, self.stride, self.padding, self.dilation,
                            self.groups) * filt
        B, C, H, W = x.shape
        x = (x * channel).reshape(1, -1, H, W)
        w = (spatial * kernel * self.weight.unsqueeze(0)).sum(1).view(-1, self.cin // self.groups, self.k, self.k)
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups * B)
        return y.view(B, self.cout, y.shape[-2], y.shape[-1]) * filt


@pytest.mark.parametrize("case", [dict(k=3, stride=1, padding=1, groups=1, kernel_num=3, training=False),
                                  dict(k=3, stride=2, padding=1, groups=2, kernel_num=2, training=True),
                                  dict(k=1, stride=1, padding=0, groups=1, kernel_num=1, training=False)],
                         ids=["eval", "train-strided-grouped", "pointwise-single"])
def test_osvai_odconv2d(case, device):
    training = case.pop("training")
    osvai = _randomised(OsvaiODConv2d(4, 6, **{k: v for k, v in case.items()})).to(device).train(training)
    osvai.attention.temperature = 2.0
    def convert(m):
        return peers.odconv2d_from_osvai(m, 4, 6, case["k"], case["stride"], case["padding"], 1, case["groups"],
                                         kernel_num=case["kernel_num"], temperature=2.0).train(training)

    ours = convert(osvai)
    _compare(osvai, ours, torch.randn(2, 4, 5, 6, dtype=f64, device=device), f"ODConv {case}", osvai, ours, convert)


# --- the DynamicConv reference ---------------------------------------------------------------

class ReferenceAttention2d(nn.Module):
    def __init__(self, cin, ratios, K, temperature):
        super().__init__()
        hidden = int(cin * ratios) + 1 if cin != 3 else K
        self.fc1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, K, 1)
        self.temperature = temperature

    def forward(self, x):
        x = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return F.softmax(x.view(x.shape[0], -1) / self.temperature, 1)


class ReferenceDynamicConv2d(nn.Module):
    def __init__(self, cin, cout, k, ratio=0.25, stride=1, padding=0, dilation=1, groups=1, bias=True, K=4,
                 temperature=34):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.padding, self.dilation, self.groups, self.K = (
            cin, cout, k, stride, padding, dilation, groups, K)
        self.attention = ReferenceAttention2d(cin, ratio, K, temperature)
        self.weight = nn.Parameter(torch.randn(K, cout, cin // groups, k, k))
        self.bias = nn.Parameter(torch.zeros(K, cout)) if bias else None

    def forward(self, x):
        attention = self.attention(x)
        B, C, H, W = x.shape
        w = (attention @ self.weight.view(self.K, -1)).view(-1, self.cin // self.groups, self.k, self.k)
        b = (attention @ self.bias).view(-1) if self.bias is not None else None
        y = F.conv2d(x.reshape(1, -1, H, W), w, b, self.stride, self.padding, self.dilation, self.groups * B)
        return y.view(B, self.cout, y.shape[-2], y.shape[-1])


@pytest.mark.parametrize("cin", [3, 4], ids=["first-layer", "inner"])
def test_dynamicconv_reference(cin, device):
    reference = _randomised(ReferenceDynamicConv2d(cin, 6, 3, padding=1, K=3, temperature=4.0)).to(device)
    def convert(m):
        return peers.dynamicconv2d_from_reference(m, cin, 6, 3, padding=1, K=3, temperature=4.0)

    ours = convert(reference)
    assert ours.hidden_channels == (3 if cin == 3 else 2)
    _compare(reference, ours, torch.randn(2, cin, 5, 5, dtype=f64, device=device), f"DynamicConv Cin={cin}",
             reference, ours, convert)


# --- the official involution and RedNet ------------------------------------------------------

class ConvModule(nn.Module):
    """mmcv's ConvModule as the involution uses it: conv (no bias before a norm), bn, ReLU."""

    def __init__(self, cin, cout, norm):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None

    def forward(self, x):
        x = self.conv(x)
        return F.relu(self.bn(x)) if self.bn is not None else x


class OfficialInvolution(nn.Module):
    def __init__(self, channels, kernel_size, stride):
        super().__init__()
        self.k, self.stride, self.channels = kernel_size, stride, channels
        self.group_channels = 16
        self.groups = channels // 16
        self.conv1 = ConvModule(channels, channels // 4, norm=True)
        self.conv2 = ConvModule(channels // 4, kernel_size ** 2 * self.groups, norm=False)
        self.avgpool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()

    def forward(self, x):
        weight = self.conv2(self.conv1(self.avgpool(x)))
        b, _, h, w = weight.shape
        weight = weight.view(b, self.groups, 1, self.k ** 2, h, w)
        cols = F.unfold(x, self.k, 1, (self.k - 1) // 2, self.stride)
        cols = cols.view(b, self.groups, self.group_channels, self.k ** 2, h, w)
        return (weight * cols).sum(3).view(b, self.channels, h, w)


@pytest.mark.parametrize("stride,training", [(1, False), (2, True)])
def test_official_involution(stride, training, device):
    official = _randomised(OfficialInvolution(16, 3, stride)).to(device).train(training)
    def convert(m):
        return peers.involution2d_from_official(m, 16, 3, stride).train(training)

    ours = convert(official)
    _compare(official, ours, torch.randn(2, 16, 4, 4, dtype=f64, device=device), f"involution s={stride}",
             official, ours, convert)


def test_rednet_checkpoint_converts(device):
    def rednet(involution):
        stem = nn.Sequential(ConvModule(3, 16, norm=True), involution(16, 3, 1))
        return nn.Sequential(stem, nn.Sequential(ConvModule(16, 16, norm=True), involution(16, 3, 2)))

    official = _randomised(rednet(OfficialInvolution)).to(device).eval()
    ours = rednet(lambda c, k, s: Involution2d(c, k, s)).double().to(device).eval()
    converted = peers.convert_involution_checkpoint(official.state_dict())
    assert "1.0.conv.weight" in converted and "0.1.reduce.weight" in converted  # ConvModules kept, involutions renamed
    ours.load_state_dict(converted)
    _compare(official, ours, torch.randn(1, 3, 4, 4, dtype=f64, device=device), "RedNet")


# --- DWNet -----------------------------------------------------------------------------------

class DwnetDynamicDWConv(nn.Module):
    def __init__(self, dim, kernel_size, bias=True, stride=1, padding=1, groups=1, reduction=4):
        super().__init__()
        self.dim, self.k, self.stride, self.padding, self.groups = dim, kernel_size, stride, padding, groups
        self.conv1 = nn.Conv2d(dim, dim // reduction, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim // reduction)
        self.conv2 = nn.Conv2d(dim // reduction, dim * kernel_size ** 2, 1)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        b, c, h, w = x.shape
        weight = self.conv2(F.relu(self.bn(self.conv1(F.adaptive_avg_pool2d(x, 1)))))
        weight = weight.view(b * self.dim, 1, self.k, self.k)
        y = F.conv2d(x.reshape(1, -1, h, w), weight, self.bias.repeat(b), self.stride, self.padding,
                     groups=b * self.groups)
        return y.view(b, c, y.shape[-2], y.shape[-1])


@pytest.mark.parametrize("k,stride,training", [(3, 1, False), (4, 1, True), (3, 2, False)])
def test_dwnet_dynamic_dwconv(k, stride, training, device):
    dwnet = _randomised(DwnetDynamicDWConv(8, k, stride=stride, padding=k // 2, groups=8)).to(device).train(training)
    def convert(m):
        return peers.dynamic_dwconv2d_from_dwnet(m, 8, k, stride=stride, padding=k // 2, groups=8).train(training)

    ours = convert(dwnet)
    _compare(dwnet, ours, torch.randn(2, 8, 5, 6, dtype=f64, device=device), f"DWNet K={k} s={stride}", dwnet, ours,
             convert)


class DwnetIDynamicDWConv(nn.Module):
    def __init__(self, channels, kernel_size, group_channels):
        super().__init__()
        self.k, self.channels, self.group_channels = kernel_size, channels, group_channels
        self.groups = channels // group_channels
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels // 4, 1), nn.BatchNorm2d(channels // 4), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(channels // 4, kernel_size ** 2 * self.groups, 1))

    def forward(self, x):
        weight = self.conv2(self.conv1(x))
        b, _, h, w = weight.shape
        weight = weight.view(b, self.groups, 1, self.k ** 2, h, w)
        cols = F.unfold(x, self.k, padding=(self.k - 1) // 2).view(b, self.groups, self.group_channels, self.k ** 2,
                                                                    h, w)
        return (weight * cols).sum(3).view(b, self.channels, h, w)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dwnet_idynamic_dwconv_folds_the_conv1_bias(training, device):
    dwnet = _randomised(DwnetIDynamicDWConv(8, 3, group_channels=2)).to(device).train(training)
    def convert(m):
        return peers.involution2d_from_dwnet(m, 8, 3, group_channels=2).train(training)

    ours = convert(dwnet)
    assert ours.groups == 4
    _compare(dwnet, ours, torch.randn(2, 8, 5, 5, dtype=f64, device=device), "IDynamicDWConv", dwnet, ours, convert)
    if training:  # the running statistics stay consistent: ours track the mean without the folded bias
        bias = dwnet.conv1[0].bias.detach()
        assert_close(ours.bn.running_mean, dwnet.conv1[1].running_mean - bias, f64, "running_mean")


# --- megvii DRConv ---------------------------------------------------------------------------

class MegviiDRConv(nn.Module):
    """The authors' DRConv with its CUDA matmul written as an unfold sum (``use_alpha=False``)."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, bias=True, dilation=1, groups_num=8, num_W=8):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.padding, self.dilation = cin, cout, k, stride, padding, dilation
        self.groups_num, self.num_W = groups_num, num_W
        self.weight = nn.Parameter(torch.empty(cout * cin * k * k, num_W))
        self.bias = nn.Parameter(torch.empty(cout)) if bias else None
        self.routing_fc = nn.Linear(cin, groups_num * num_W)

    def forward(self, x, mask):
        B, _, H, W = x.shape
        Ho = (H + 2 * self.padding - self.dilation * (self.k - 1) - 1) // self.stride + 1
        Wo = (W + 2 * self.padding - self.dilation * (self.k - 1) - 1) // self.stride + 1
        se = 2.0 * torch.sigmoid(self.routing_fc(x.reshape(B, self.cin, -1).mean(-1))) / self.num_W
        weight = F.linear(se.reshape(-1, self.num_W), self.weight).reshape(B, self.groups_num, self.cout, -1)
        cols = F.unfold(x, self.k, self.dilation, self.padding, self.stride).view(B, -1, Ho, Wo)
        if mask.shape[-2:] != (Ho, Wo):
            mask = F.interpolate(mask.to(x.dtype).unsqueeze(1), (Ho, Wo)).squeeze(1).long()
        per_pixel = weight[torch.arange(B)[:, None, None], mask]  # (B, Ho, Wo, cout, cin·k·k)
        y = torch.einsum("bhwoc,bchw->bohw", per_pixel, cols)
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y


@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (3, 2, 1)])
def test_megvii_drconv_in_a_shufflenet_block(k, stride, padding, device):
    """megvii's make_block: a 1x1 mask net (no bias) gives softmax region scores, their argmax the mask.

    The argmax passes no gradient to the mask net; ours passes the straight-through softmax gradient
    to the guide, so the guide is detached here to compare the gradient through the conv and routing."""
    masknet = _randomised(nn.Conv2d(4, 3, 1, bias=False)).to(device)
    megvii = _randomised(MegviiDRConv(4, 6, k, stride, padding, groups_num=3, num_W=2)).to(device)
    def convert(m):
        return peers.drconv2d_from_megvii(m, 4, 6, k, stride, padding, groups_num=3, num_W=2)

    ours = convert(megvii)

    def theirs(x):
        return megvii(x, torch.argmax(F.softmax(masknet(x), dim=1), dim=1))

    _compare(theirs, lambda x: ours(x, masknet(x).detach()), torch.randn(2, 4, 6, 6, dtype=f64, device=device),
             f"megvii DRConv k={k}", megvii, ours, convert)
