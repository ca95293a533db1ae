import pytest
import torch

from napari_omniseg.model.network import HEAD_SPLIT, NetConfig, OmniSegNet, count_parameters, foreground


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = OmniSegNet().eval()
    # give the controller weights some spread so the heads really differ per tissue
    with torch.no_grad():
        m.controller_weight.normal_(0, 0.05)
    return m


def test_parameter_count_is_scale_aware_omniseg(net):
    # backbone 5,914,216 + controller 24 x (162 x 256) + 162 shared bias (the reference's
    # 6,909,706) + one 162-vector per (tissue, scale) pair, 24 x 162 = 3,888
    assert count_parameters(net) == 6_913_594
    assert sum(HEAD_SPLIT) == 162
    assert net.controller_weight.shape == (6, 4, 162, 256)


def test_shared_backbone_heads_equal_per_tissue_forward(net):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        shared = net.heads(net.features(x), list(range(6)))  # N x 6 x 2 x H x W
        for t in range(6):
            full = net(x, [t, t])
            torch.testing.assert_close(shared[:, t], full, rtol=1e-5, atol=1e-5)
        # the heads really are tissue specific
        assert not torch.allclose(shared[:, 0], shared[:, 5])


def test_scale_changes_head_and_default_scale_is_tissues_own(net):
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        f = net.features(x)
        own = net.heads(f, [5])
        at40 = net.heads(f, [5], scales=[3])
        at5 = net.heads(f, [5], scales=[0])
    torch.testing.assert_close(own, at40)
    assert not torch.allclose(own, at5)


def test_per_sample_heads_in_one_batch(net):
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        mixed = net(x, [0, 3, 5])
        for i, t in enumerate([0, 3, 5]):
            torch.testing.assert_close(mixed[i], net(x[i : i + 1], [t])[0], rtol=1e-5, atol=1e-5)


def test_input_size_must_be_multiple_of_16(net):
    with pytest.raises(ValueError, match="multiples of 16"):
        net.features(torch.rand(1, 3, 40, 40))


def test_foreground_rule():
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # 1 x 2 x 1 x 2
    assert foreground(logits).tolist() == [[[True, False]]]


def test_config_round_trip():
    cfg = NetConfig(n_tissues=7, tissue_scales=(1, 1, 0, 0, 1, 3, 2))
    assert NetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown architecture fields"):
        NetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_wider_heads_are_real_conv_stacks_and_survive_a_checkpoint(tmp_path):
    """head_channels was accepted by the checkpoint checks (1-64) but the head split was
    fixed at 8 channels; a 16-channel model must build, compute each head as a
    16 -> 16 -> 16 -> 2 conv stack and load back from its sidecar."""
    from napari_omniseg.model import load_checkpoint, save_checkpoint
    from napari_omniseg.model.network import head_split
    from napari_omniseg.tissues import TISSUES

    assert head_split(16) == (256, 256, 32, 16, 16, 2)
    torch.manual_seed(0)
    m = OmniSegNet(NetConfig(head_channels=16)).eval()
    assert m.controller_weight.shape == (6, 4, 578, 256)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        fmap, gap = m.features(x)
        assert fmap.shape == (1, 16, 32, 32)
        out = m(x, [2])
        # the same head by hand: the pair's own vector (the image part starts at zero)
        p = m.controller_pair_bias[2, m.cfg.tissue_scales[2]]
        w1, w2, w3, b1, b2, b3 = torch.split(p, head_split(16))
        h = torch.relu(torch.einsum("oc,chw->ohw", w1.reshape(16, 16), fmap[0]) + b1[:, None, None])
        h = torch.relu(torch.einsum("oc,chw->ohw", w2.reshape(16, 16), h) + b2[:, None, None])
        ref = torch.einsum("oc,chw->ohw", w3.reshape(2, 16), h) + b3[:, None, None]
        torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-4)
    path = save_checkpoint(m, tmp_path / "w16.safetensors", TISSUES)
    back = load_checkpoint(path)
    assert back.model.cfg.head_channels == 16
    with torch.inference_mode():
        torch.testing.assert_close(back.model.eval()(x, [2]), out)
