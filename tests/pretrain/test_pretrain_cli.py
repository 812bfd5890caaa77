"""``mae-transfer pretrain`` options and config files; ``mae-transfer visualize``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mae_transfer.cli import build_parser, main
from training.data import IMAGENET_MEAN
from pretrain import PretrainConfig, config_from_args, make_config
from pretrain.masking import mask_noise
from pretrain.train import train
from pretrain.visualize import NORM_PIX_NOTE, load_images, load_mae, reconstruct, to_display


def parse(*argv):
    return config_from_args(build_parser().parse_args(["pretrain", *argv]))


def test_defaults_are_the_papers_recipe():
    cfg = parse("--data", "d", "--output", "o")
    assert (cfg.model, cfg.mask_ratio, cfg.masking, cfg.target, cfg.aug) == (
        "mae_vit_base_patch16", 0.75, "random", "norm_pixel", "crop_rand")
    assert (cfg.decoder_depth, cfg.decoder_dim, cfg.decoder_heads, cfg.encoder_mask_tokens) == (8, 512, 16, False)
    assert (cfg.blr, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs, cfg.lr) == (1.5e-4, 0.05, 40, 800, None)


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: imgs\noutput: out\nmask-ratio: 0.5\ndecoder_depth: 2\nencoder_mask_tokens: true\n")
    cfg = parse("--config", str(yaml_file), "--decoder-depth", "4", "--no-encoder-mask-tokens")
    assert (cfg.mask_ratio, cfg.decoder_depth, cfg.encoder_mask_tokens, cfg.epochs) == (0.5, 4, False, 800)
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"data": "imgs", "output": "out", "model_kwargs": {"depth": 3}}))
    assert parse("--config", str(json_file)).model_kwargs == {"depth": 3}
    assert parse("--config", str(json_file), "--model-kwargs", '{"depth": 5}').model_kwargs == {"depth": 5}


def test_unknown_config_key_names_it_and_suggests_the_closest(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: imgs\noutput: out\nmask_ration: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown option 'mask_ration'; did you mean 'mask_ratio'\?"):
        make_config(config_file=bad)
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert "mask_ration" in capsys.readouterr().err


@pytest.mark.parametrize("values,message", [
    ({"masking": "blok"}, "did you mean 'block'"),
    ({"mask_ratio": 1.0}, "mask_ratio must be in"),
    ({"decoder_dim": 100, "decoder_heads": 16}, "not divisible"),
    ({"epochs": 2.5}, "expected an integer"),
    ({"tensorboard": "yes"}, "expected true or false"),
    ({"model_kwargs": {"dpeth": 2}}, "did you mean 'depth'"),
    ({"model_kwargs": {"img_size": 64}}, "its own option"),
])
def test_bad_values_are_explained(values, message):
    with pytest.raises(ValueError, match=message):
        make_config({"data": "d", "output": "o", **values})


def test_saved_config_round_trips(tmp_path):
    cfg = make_config({"data": "d", "output": "o", "lr": 0.01, "clip_grad": 3.0})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert make_config(config_file=path) == cfg
    assert isinstance(cfg, PretrainConfig)


@pytest.fixture
def trained_checkpoint(tmp_path, image_folder, tiny_config):
    def run(target):
        return train(tiny_config(image_folder, tmp_path / target, epochs=1, target=target)).checkpoint

    return run


@pytest.mark.parametrize("target", ["pixel", "norm_pixel"])
def test_visualize_command_writes_the_four_panel_figure(tmp_path, image_folder, trained_checkpoint, target, capsys):
    ckpt = trained_checkpoint(target)
    images = sorted(image_folder.rglob("*.png"))[:2]
    out = tmp_path / "fig.png"
    assert main(["visualize", str(ckpt), *map(str, images), "-o", str(out), "--seed", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    fig = Image.open(out)
    assert (NORM_PIX_NOTE in fig.text["Description"]) == (target == "norm_pixel")
    # layout: 4 square panels per row (6 px gaps), a title line + panel titles on top, notes below
    side = (fig.width - 5 * 6) // 4
    assert fig.width == 4 * side + 5 * 6
    header, footer = 42, 8 + (18 if target == "norm_pixel" else 0)
    assert fig.height == header + 2 * (side + 6) + footer
    # the first panel of the second row is that image, as loaded
    original = (to_display(load_images(images[1:], 32))[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    tile = Image.fromarray(original).resize((side, side), Image.NEAREST)
    crop = fig.convert("RGB").crop((6, header + side + 6, 6 + side, header + 2 * side + 6))
    assert np.array_equal(np.asarray(crop), np.asarray(tile))


def test_norm_pixel_reconstruction_is_denormalized_with_true_patch_statistics(image_folder, trained_checkpoint):
    model, _ = load_mae(trained_checkpoint("norm_pixel"))
    imgs = load_images(sorted(image_folder.rglob("*.png"))[:2], 32)
    noise = mask_noise("random", model.grid_size, 0.75, seeds=[1, 2])
    rec = reconstruct(model, imgs, 0.75, noise)
    assert rec.denormalized_by_patch
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.75, noise=noise)
    patches = model.patchify(imgs)
    expected = pred * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
    torch.testing.assert_close(rec.reconstruction, to_display(model.unpatchify(expected)))
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 192)).bool()
    assert torch.equal(rec.pasted[~m], rec.original[~m])  # visible patches pasted as they are
    assert torch.equal(rec.pasted[m], rec.reconstruction[m])
    for c, mean in enumerate(IMAGENET_MEAN):  # removed patches are shown as the mean colour
        torch.testing.assert_close(rec.masked[:, c][m[:, c]], torch.full_like(rec.masked[:, c][m[:, c]], mean))


def test_visualize_refuses_an_encoder_only_file(tmp_path, image_folder, tiny_config, capsys):
    result = train(tiny_config(image_folder, tmp_path / "run", epochs=1))
    image = str(next(image_folder.rglob("*.png")))
    assert main(["visualize", str(result.encoder), image, "-o", str(tmp_path / "x.png")]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_bad_data_folder_is_reported_before_the_resume_checkpoint_is_read(tmp_path, capsys, command):
    """Both trainers check their data first (``Trainer.check_inputs``), as before the shared run
    skeleton: with an empty data folder and a broken checkpoint, the error names the folder."""
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    broken = tmp_path / "checkpoint.pth"
    broken.write_bytes(b"not a checkpoint")
    rc = main([command, "--data", str(empty), "--output", str(tmp_path / "out"), "--resume", str(broken), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and str(empty) in err and "checkpoint.pth" not in err, err


def test_visualize_names_a_truncated_image_and_a_decompression_bomb(tmp_path, image_folder, trained_checkpoint,
                                                                    capsys, monkeypatch):
    """Bad images are one line naming the file (exit 2, no traceback); an earlier figure is kept."""
    ckpt = trained_checkpoint("pixel")
    good = sorted(image_folder.rglob("*.png"))[0]
    out = tmp_path / "fig.png"
    out.write_bytes(b"an earlier figure")
    truncated = tmp_path / "cut.jpg"
    Image.open(good).convert("RGB").save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    for bad, words in [(truncated, "truncated"), (bomb, "decompression bomb")]:
        if bad == bomb:  # 64x64 = 4096 pixels, over twice the limit (the good one has 1440): refused
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
        capsys.readouterr()
        assert main(["visualize", str(ckpt), str(good), str(bad), "-o", str(out)]) == 2
        captured = capsys.readouterr()
        assert f"mae-transfer visualize: error: {bad}: " in captured.err and words in captured.err, captured.err
        assert "Traceback" not in captured.err + captured.out
        assert out.read_bytes() == b"an earlier figure"
