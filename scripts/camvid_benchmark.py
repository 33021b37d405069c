"""Paired-seed CamVid benchmark: plain CE vs OHEM modes (vs refinement, when given), resumable.

Every (method, seed) is one `segohem train` run on configs/camvid.yaml (half resolution,
Unet + EfficientNet-Lite0 from the local ImageNet weights, batch 8, AdamW 1e-3 poly,
horizontal flips, 20 epochs). Each finished run writes ``<results>/<method>-s<seed>.json``;
runs whose result exists are skipped, an interrupted run is resumed from its last.pt.

    python scripts/camvid_benchmark.py --methods plain threshold topk --seeds 0 1 2 --jobs 2
    python scripts/camvid_benchmark.py --summary          # markdown table from the result files

``--protocol full`` is the full-resolution grid (docs/benchmarks.md, section 4), fixed before
its first run: configs/camvid_full.yaml (360x480, Unet + EfficientNet-Lite0 from the local
ImageNet weights), 256x256 crops of images rescaled by a uniform factor in [0.75, 1.5],
horizontal flips, batch 8, AdamW 1e-3 poly, 16 epochs (720 optimizer steps) for every method,
evaluation on the whole 360x480 val images (padded to 384x480), the final epoch's numbers,
never the best epoch's. Its methods are FULL_METHODS; the combinations (``combo-*``) are chosen
between on a tuning seed (100) that the report's seeds 0-2 do not include:

    python scripts/camvid_benchmark.py --protocol full --methods plain topk dictcrop quota --jobs 2
    python scripts/camvid_benchmark.py --protocol full --summary

The same seed gives every method the same initialisation and the same batch order, so the
per-seed differences are what to compare. Each result file records the commit, the processor
and the GPU (if any) it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RARE_CLASSES = ("pole", "sign_symbol", "fence", "pedestrian", "bicyclist")
METHODS: dict[str, list[str]] = {
    "plain": ["ohem.mode=none"],
    "threshold": ["ohem.mode=threshold", "ohem.thresh=0.7", "ohem.min_kept=0.1"],
    "topk": ["ohem.mode=topk", "ohem.top_k=0.2"],
}
# Refinement stages: epochs 16-20 of a base run, continued from its epoch-15 snapshot and
# driven by a read-only mining pass of that snapshot over the train split. The base is
# threshold OHEM; "<refine method>@topk" refines the top-k OHEM run instead.
REFINE_BASE, REFINE_FROM = "threshold", "epoch015.pt"
REFINE_METHODS: dict[str, list[str]] = {
    "refine-sample": ["refine.sampler=image", "refine.sampler_floor=0.3"],
    "refine-classsample": ["refine.sampler=class", "refine.sampler_floor=0.3"],
    "refine-crop": ["refine.hard_crop_prob=0.5", "refine.crop_scale=2.0"],
    "refine-weight": ["refine.pixel_weight=2.0"],
    "refine-classweight": ["refine.class_weight_power=1.0"],
    "refine-weight-class": ["refine.pixel_weight=2.0", "refine.class_weight_power=0.5"],
    "refine-head": ["model.refine_head=32"],
    "refine-head-classsample": ["model.refine_head=32", "refine.sampler=class", "refine.sampler_floor=0.3"],
    "refine-all": ["refine.sampler=class", "refine.hard_crop_prob=0.5", "refine.crop_scale=2.0",
                   "refine.pixel_weight=1.0"],
}  # fmt: skip


# The full-resolution protocol: every method trains on the same crops, steps and augmentation.
FULL_PROTOCOL = [
    "augment.crop=[256,256]", "augment.scale=[0.75,1.5]", "augment.hflip=0.5", "data.batch_size=8",
    "data.num_workers=0", "train.epochs=16", "train.eval_every=4", "eval.mode=whole",
]  # fmt: skip
TOPK = ["ohem.mode=topk", "ohem.top_k=0.2"]
# the chosen combination (tuning seed 100), which the later methods build on
COMBO_C = [*TOPK, "mining.hard_crop_prob=0.25", "mining.rare_crop_prob=0.25", "mining.start_epoch=2",
           "ohem.class_min_kept=0.1", "mining.sampler=class"]  # fmt: skip
FULL_METHODS: dict[str, list[str]] = {
    "plain": ["ohem.mode=none"],
    "topk": TOPK,
    # the dictionary places half the crops on hard cells, from epoch 2 on
    "dictcrop": [*TOPK, "mining.hard_crop_prob=0.5", "mining.start_epoch=2"],
    "quota": [*TOPK, "ohem.class_min_kept=0.1"],
    # single ingredients and combinations, compared on the tuning seed
    "rarecrop": [*TOPK, "mining.rare_crop_prob=0.5", "mining.start_epoch=2"],
    "dictcrop-sharp": [*TOPK, "mining.hard_crop_prob=0.5", "mining.start_epoch=2", "mining.crop_sharpness=2.0"],
    "combo-a": [*TOPK, "mining.hard_crop_prob=0.25", "mining.rare_crop_prob=0.25", "mining.start_epoch=2",
                "ohem.class_min_kept=0.1"],
    "combo-b": [*TOPK, "mining.hard_crop_prob=0.25", "mining.rare_crop_prob=0.25", "mining.start_epoch=2",
                "ohem.class_min_kept=0.1", "ohem.region_loss=lovasz", "ohem.region_weight=0.5"],
    "combo-c": COMBO_C,
    "combo-d": [*TOPK, "mining.hard_crop_prob=0.5", "mining.start_epoch=2", "ohem.class_min_kept=0.1",
                "ohem.region_loss=lovasz", "ohem.region_weight=0.5"],
    # hard rare-class regions pasted into half the crops, alone and on top of combo-c
    "paste": [*TOPK, "mining.paste_prob=0.5", "mining.start_epoch=2"],
    "combo-e": [*COMBO_C, "mining.paste_prob=0.5"],
    # recall weights (class weights from the share of each class's pixels the dictionary's
    # previous epoch missed), alone and on top of combo-c
    "recall": [*TOPK, "mining.class_weight_power=1", "mining.start_epoch=2"],
    "combo-r": [*COMBO_C, "mining.class_weight_power=1"],
    # combo-r with no class weighed below 1 (road and pavement stay 1 : 1), power 2 so that pole
    # weighs about as much against building and tree as in combo-r (defined before its first run)
    "combo-rf": [*COMBO_C, "mining.class_weight_power=2", "mining.class_weight_floor=1"],
    # combo-r with a pixel weighed by the larger of its true and its predicted class's weight: with recall
    # weights the model found most poles but 4 in 5 of its pole pixels were false (scripts/class_found.py)
    "combo-rp": [*COMBO_C, "mining.class_weight_power=1", "ohem.class_weight_predicted=true"],
    # both fixes at once: combo-rf's floored weights (large classes kept at 1) and combo-rp's
    # charging of false positives at the predicted class's weight (defined before its first run)
    "combo-rpf": [*COMBO_C, "mining.class_weight_power=2", "mining.class_weight_floor=1",
                  "ohem.class_weight_predicted=true"],
    # outside the protocol: combo-c with twice the steps, to ask whether the thin classes are
    # limited by the schedule (not paired with the 720-step runs)
    "combo-c-long": [*COMBO_C, "train.epochs=32"],
    # outside the protocol: combo-c with every image twice as large, in training (crops of images
    # rescaled by 1.5-3x) and at evaluation (val images at 2x, predictions resized back to the
    # labels), so a pole is about 6 px wide rather than 3; asks whether the thin classes are limited
    # by their width in pixels (not paired with the 1x runs)
    "combo-c-2x": [*COMBO_C, "augment.scale=[1.5,3.0]", "eval.scales=[2.0]"],
}  # fmt: skip
# settings a method may not change and still pair with the protocol's runs
PROTOCOL_KEYS = {setting.split("=")[0] for setting in FULL_PROTOCOL}
PROTOCOLS = {"half": ("camvid.yaml", METHODS), "full": ("camvid_full.yaml", FULL_METHODS)}


def provenance() -> dict[str, str]:
    """The commit (``BENCH_COMMIT`` where the checkout has no git), processor and GPU of this run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        commit += "+uncommitted" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("BENCH_COMMIT", "unknown")
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines() if shutil.which("nvidia-smi") else []  # fmt: skip
    return {"commit": commit, "cpu": cpu, "gpu": gpu[0] if gpu else "none"}


def segohem(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "segohem.cli", *arguments]


def commands_for(method: str, seed: int, args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    """The commands that (re)produce one run, and the overrides that define the method."""
    name, run_dir = f"{method}-s{seed}", args.runs / f"{method}-s{seed}"
    refine_method, _, refine_base = method.partition("@")
    refine_base = refine_base or REFINE_BASE
    config, methods = PROTOCOLS[getattr(args, "protocol", "half")]
    definition = methods.get(method) or [f"from {refine_base} {REFINE_FROM}", *REFINE_METHODS[refine_method]]
    if (run_dir / "last.pt").exists():  # interrupted: resume it (its config.yaml holds everything)
        return [segohem("train", "--resume", str(run_dir), "train.progress=false")], definition
    if method in methods and config == "camvid_full.yaml":
        overrides = [
            f"run.output_dir={args.runs}", f"run.name={name}", f"run.seed={seed}", f"data.root={args.data_root}",
            f"model.encoder_weights={args.weights}", "train.progress=false", *FULL_PROTOCOL, *methods[method],
        ]  # fmt: skip
        return [segohem("train", "--config", str(ROOT / "configs" / config), *overrides)], definition
    if method in METHODS:
        overrides = [
            f"run.output_dir={args.runs}", f"run.name={name}", f"run.seed={seed}", f"data.root={args.data_root}",
            f"model.encoder_weights={args.weights}", "train.progress=false", "train.snapshot_epochs=[15]",
            "train.eval_every=5", *METHODS[method],
        ]  # fmt: skip
        return [segohem("train", "--config", str(ROOT / "configs" / "camvid.yaml"), *overrides)], definition
    base_dir = args.runs / f"{refine_base}-s{seed}"
    snapshot = base_dir / REFINE_FROM
    if not snapshot.exists():
        raise FileNotFoundError(f"{name} needs {snapshot}: run the {refine_base} method for seed {seed} first")
    store = base_dir / f"mined_train_{snapshot.stem}.sqlite"
    mine = [] if store.exists() else [segohem("mine", "--checkpoint", str(snapshot), "--output", str(store),
                                              "train.progress=false")]  # fmt: skip
    refine = segohem("refine", "--run", str(base_dir), "--checkpoint", REFINE_FROM, "--bank", str(store),
                     f"run.name={name}", "train.eval_every=5", *REFINE_METHODS[refine_method])  # fmt: skip
    return [*mine, refine], definition


def with_settings(commands: list[list[str]], settings: list[str]) -> list[list[str]]:
    """Append ``--set`` overrides (e.g. data.num_workers=4 on a bigger machine) to every command."""
    return [[*command, *settings] for command in commands]


def run_one(method: str, seed: int, args: argparse.Namespace) -> Path:
    result_path = args.results / f"{method}-s{seed}.json"
    if result_path.exists():
        print(f"skip {method} seed {seed}: {result_path} exists")
        return result_path
    name = f"{method}-s{seed}"
    run_dir = args.runs / name
    commands, definition = commands_for(method, seed, args)
    commands = with_settings(commands, args.set)
    env = {"WANDB_MODE": "disabled", **os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}  # fmt: skip
    started = time.perf_counter()
    args.runs.mkdir(parents=True, exist_ok=True)
    # the commit and machine a run started on (a resumed run keeps them: the result describes its start)
    origin = args.runs / f"{name}.provenance.json"
    if not origin.exists():
        origin.write_text(json.dumps(provenance()))
    with (args.runs / f"{name}.log").open("a") as log:
        for command in commands:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    records = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    final = records[-1]
    result = {
        "method": method, "seed": seed, "definition": definition, "epochs": final["epoch"],
        "final_miou": final["val/miou"], "best_miou": max(r["val/miou"] for r in records if "val/miou" in r),
        "final_iou": {k.removeprefix("val/iou/"): v for k, v in final.items() if k.startswith("val/iou/")},
        "wall_seconds_this_sitting": time.perf_counter() - started,
        "train_seconds": sum(r["train/epoch_seconds"] for r in records), "threads": args.threads,
        "commands": [" ".join(c) for c in commands], **json.loads(origin.read_text()),
    }  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    print(f"done {name}: final val mIoU {100 * result['final_miou']:.2f}")
    return result_path


def outside_protocol(run: dict) -> list[str]:
    """The settings of a run's definition that change the protocol: its schedule, augmentation or
    evaluation (combo-c-long: ``train.epochs=32``)."""
    return [setting for setting in run.get("definition", [])
            if (key := setting.split("=")[0]) in PROTOCOL_KEYS or key.startswith(("augment.", "eval."))]  # fmt: skip


def comparable(run: dict, reference: dict | None) -> bool:
    """Whether two runs pair: the reference exists, both trained as many epochs, and neither changes
    the protocol (a method that does, such as combo-c-long, is listed but never paired)."""
    return (reference is not None and run.get("epochs") == reference.get("epochs")
            and outside_protocol(run) == outside_protocol(reference))  # fmt: skip


def paired(runs: dict[int, dict], reference: dict[int, dict], key) -> str:
    """Per-seed differences against a reference method (same seed, same epochs), and their mean."""
    diffs = [100 * (key(runs[s]) - key(reference[s])) for s in sorted(runs) if comparable(runs[s], reference.get(s))]
    return f"{' '.join(f'{d:+.2f}' for d in diffs)} (mean {statistics.mean(diffs):+.2f})" if diffs else "-"


def summarize(results_dir: Path) -> str:
    """Markdown tables of every finished run: means, spreads and paired differences."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    by_method: dict[str, dict[int, dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    plain, threshold, topk = (by_method.get(m, {}) for m in ("plain", "threshold", "topk"))
    ordered = sorted(by_method.items(), key=lambda item: (item[0].startswith("refine"), item[0]))  # baselines first

    def rare(r: dict) -> float:
        return statistics.mean(r["final_iou"][c] for c in RARE_CLASSES)

    def miou(r: dict) -> float:
        return r["final_miou"]

    lines = [
        "| method | seeds | mIoU mean | min..max | vs plain CE, per seed | vs threshold OHEM | vs top-k OHEM "
        "| rare-class IoU | rare vs plain CE | train min/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in ordered:
        mious = [100 * r["final_miou"] for r in runs.values()]
        references = [r for ref in (plain, topk) for r in ref.values()]
        epochs = {r.get("epochs") for r in runs.values()} - {r.get("epochs") for r in references}
        changed = {setting for r in runs.values() for setting in outside_protocol(r)}
        other = sorted(changed) or [f"{n} epochs" for n in sorted(epochs, key=str)]
        pairs = [f"not paired: {', '.join(other)}"] * 4 if references and other else [
            paired(runs, plain, miou), paired(runs, threshold, miou), paired(runs, topk, miou),
            paired(runs, plain, rare),
        ]  # fmt: skip
        lines.append(
            f"| {method} | {','.join(map(str, sorted(runs)))} | {statistics.mean(mious):.2f} | "
            f"{min(mious):.2f}..{max(mious):.2f} | {pairs[0]} | {pairs[1]} | {pairs[2]} | "
            f"{100 * statistics.mean(rare(r) for r in runs.values()):.2f} | {pairs[3]} | "
            f"{statistics.mean(r['train_seconds'] for r in runs.values()) / 60:.0f} |"
        )
    classes = list(results[0]["final_iou"]) if results else []
    lines += ["", "Per-class IoU (%, mean over the seeds listed above):", "",
              "| method | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]  # fmt: skip
    for method, runs in ordered:
        means = [100 * statistics.mean(r["final_iou"][c] for r in runs.values()) for c in classes]
        lines.append(f"| {method} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    rare_present = [c for c in RARE_CLASSES if c in classes]
    header = ["method", "seed", "final mIoU", "vs plain CE", "vs top-k OHEM", *rare_present, "rare", "train min"]
    header.append("commit")
    lines += ["", "Per run (rare = mean IoU of the rare classes; commit = the one the run started on):", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for method, runs in ordered:
        for seed, r in sorted(runs.items()):
            versus = [f"{100 * (miou(r) - miou(ref[seed])):+.2f}" if comparable(r, ref.get(seed)) else "-"
                      for ref in (plain, topk)]  # fmt: skip
            lines.append(
                f"| {method} | {seed} | {100 * miou(r):.2f} | {versus[0]} | {versus[1]} | "
                + " | ".join(f"{100 * r['final_iou'][c]:.1f}" for c in rare_present)
                + f" | {100 * rare(r):.2f} | {r['train_seconds'] / 60:.0f} | {str(r.get('commit', '-'))[:7]} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="half",
                        help="half: 180x240, 20 epochs (section 3); full: 360x480 crops (section 4)")  # fmt: skip
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(dict.fromkeys([*METHODS, *FULL_METHODS, *REFINE_METHODS, *(f"{m}@topk" for m in REFINE_METHODS)])),
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--results", type=Path, help="default: docs/results/camvid, or camvid-full")
    parser.add_argument("--runs", type=Path, help="default: runs/camvid-bench, or runs/camvid-full-bench")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "datasets" / "camvid")
    parser.add_argument(
        "--weights", type=Path, default=ROOT.parent / "shared" / "weights" / "timm-tf_efficientnet_lite0.imagenet.pth"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every command, e.g. data.num_workers=4 (not for paired comparisons)",
    )
    parser.add_argument("--summary", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args()
    full = args.protocol == "full"
    args.results = args.results or ROOT / "docs" / "results" / ("camvid-full" if full else "camvid")
    args.runs = args.runs or ROOT / "runs" / ("camvid-full-bench" if full else "camvid-bench")
    args.methods = args.methods or list(PROTOCOLS[args.protocol][1])[: 4 if full else None]
    unknown = [m for m in args.methods if m.partition("@")[0] not in {**PROTOCOLS[args.protocol][1], **REFINE_METHODS}]
    if unknown or (full and any(m in REFINE_METHODS or "@" in m for m in args.methods)):
        parser.error(f"methods {unknown or args.methods} are not part of the {args.protocol} protocol")
    if args.summary:
        # a table for the terminal: when its reader goes away (`--summary | head`), end quietly, as
        # Unix tools do, instead of with a traceback about a broken pipe
        if hasattr(signal, "SIGPIPE"):
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        print(summarize(args.results))
        return
    args.results.mkdir(parents=True, exist_ok=True)
    grid = [(method, seed) for seed in args.seeds for method in args.methods]  # seed-major: pairs finish together
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run_one, m, s, args) for m, s in grid]:
            future.result()


if __name__ == "__main__":
    main()
