"""Models: shapes, decode_indices == decode(quantized), straight-through gradients, batch independence,
config builders, PatchGAN discriminator and LPIPS loaded from one local file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bavq.config import Config, ConfigError
from bavq.models import (
    LPIPS,
    VQGAN,
    VQVAE,
    NLayerDiscriminator,
    build_discriminator,
    build_model,
    convert_lpips_weights,
)
from bavq.models.blocks import AttnBlock, group_norm


@dataclasses.dataclass
class FakeOutput:
    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    metrics: dict


class FakeQuantizer(nn.Module):
    """Nearest neighbour on a fixed random codebook, straight-through; follows the bavq contract."""

    def __init__(self, num_codes: int = 16, code_dim: int = 8, seed: int = 0):
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("codebook", torch.randn(num_codes, code_dim, generator=gen) * 0.1)

    def forward(self, z):
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        indices = torch.cdist(flat.detach(), self.codebook).argmin(dim=1).view(b, h, w)
        codes = self.decode_indices(indices)
        loss = 0.25 * (z - codes.detach()).pow(2).mean()
        return FakeOutput(z + (codes - z).detach(), indices, loss, {})

    def decode_indices(self, indices):
        return self.codebook[indices].permute(0, 3, 1, 2)  # (B, D, h, w)


def tiny_vqvae(code_dim=8, **kw):
    torch.manual_seed(0)
    quantizer = FakeQuantizer(code_dim=code_dim)
    return VQVAE(quantizer, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, **kw)


def tiny_vqgan(channel_mult, base_channels=16, resolution=32):
    torch.manual_seed(0)
    return VQGAN(FakeQuantizer(code_dim=4), base_channels=base_channels, channel_mult=channel_mult,
                 num_res_blocks=1, attn_resolutions=(16,), resolution=resolution)


VQGAN_CASES = [((1, 1, 2, 2), 8), ((1, 1, 2, 2, 4), 16)]  # f8 and f16


def assert_last_layer_is_output_weight(model):
    assert model.last_layer() is model.decoder.conv_out.weight


@pytest.mark.parametrize("name,make", [("vqvae", lambda: tiny_vqvae())])
def test_last_layer_grad_equals_autograd_and_fires_no_parameter_hook(name, make):
    model = make()
    recon, _ = model(torch.randn(2, 3, 32, 32))
    leaf = recon.detach().requires_grad_(True)
    fired = []
    model.decoder.conv_out.weight.register_hook(lambda g: fired.append(1))
    grad = model.last_layer_grad(leaf)((leaf - 0.3).square().mean())
    assert not fired  # DDP / ZeRO-2 hooks live on the parameter: the adaptive weight must not fire them
    expected = torch.autograd.grad((recon - 0.3).square().mean(), model.last_layer())[0]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_vqvae_shapes_32_to_8():
    model = tiny_vqvae()
    x = torch.randn(2, 3, 32, 32)
    z = model.encode(x)
    assert z.shape == (2, 8, 8, 8)  # exactly code_dim channels, 4x down-sampling
    recon, out = model(x)
    assert recon.shape == x.shape and out.indices.shape == (2, 8, 8)
    assert model.downsample_factor == 4 and model.code_dim == 8 and model.num_codes == 16
    assert_last_layer_is_output_weight(model)


def test_vqvae_downsampling_rule_one_stage_per_halving():
    model = VQVAE(FakeQuantizer(code_dim=8), base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=0)
    assert model.encode(torch.randn(1, 3, 32, 32)).shape == (1, 8, 4, 4)
    assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("channel_mult,factor", VQGAN_CASES)
def test_vqgan_shapes(channel_mult, factor):
    model = tiny_vqgan(channel_mult)
    x = torch.randn(2, 3, 32, 32)
    side = 32 // factor
    assert model.downsample_factor == factor
    assert model.encode(x).shape == (2, 4, side, side)
    recon, out = model(x)
    assert recon.shape == x.shape and out.indices.shape == (2, side, side)
    assert_last_layer_is_output_weight(model)


def test_vqgan_attention_at_attn_resolutions_and_lowest():
    # resolution 32, f8: stage sides 32, 16, 8, 4 -> attention at 16 (configured) and 4 (lowest).
    model = tiny_vqgan((1, 1, 2, 2))
    per_stage = [sum(isinstance(m, AttnBlock) for m in stage) for stage in model.encoder.down]
    assert per_stage == [0, 1, 0, 1]
    decoder_stages = [sum(isinstance(m, AttnBlock) for m in stage) for stage in model.decoder.up]
    assert decoder_stages == [2, 0, 2, 0]  # lowest first; the decoder has num_res_blocks + 1 blocks
    assert isinstance(model.encoder.mid[1], AttnBlock) and isinstance(model.decoder.mid[1], AttnBlock)


def test_group_norm_adapts_to_narrow_widths():
    assert [group_norm(c).num_groups for c in (16, 48, 256)] == [16, 16, 32]
    tiny_vqgan((1, 2), base_channels=32)(torch.randn(1, 3, 32, 32))  # 32 and 64 channels build and run


def test_vqgan_rejects_resolution_not_multiple_of_factor():
    with pytest.raises(ValueError, match="multiple of the down-sampling factor 8"):
        tiny_vqgan((1, 1, 2, 2), resolution=36)


ALL_MODELS = [("vqvae", tiny_vqvae), ("vqgan_f8", lambda: tiny_vqgan((1, 1, 2, 2))),
              ("vqgan_f16", lambda: tiny_vqgan((1, 1, 2, 2, 4)))]


@pytest.mark.parametrize("name,make", ALL_MODELS)
def test_decode_indices_equals_decode_quantized(name, make):
    model = make().eval()
    with torch.no_grad():
        out = model.quantize(model.encode(torch.randn(2, 3, 32, 32)))
        # z + (e - z).detach() equals e only up to float rounding, which the decoder can amplify a little.
        torch.testing.assert_close(model.decode_indices(out.indices), model.decode(out.quantized),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,make", ALL_MODELS)
def test_gradients_reach_encoder_through_straight_through(name, make):
    model = make()
    recon, out = model(torch.randn(2, 3, 32, 32))
    (recon.pow(2).mean() + out.loss).backward()
    first = model.encoder.conv_in if name != "vqvae" else model.encoder.stages[0][0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert model.last_layer().grad is not None


@pytest.mark.parametrize("name,make", ALL_MODELS)
def test_no_batchnorm_and_batch_independent(name, make):
    model = make().eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full, out_full = model(x)
        half, out_half = model(x[:2])
    torch.testing.assert_close(full[:2], half, rtol=1e-5, atol=1e-6)
    assert torch.equal(out_full.indices[:2], out_half.indices)


def small_config(arch: str, **model_fields) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, arch=arch, base_channels=16, num_res_blocks=1, **model_fields)
    cfg.quantizer = dataclasses.replace(cfg.quantizer, code_dim=8)
    return cfg


def build_from(cfg: Config, quantizer: nn.Module) -> nn.Module:
    return build_model(cfg.model, cfg.quantizer, quantizer, image_size=cfg.data.image_size)


def test_build_model_from_config():
    vqvae = build_from(small_config("vqvae"), FakeQuantizer(code_dim=8))
    assert isinstance(vqvae, VQVAE) and vqvae.encode(torch.randn(1, 3, 32, 32)).shape == (1, 8, 8, 8)
    cfg = small_config("vqgan", channel_mult=[1, 1, 2, 2], attn_resolutions=[8])
    vqgan = build_from(cfg, FakeQuantizer(code_dim=8))
    assert isinstance(vqgan, VQGAN) and vqgan.encode(torch.randn(1, 3, 32, 32)).shape == (1, 8, 4, 4)
    assert [sum(isinstance(m, AttnBlock) for m in s) for s in vqgan.encoder.down] == [0, 0, 1, 1]


def test_build_model_errors_name_the_key():
    with pytest.raises(ConfigError, match="quantizer.code_dim"):
        build_from(small_config("vqvae"), FakeQuantizer(code_dim=4))
    cfg = small_config("vqvae", channel_mult=[1, 2, 2, 2, 2, 2])  # f = 64 > 32
    with pytest.raises(ConfigError, match="data.image_size"):
        build_from(cfg, FakeQuantizer(code_dim=8))


def test_build_discriminator_follows_disc_weight():
    cfg = Config()
    assert build_discriminator(cfg.model, cfg.loss) is None
    cfg.loss = dataclasses.replace(cfg.loss, disc_weight=0.5)
    cfg.model = dataclasses.replace(cfg.model, disc_channels=8, disc_layers=2)
    disc = build_discriminator(cfg.model, cfg.loss)
    assert isinstance(disc, NLayerDiscriminator) and disc(torch.randn(1, 3, 32, 32)).shape == (1, 1, 6, 6)


@pytest.mark.parametrize("side,n_layers,out_side", [(32, 3, 2), (64, 3, 6), (256, 3, 30), (32, 1, 14)])
def test_discriminator_output_shape(side, n_layers, out_side):
    disc = NLayerDiscriminator(3, channels=8, n_layers=n_layers)
    assert disc(torch.randn(2, 3, side, side)).shape == (2, 1, out_side, out_side)


def test_discriminator_has_no_batchnorm_and_dcgan_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, channels=64, n_layers=3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules())
    big = disc.main[-1].weight  # 512 * 16 weights
    assert abs(big.std().item() - 0.02) < 0.002 and abs(big.mean().item()) < 0.002
    assert not any(isinstance(m, nn.GroupNorm) for m in NLayerDiscriminator(3, 8, 2, norm="none").modules())


# ---------------------------------------------------------------- LPIPS


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = LPIPS().state_dict()
    for j in range(5):  # real LPIPS heads are non-negative, which makes the distance >= 0
        state[f"lin{j}.weight"] = torch.rand_like(state[f"lin{j}.weight"])
    return state


def test_lpips_file_round_trip(lpips_file):
    lpips = LPIPS.from_file(lpips_file)
    expected = random_lpips_state()
    for key, value in lpips.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # a parent's .train() does not switch the frozen network
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    dist = lpips(x, y)
    assert dist.shape == (2,) and (dist > 0).all()
    assert (lpips(x[:, :1], y[:, :1]) > 0).all()  # grayscale input


def test_lpips_gradient_reaches_input_only(lpips_file):
    lpips = LPIPS.from_file(lpips_file)
    recon = torch.zeros(1, 3, 32, 32, requires_grad=True)
    lpips(torch.rand(1, 3, 32, 32), recon).sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_missing_file_message(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        LPIPS.from_file(missing)
    message = str(info.value)
    assert "\n" not in message and "loss.lpips_weights" in message and str(missing) in message
    assert "features" in message and "lin0" in message


def test_lpips_wrong_file_is_one_line_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not an LPIPS-VGG16 weights file"):
        LPIPS.from_file(path)


def test_convert_lpips_weights_merges_torchvision_and_lpips_files(tmp_path, lpips_file):
    state = random_lpips_state()
    vgg = {k: v for k, v in state.items() if k.startswith("features.")}
    vgg["classifier.6.bias"] = torch.zeros(1000)  # torchvision's file also holds the classifier
    lin = {f"lin{j}.model.1.weight": state[f"lin{j}.weight"] for j in range(5)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    out = convert_lpips_weights(tmp_path / "vgg16.pth", tmp_path / "vgg.pth", tmp_path / "merged.pt")
    merged, reference = LPIPS.from_file(out), LPIPS.from_file(lpips_file)
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(merged(x, y), reference(x, y), rtol=0, atol=0)
    torch.save({"lin0.weight": state["lin0.weight"]}, tmp_path / "bad_lin.pth")
    with pytest.raises(ValueError, match="lin1"):
        convert_lpips_weights(tmp_path / "vgg16.pth", tmp_path / "bad_lin.pth", tmp_path / "x.pt")
