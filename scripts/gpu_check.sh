#!/usr/bin/env bash
# Every GPU check of segohem in one run (about 5 minutes on an H100/H200), each stage timed;
# a failing stage prints a FAILED line and the rest still run; the exit code counts failures.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run       # print the stages and their commands, run nothing
#   bash scripts/gpu_check.sh --fetch-wheels  # on a machine with PyPI: wheels into .whl/ for one
#                                             # without a network (Python 3.12, x86-64 Linux)
#
# Install: a GPU image that already holds torch, torchvision, timm, opencv, numpy, scipy,
# pyyaml, matplotlib, pytest and hypothesis needs only segmentation-models-pytorch and
# albumentations with their small dependencies (WHEELS below). They are installed from .whl/
# when it exists (no network needed; carry .whl to the GPU machine), else from the package
# index with requirements-dev.txt. segohem itself runs from the checkout (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=(segmentation-models-pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4
        pydantic-core==2.50.5 typing-extensions==4.16.0 typing-inspection==0.4.5 annotated-types==0.8.0
        stringzilla==5.3.2 simsimd==6.5.16)
DRY_RUN=0
FAILED=()
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled

fetch_wheels() {
    local platforms=()
    for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 \
               manylinux_2_35 manylinux2014 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    du -sh .whl
}

install() {
    if "$PYTHON" -c "import segmentation_models_pytorch, albumentations" 2>/dev/null; then
        echo "segmentation_models_pytorch and albumentations already importable"
    elif [[ -d .whl ]]; then  # no network: the wheels as they are, beside the image's packages
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        "$PYTHON" -m pip install --disable-pip-version-check -r requirements-dev.txt
    fi
    "$PYTHON" -c "import torch, segmentation_models_pytorch as smp, albumentations as A; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'smp', smp.__version__, 'albumentations', A.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
}

# stage NAME COMMAND...: run, time, report; a failure is recorded, not fatal.
stage() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    if ((DRY_RUN)); then
        return 0
    fi
    local start=$SECONDS status=0
    "$@" || status=$?
    if ((status == 0)); then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAILED (exit $status, $((SECONDS - start)) s)"
        FAILED+=("$name")
    fi
}

gpu_count() {
    if ((DRY_RUN)) || ! command -v nvidia-smi >/dev/null; then
        echo "${GPU_CHECK_GPUS:-1}"
    else
        nvidia-smi -L | wc -l
    fi
}

segohem() { "$PYTHON" -m segohem.cli "$@"; }

main() {
    case "${1:-}" in
        --fetch-wheels) fetch_wheels; return ;;
        --dry-run) DRY_RUN=1 ;;
        "") ;;
        *) echo "unknown option $1; use --dry-run or --fetch-wheels" >&2; return 2 ;;
    esac
    local begin=$SECONDS
    stage install install
    stage gpus nvidia-smi -L
    stage "gpu tests" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_ohem.py \
        tests/test_ohem_property.py
    stage "loss bench" "$PYTHON" scripts/bench_ohem.py --device cuda --repeats 15
    stage "step bench Unet-ResNet50" "$PYTHON" scripts/bench_step.py --device cuda --arch Unet --encoder resnet50 \
        --amp bf16 --batch 8 --size 512 1024
    stage "step bench channels-last" "$PYTHON" scripts/bench_step.py --device cuda --channels-last
    stage "step bench DeepLabV3Plus" "$PYTHON" scripts/bench_step.py --device cuda --arch DeepLabV3Plus \
        --channels-last
    stage "demo bf16" segohem train run.output_dir=/tmp/gpu-demo run.name=bf16 train.epochs=2 train.amp=bf16 \
        wandb.mode=disabled
    if (($(gpu_count) >= 2)); then
        stage "torchrun 2 GPUs" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m segohem.cli \
            train run.output_dir=/tmp/gpu-ddp run.name=two train.epochs=1 data.num_train=64 wandb.mode=disabled
    else
        echo
        echo "=== torchrun 2 GPUs: skipped (one GPU)"
    fi
    # last, and bounded: compilation time varies most
    stage "step bench compiled" timeout 150 "$PYTHON" scripts/bench_step.py --device cuda --compile --steps 10 \
        --warmup 5
    echo
    local failed_names
    failed_names=$(printf '%s, ' "${FAILED[@]}")
    echo "=== all stages: $((SECONDS - begin)) s; failed: ${#FAILED[@]}${FAILED[*]:+ (${failed_names%, })}"
    return "${#FAILED[@]}"
}

main "$@"
