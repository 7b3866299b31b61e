"""bavq.Tokenizer: every source of the same weights gives the same indices; decode(encode) is the
reconstruction; bad inputs are one-line errors; bavq-export writes a folder from_pretrained reads."""

from __future__ import annotations

import pytest
import torch
from _builders import eval_loader

import bavq
from bavq.config import ConfigError
from bavq.export import main as export_main
from bavq.tokenizer import Tokenizer


def eval_images(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.cat([x for x, _ in eval_loader(tokenizer.config, 0, 1)])


def test_run_checkpoint_and_exported_folders_give_the_same_indices(tiny_run, tmp_path):
    run = Tokenizer.from_pretrained(tiny_run)
    assert bavq.Tokenizer is Tokenizer
    ckpt = Tokenizer.from_pretrained(tiny_run / "checkpoints" / "step_00000002")  # DDP layout, MANIFEST checked
    saved = Tokenizer.from_pretrained(run.save_pretrained(tmp_path / "saved"))
    assert export_main([str(tiny_run), "--out", str(tmp_path / "cli")]) == 0
    exported = Tokenizer.from_pretrained(tmp_path / "cli")
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["config.yaml", "model.safetensors",
                                                                   "tokenizer.json"]
    x = eval_images(run)
    indices = run.encode(x)
    assert indices.dtype == torch.int64 and indices.shape == (x.shape[0], *run.grid_shape())
    assert len(indices.unique()) > 1  # a trained codebook: a check on one constant code could not fail
    for other in (ckpt, saved, exported):
        torch.testing.assert_close(other.encode(x), indices, rtol=0, atol=0)
        assert other.num_codes == 32 and other.downsample == 4 and other.config == run.config
    for name, tensor in run.model.state_dict().items():  # save_pretrained is lossless (fp32)
        torch.testing.assert_close(saved.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_decode_of_encode_is_the_reconstruction_and_autocast_is_safe(tiny_run):
    tok = Tokenizer.from_pretrained(tiny_run)
    x = eval_images(tok)[:6]
    recon = tok.reconstruct(x)
    assert recon.dtype == torch.float32 and recon.shape == x.shape and recon.abs().max() <= 1
    torch.testing.assert_close(tok.decode_indices(tok.encode(x)), recon, rtol=0, atol=0)
    _, q = tok.model(x)  # the training forward's indices in eval mode are the same tokens
    torch.testing.assert_close(q.indices, tok.encode(x), rtol=0, atol=0)
    before = tok.model.quantizer.codebook.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = tok.encode(x)
        images = tok.decode_indices(indices)
    assert indices.dtype == torch.int64 and images.dtype == torch.float32
    assert tok.model.quantizer.codebook.dtype == torch.float32
    torch.testing.assert_close(tok.model.quantizer.codebook, before, rtol=0, atol=0)  # eval never updates it
    assert tok.grid_shape(32) == (8, 8) and tok.grid_shape((16, 32)) == (4, 8)


@pytest.mark.parametrize("make, needle", [
    (lambda x: x * 255, "expected [-1, 1]"),
    (lambda x: ((x + 1) * 127).to(torch.uint8), "floating point"),
    (lambda x: x[:, :1], "1 channels"),
    (lambda x: x[..., :14], "16x14 is not a multiple"),
    (lambda x: x[0], "(B, C, H, W)"),
])
def test_bad_images_are_one_line_errors(tiny_run, make, needle):
    tok = Tokenizer.from_pretrained(tiny_run)
    with pytest.raises(ValueError) as info:
        tok.encode(make(torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_indices_and_paths_are_one_line_errors(tiny_run, tmp_path, capsys):
    tok = Tokenizer.from_pretrained(tiny_run)
    for bad, needle in ((torch.full((1, 4, 4), 32), "32 codes"), (torch.zeros(1, 4, 4), "integer"),
                        (torch.zeros(4, 4, dtype=torch.long), "(B, h, w)")):
        with pytest.raises(ValueError) as info:
            tok.decode_indices(bad)
        assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="neither a run folder"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an exported tokenizer folder"):
        tok.save_pretrained(tmp_path / "busy")
    assert export_main([str(tiny_run), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is a folder" in err, err
