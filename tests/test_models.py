from __future__ import annotations

import pytest
import torch

from vidtune.config import ConfigError, ModelConfig
from vidtune.models import build_model


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="cnn3d", widths=[8, 16], pool="max"),
        ModelConfig(arch="timm", backbone="resnet18", temporal_head="avg"),
        ModelConfig(arch="timm", backbone="test_efficientnet", temporal_head="attention"),
        ModelConfig(arch="torchvision", backbone="r2plus1d_18"),
    ],
    ids=lambda c: f"{c.arch}-{c.backbone or 'cnn3d'}-{c.temporal_head}",
)
def test_models_map_clips_to_logits(cfg):
    model = build_model(cfg, num_classes=5, in_channels=3, num_frames=4)
    x = torch.randn(2, 3, 4, 32, 32)  # (B, C, T, H, W)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()


def test_attention_head_sees_frame_order():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="timm", backbone="test_efficientnet", temporal_head="attention", dropout=0.0), 3, num_frames=4).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    reversed_x = x.flip(2)
    assert not torch.allclose(model(x), model(reversed_x), atol=1e-5)
    avg = build_model(ModelConfig(arch="timm", backbone="test_efficientnet", temporal_head="avg", dropout=0.0), 3).eval()
    torch.testing.assert_close(avg(x), avg(reversed_x), atol=1e-5, rtol=1e-4)


def test_single_channel_input():
    model = build_model(ModelConfig(arch="timm", backbone="test_efficientnet"), 4, in_channels=1, num_frames=2)
    assert model(torch.randn(1, 1, 2, 32, 32)).shape == (1, 4)


def test_pretrained_path_loads_local_weights(tmp_path):
    import timm

    donor = timm.create_model("test_efficientnet", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(donor.state_dict(), path)
    model = build_model(ModelConfig(arch="timm", backbone="test_efficientnet", pretrained_path=str(path)), 3)
    for k, v in donor.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)

    donor3d = build_model(ModelConfig(arch="cnn3d", widths=[8, 16]), 7)
    torch.save(donor3d.state_dict(), tmp_path / "c3d.pt")
    other = build_model(ModelConfig(arch="cnn3d", widths=[8, 16], pretrained_path=str(tmp_path / "c3d.pt")), 3)
    torch.testing.assert_close(other.features[0].weight, donor3d.features[0].weight)
    assert other.fc.out_features == 3  # the classifier of another class count is left as built


def test_model_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.backbone: unknown timm model 'no_such_net'"):
        build_model(ModelConfig(arch="timm", backbone="no_such_net"), 3)
    with pytest.raises(ConfigError, match="model.backbone: unknown torchvision video model 'r9d'"):
        build_model(ModelConfig(arch="torchvision", backbone="r9d"), 3)
    with pytest.raises(FileNotFoundError, match="nope.pt: no such weights file"):
        build_model(ModelConfig(arch="cnn3d", pretrained_path=str(tmp_path / "nope.pt")), 3)
    with pytest.raises(ConfigError, match="arch: unknown 'rnn'"):
        ModelConfig(arch="rnn")


def test_grid_pooling_keeps_where_an_object_is():
    # The 2x2 grid refines global pooling (its cells average to the global features) and keeps
    # which side of the frame a bright square is on — what a per-frame model needs to see a
    # motion's direction, and what global pooling throws away.
    from vidtune.models import build_frame_backbone

    torch.manual_seed(0)
    background = torch.rand(1, 3, 64, 64) * 0.2
    left, right = background.clone(), background.clone()
    left[..., 24:40, 4:20] = 1.0
    right[..., 24:40, 44:60] = 1.0
    flat = build_frame_backbone("resnet18", 3).eval()
    grid = build_frame_backbone("resnet18", 3, grid=2).eval()
    grid.model.load_state_dict(flat.state_dict())
    with torch.no_grad():
        cells = {name: grid(x).reshape(-1, 2, 2) for name, x in (("left", left), ("right", right))}  # (D, row, col)
        assert grid.num_features == 4 * flat.num_features
        torch.testing.assert_close(cells["left"].mean(dim=(1, 2)), flat(left)[0], atol=1e-5, rtol=1e-4)
    # Activation in the left column minus the right column: higher when the square is on the left.
    contrast = {name: float(c[:, :, 0].sum() - c[:, :, 1].sum()) for name, c in cells.items()}
    assert contrast["left"] > contrast["right"] + 0.2 * abs(contrast["right"]) + 1.0


def test_max_pooled_frame_backbone_and_bad_grid():
    model = build_model(ModelConfig(arch="timm", backbone="test_efficientnet", pool="max", spatial_grid=2), 3, num_frames=2)
    assert model(torch.randn(1, 3, 2, 32, 32)).shape == (1, 3)
    with pytest.raises(ConfigError, match="spatial_grid"):
        ModelConfig(arch="timm", backbone="resnet18", spatial_grid=9)
