"""The docs check: the README's quick starts (and the marked examples in docs/) run as written, and
every relative link in README.md, CHANGELOG.md and docs/*.md points to a file (and heading) that exists.

A runnable block is a fenced block right after an HTML comment ``<!-- quickstart: NAME -->`` (README)
or ``<!-- docs-check: NAME -->`` (docs/). They run against the sample data that
``mae-transfer data sample`` writes into a temporary folder, at tiny sizes:

- shell blocks: each ``mae-transfer`` command runs as a real subprocess, with the data placeholder
  ``/data/imagenet`` pointed at the sample class folders and ``TINY_FLAGS`` appended (argparse keeps
  the last value of a repeated flag, so the appended flags win);
- Python blocks are config files (a Detectron2 LazyConfig, an MMSeg config): the block is written
  under the name its first comment line gives, loaded the way ``mae-transfer detect train`` /
  ``segment train`` load it, with the ``TINY_*`` overrides, and the model is built, loads the
  encoder the pretrain quick start wrote, and runs one forward pass on a tiny image.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED_BLOCK = re.compile(r"<!-- (quickstart|docs-check): ([\w-]+) -->\s*\n```(\w+)\n(.*?)\n```", re.S)
QUICKSTARTS = {"pretrain", "finetune", "detectron2", "mmseg"}

DATA = "/data/imagenet"  # the quick starts' data placeholder -> the sample data's class folders
ENCODER = "runs/mae_vit_b/encoder.safetensors"  # what the pretrain quick start writes
_TRAIN_TINY = ["--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "32",
               "--accum-iter", "1", "--precision", "fp32", "--num-workers", "0", "--no-tensorboard",
               "--no-progress"]
TINY_FLAGS = {
    # ViT-Tiny width, 4 blocks, 32 px (2 x 2 patches), a 1 x 32 decoder, one epoch
    "pretrain": ["--model", "mae_vit_tiny_patch16", "--model-kwargs", '{"depth": 4}', "--decoder-depth", "1",
                 "--decoder-dim", "32", "--decoder-heads", "2", *_TRAIN_TINY],
    "finetune": _TRAIN_TINY,
    "linprobe": _TRAIN_TINY,
    "finetune --eval": ["--img-size", "32", "--batch-size", "32", "--num-workers", "0"],
}
TINY_VIT = dict(embed_dim=192, depth=4, num_heads=3)  # the tiny pretrained encoder's size
TINY_D2 = [  # LazyConfig overrides: the tiny encoder at 64 px, 2 x 2 windows, the last block global
    "model.backbone.net.name=vit_tiny_patch16", "model.backbone.net.depth=4", "model.backbone.net.img_size=64",
    "model.backbone.net.window_size=2", "model.backbone.net.global_blocks=[3]", "model.backbone.square_pad=64",
]
TINY_SEG = {  # MMSeg --cfg-options: the tiny encoder at 64 px, narrow heads
    "model.backbone.arch": dict(_delete_=True, **TINY_VIT), "model.backbone.img_size": 64,
    "model.backbone.out_indices": [0, 1, 2, 3], "model.neck.embed_dim": 192,
    "model.decode_head.in_channels": [192] * 4, "model.decode_head.channels": 16,
    "model.auxiliary_head.in_channels": 192, "model.auxiliary_head.channels": 16,
    "model.data_preprocessor.size": (64, 64),
}


# --------------------------------------------------------------------------- extraction
def marked_blocks(path: Path) -> dict[str, tuple[str, str]]:
    """``{name: (language, code)}`` of the marked fenced blocks of a Markdown file."""
    found: dict[str, tuple[str, str]] = {}
    for _kind, name, lang, code in MARKED_BLOCK.findall(path.read_text()):
        assert name not in found, f"{path.name}: two blocks marked {name!r}"
        found[name] = (lang, code)
    return found


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    return [argv for line in code.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run one ``mae-transfer`` command of a block, at tiny size, in ``cwd``."""
    assert argv[0] == "mae-transfer", f"a quick-start command that is not mae-transfer: {shlex.join(argv)}"
    sample = str(cwd / "sample" / "classification")
    args = [a.replace(DATA, sample) if a.startswith(DATA) else a for a in argv[1:]]
    key = "finetune --eval" if args[:1] == ["finetune"] and "--eval" in args else args[0]
    assert key in TINY_FLAGS, f"no tiny flags for the quick-start command {key!r}: add them to TINY_FLAGS"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mae_transfer", *args, *TINY_FLAGS[key]], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def write_config_block(code: str, cwd: Path) -> Path:
    """Write a Python block under the file name of its first line (``# my_config.py``)."""
    first = code.splitlines()[0]
    assert re.fullmatch(r"# [\w.-]+\.py", first), f"a config block starts with '# NAME.py', not {first!r}"
    path = cwd / first[2:]
    path.write_text(code + "\n")
    return path


@pytest.fixture(scope="module")
def quickstarts() -> dict[str, tuple[str, str]]:
    blocks = marked_blocks(README)
    assert set(blocks) == QUICKSTARTS, f"README quick starts: {sorted(blocks)}, expected {sorted(QUICKSTARTS)}"
    return blocks


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, quickstarts) -> Path:
    """A folder with the sample data (written by the toolkit's own command) and the pretrain quick
    start's run in it, at tiny size."""
    cwd = tmp_path_factory.mktemp("quickstart")
    proc = subprocess.run([sys.executable, "-m", "mae_transfer", "data", "sample", "sample"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lang, code = quickstarts["pretrain"]
    assert lang == "bash"
    for argv in shell_commands(code):
        run_cli(argv, cwd)
    return cwd


def _encoder(cwd: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(cwd / ENCODER)


# --------------------------------------------------------------------------- the quick starts
def test_pretrain_quickstart_writes_the_encoder(workspace):
    run = workspace / "runs" / "mae_vit_b"
    assert (run / "checkpoint.pth").is_file() and (run / "log.jsonl").read_text().strip()
    enc = _encoder(workspace)
    assert enc["blocks.0.attn.qkv.weight"].shape == (3 * 192, 192) and "blocks.3.norm1.weight" in enc


def test_finetune_quickstart(workspace, quickstarts):
    lang, code = quickstarts["finetune"]
    assert lang == "bash"
    outputs = [run_cli(argv, workspace).stdout for argv in shell_commands(code)]
    for run in ("ft_vit_b", "lin_vit_b"):
        assert (workspace / "runs" / run / "model.safetensors").is_file()
        assert "best" in (workspace / "runs" / run / "metrics.json").read_text()
    result = json.loads(outputs[-1][outputs[-1].index("{"):])  # finetune --eval prints its eval as JSON
    assert result["images"] == 200  # the sample data's validation images (50 per class)
    assert result["top1"] * 200 / 100 == pytest.approx(round(result["top1"] * 2))  # a count of those images, in %


def test_detectron2_quickstart_builds_loads_and_runs(workspace, quickstarts, monkeypatch):
    from detectron2.config import instantiate

    import detection

    lang, code = quickstarts["detectron2"]
    assert lang == "python"
    monkeypatch.chdir(workspace)  # the block names the encoder relative to where it runs
    cfg = detection.load_config(write_config_block(code, workspace), TINY_D2)  # what `detect train` does
    model = instantiate(cfg.model).eval()
    state = model.state_dict()
    enc = _encoder(workspace)
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight"):
        assert torch.equal(state[f"backbone.net.{key}"], enc[key]), f"{key} was not loaded from {ENCODER}"
    with torch.no_grad():
        (out,) = model([{"image": torch.zeros(3, 64, 48)}])
    assert out["instances"].image_size == (64, 48)
    cfg.optimizer.params.model = model  # as the trainer does
    optimizer = instantiate(cfg.optimizer)
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs[-1] == pytest.approx(1e-4) and lrs[0] < lrs[-1]  # layer-wise decay


def test_mmseg_quickstart_builds_loads_and_runs(workspace, quickstarts, monkeypatch):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import segmentation

    lang, code = quickstarts["mmseg"]
    assert lang == "python"
    monkeypatch.chdir(workspace)
    cfg = segmentation.load_config(write_config_block(code, workspace), TINY_SEG)  # as `segment train`
    init_default_scope(cfg.get("default_scope", "mmseg"))
    model = MODELS.build(cfg.model)
    model.init_weights()  # the Runner's step that loads `pretrained`
    assert isinstance(model.backbone, segmentation.MAEViT)
    enc = _encoder(workspace)
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight"):
        assert torch.equal(model.backbone.vit.state_dict()[key], enc[key]), f"{key} was not loaded from {ENCODER}"
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 64, 64), mode="tensor")
    assert logits.shape == (1, 150, 16, 16)  # ADE20K's 150 classes, from MMSeg's base config
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lrs = {n: g["lr"] for g in wrapper.optimizer.param_groups for n in g["param_names"]}
    assert lrs["backbone.vit.patch_embed.proj.weight"] < lrs["backbone.vit.blocks.3.attn.qkv.weight"]


def test_detection_doc_starts_a_config_from_a_shipped_recipe(workspace, monkeypatch):
    """docs/detection.md: a LazyConfig of one's own that pulls in a shipped recipe."""
    from detectron2.config import LazyConfig, instantiate

    import detection

    lang, code = marked_blocks(ROOT / "docs" / "detection.md")["shipped-recipe"]
    assert lang == "python"
    monkeypatch.chdir(workspace)
    path = write_config_block(code, workspace)
    cfg = detection.load_config(path, TINY_D2)
    assert cfg.model.roi_heads.num_classes == 4 and cfg.train.max_iter == 1000
    assert cfg.optimizer.params.layer_decay == 0.7  # from the recipe
    model = instantiate(cfg.model).eval()
    enc = _encoder(workspace)
    assert torch.equal(model.state_dict()["backbone.net.blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        (out,) = model([{"image": torch.zeros(3, 64, 64)}])
    assert out["instances"].image_size == (64, 64)
    LazyConfig.save(cfg, str(workspace / "saved.yaml"))  # `detect train` saves the config it ran
    assert LazyConfig.load(str(workspace / "saved.yaml")).model.roi_heads.num_classes == 4


# --------------------------------------------------------------------------- links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def heading_slugs(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    slugs = set()
    in_code = False
    for line in path.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and (m := re.match(r"#{1,6} (.*)", line)):
            slugs.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return slugs


def broken_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file, or heading anchor, does not exist."""
    bad = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{path.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_slugs(dest):
            bad.append(f"{path.name}: {target} (no such heading)")
    return bad


def test_relative_links_point_to_existing_files_and_headings():
    assert all(p.is_file() for p in DOC_FILES)
    assert [b for p in DOC_FILES for b in broken_links(p)] == []


def test_the_link_check_catches_a_missing_file_and_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Top part\n[ok](a.md#top-part) [web](https://x.org/y.md)\n"
                                   "[gone](gone.md) [anchor](a.md#nowhere) [self](#top-part)\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: gone.md (no such file)", "a.md: a.md#nowhere (no such heading)"]


# --------------------------------------------------------------------------- names
PACKAGES = ("mae_backbone", "training", "pretrain", "classification", "detection", "segmentation", "mae_transfer")
REPO_PATH = re.compile(r"`((?:%s|benchmarks|tools|tests|docs)/[^`\s]*)`" % "|".join(PACKAGES))
DOTTED = re.compile(r"`((?:%s)(?:\.\w+)+)`" % "|".join(PACKAGES))
FROM_IMPORT = re.compile(r"^from ((?:%s)(?:\.\w+)*) import ([\w, ]+)$" % "|".join(PACKAGES), re.M)


def resolve(dotted: str) -> bool:
    """Whether ``package.module.attr...`` names something importable."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_named_files_and_python_names_exist():
    """Repository paths in backticks, dotted names and ``from X import Y`` lines of the docs exist,
    so a file or function that moves cannot leave the docs behind."""
    missing = []
    for doc in DOC_FILES:
        text = doc.read_text()
        for path in REPO_PATH.findall(text):
            if not re.search(r"[{<*]|\.\.\.", path) and not (ROOT / path.split("::")[0]).exists():
                missing.append(f"{doc.name}: {path}")
        names = DOTTED.findall(text) + [f"{mod}.{n.strip()}" for mod, names in FROM_IMPORT.findall(text)
                                        for n in names.split(",")]
        missing += [f"{doc.name}: {name}" for name in sorted(set(names)) if not resolve(name)]
    assert missing == []


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200
