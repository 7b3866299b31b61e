"""train.compile: a compiled encoder/decoder gives the eager loss, gradients and codebook update.

The test uses the "aot_eager" backend (AOTAutograd graphs run by eager kernels): inductor needs a C++
build that took ~3.5 minutes for this tiny model on the shared CPU machine; the GPU path uses inductor.
"""

from __future__ import annotations

import copy

import torch

from bavq.config import load_config
from bavq.models import build_model, compile_autoencoder
from bavq.quantizers import build_quantizer


def test_compiled_encoder_decoder_match_eager():
    cfg = load_config(None, ["train.max_steps=1", "quantizer.name=ba_vq", "quantizer.num_codes=16",
                             "quantizer.code_dim=4", "model.base_channels=8", "model.num_res_blocks=1",
                             "data.image_size=16", "train.compile=true"])
    torch.manual_seed(0)
    eager = build_model(cfg.model, cfg.quantizer, build_quantizer(cfg.quantizer), image_size=cfg.data.image_size)
    compiled = compile_autoencoder(copy.deepcopy(eager), backend="aot_eager")
    assert compiled.encoder._compiled_call_impl is not None and compiled.decoder._compiled_call_impl is not None
    assert compiled.quantizer._compiled_call_impl is None  # codebook math stays eager and fp32
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    losses = []
    for model in (eager, compiled):
        recon, q = model(x)
        loss = (recon - x).abs().mean() + q.loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled.quantizer.codebook, eager.quantizer.codebook, rtol=1e-5, atol=1e-6)
