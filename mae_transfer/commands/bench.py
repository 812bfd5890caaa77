"""``mae-transfer bench``: backbones through identical transfer recipes, several seeds, one table."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    from mae_transfer.bench import (
        BenchPlan,
        _method,
        parse_assignments,
        parse_backbone,
        pretrain_baselines,
        resolve_arch,
        run_bench,
    )
    from mae_transfer.runners import TASKS, DataPaths, Recipe

    def fail(msg: str) -> int:
        print(f"mae-transfer bench: error: {msg}", file=sys.stderr)
        return 2

    from training.errors import check_output_dir

    out = check_output_dir(Path(args.output).absolute(), "--output")
    try:
        tasks = _csv(args.tasks)
        for t in tasks:
            if t not in TASKS:
                return fail(f"unknown task {t!r} in --tasks (known: {', '.join(TASKS)})")
        try:
            seeds = [int(s) for s in _csv(args.seeds)]
        except ValueError:
            return fail(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1,2")
        backbones = [parse_backbone(s) for s in args.backbones]
        decays = parse_assignments(args.layer_decay, "layer-decay", float)
        methods = parse_assignments(args.method, "method", _method)
        pretrain = _csv(args.pretrain) if args.pretrain else []
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc))
    if not backbones and not pretrain:
        return fail("no backbones: give NAME=PATH and/or 'random', or --pretrain METHODS")
    real = {"classification": args.imagenet, "coco": args.coco, "ade": args.ade}
    recipe_name = args.recipe if args.recipe != "auto" else ("paper" if any(real.values()) else "demo")
    if any(real.values()):
        data = DataPaths(**{k: Path(v) if v else None for k, v in real.items()})
    else:
        from mae_transfer.sample_data import write_sample_data

        root = out / "data"
        if not (root / "sample_data.json").is_file():
            print(f"writing the sample data to {root} ...")
            write_sample_data(root, seed=0)
        data = DataPaths.sample(root)
    recipe = Recipe.demo(quick=args.quick) if recipe_name == "demo" else None
    try:
        for task in tasks:
            data.require(task)
        if pretrain:
            if recipe is None:
                return fail("--pretrain runs with the demo recipe (a tiny encoder); at paper scale pretrain each "
                            "baseline with `mae-transfer pretrain --method mae|mocov3|supervised` and pass it as NAME=PATH")
            taken = sorted({b.name for b in backbones} & set(pretrain))
            if taken:
                return fail(f"backbone name(s) {', '.join(taken)} are also --pretrain methods; rename them")
            images = Path(args.data) if args.data else data.classification
            if images is None:
                return fail("--pretrain needs --data DIR (class folders: the supervised baseline uses the labels)")
            backbones += pretrain_baselines(pretrain, images, out, recipe, args.pretrain_epochs)
        names = [b.name for b in backbones]
        for name in list(decays) + list(methods):
            if name not in names:
                return fail(f"--layer-decay/--method name {name!r} is not a backbone (have: {', '.join(names)})")
        backbones = [replace(b, layer_decay=decays.get(b.name, b.layer_decay), method=methods.get(b.name, b.method))
                     for b in backbones]
        default_arch = (recipe or Recipe.demo()).arch
        arch = resolve_arch(backbones, default_arch)
        recipe = replace(recipe, arch=arch) if recipe else Recipe.paper(arch)
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc))
    result = run_bench(BenchPlan(backbones, tasks, seeds, recipe, data), out)
    return 0 if result.finished and not any(c.error for c in result.cells) else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run backbones through identical transfer recipes over several seeds; one table",
        description="Each backbone (NAME=PATH, any checkpoint format mae_backbone reads, or 'random') goes through "
                    "the same transfer recipe for each task and seed; writes bench.md, bench.csv, bench.png. "
                    "Without --imagenet/--coco/--ade it runs the demo recipe on generated sample data.")
    p.add_argument("backbones", nargs="*", metavar="BACKBONE", help="NAME=PATH or 'random'")
    p.add_argument("--tasks", default="finetune,linprobe,partial,segment,detect",
                   help="comma-separated: finetune, linprobe, partial, segment, detect")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (mean and std over them)")
    p.add_argument("--output", default="bench_output", help="folder for the table, the runs and the sample data")
    p.add_argument("--layer-decay", action="append", default=[], metavar="NAME=VALUE",
                   help="a backbone's layer decay (default: the recipe's value for the architecture)")
    p.add_argument("--method", action="append", default=[], metavar="NAME=METHOD",
                   help="how a backbone was pretrained (mae, mocov3, supervised, scratch): picks the published "
                        "numbers shown beside it")
    p.add_argument("--pretrain", default="", metavar="METHODS",
                   help="also pretrain these with the same budget and add them: mae,mocov3,supervised")
    p.add_argument("--data", help="--pretrain: image folder with class subfolders (default: the sample data)")
    p.add_argument("--pretrain-epochs", type=int, default=40, help="--pretrain: epochs for every method")
    p.add_argument("--imagenet", help="ImageNet-style folder with train/ and val/ (classification tasks)")
    p.add_argument("--coco", help="COCO folder: train2017/, val2017/, annotations/instances_{train,val}2017.json")
    p.add_argument("--ade", help="ADE20K folder (ADEChallengeData2016: images/ and annotations/)")
    p.add_argument("--recipe", choices=("auto", "demo", "paper"), default="auto",
                   help="demo: sized for the sample data on a CPU; paper: the published recipes (auto: paper "
                        "when real data is given)")
    p.add_argument("--quick", action="store_true", help="demo recipe: the tiny budgets of `demo --quick`")
    p.set_defaults(func=run)
