#!/usr/bin/env bash
# The measurements that need a GPU, in one call of a lent GPU machine (15 minutes a session, start-up included):
# each stage under its own time limit, its results copied under $OUT as they come, so a cut stage still returns
# what it finished; every stage's output in $OUT/session.log (the call returns at most 8 files).
#
#   run(command="bash tools/gpu_session.sh setup deploy", carry=[".whl", "runs/carry"], timeout_s=300)
#   run(command="bash tools/gpu_session.sh setup gpu", carry=[".whl", "runs/carry"], timeout_s=600)
#   run(command="bash tools/gpu_session.sh setup frcnn", carry=[".whl"], timeout_s=600)
#
#   setup    install the carried wheels (.whl/) into /tmp/site; versions and the GPU         (limit  60 s)
#   deploy   deployment issue: tools/deploy_report.py at 640 px on the GPU (speed table, exports'
#            parity, video against the speed table: the 20 % criterion)                      (limit 150 s)
#   gpu      convergence issue: the `gpu` benchmark profile, nine runs side by side (≈ 6-7 min
#            estimated), with its teacher carried in runs/carry/gpu_teacher.pt (required)     (limit 480 s)
#   frcnn    Faster R-CNN issue: the `frcnn` benchmark profile, its teacher trained there first (the crops
#            backbone, then 6 epochs of 56 batches: ≈ 1-2 min estimated from the H200's 329 batches of 32
#            in 61 s), then its 13 student runs, nine side by side (the cpu profile's 450 scenes, 20 epochs:
#            ≈ 3-5 min estimated; 2 loader workers each, 27 processes on 16 cores)          (limit 480 s)
# deploy, gpu and frcnn do not fit one call together; with 15 minutes of device time a session, start-ups
# included, expect one of them, or two only if the machine stays warm between the calls (it waits 30 s).
# Exit status: the number of stages that failed or were cut.
#
# Prepared on the CPU machine (this checkout), once:
#   echo /.whl/ >> .git/info/exclude      # then, for Python 3.12 (the GPU machine's), the packages it lacks:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl ultralytics==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99 \
#     pycocotools==2.0.11 albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 lap==0.5.13 \
#     onnxslim==0.1.98                    # 12 MB; polars (54 MB) stays behind: detkd never needs it (plots=False)
#   mkdir -p runs/carry && cp runs/bench/converged/runs/alone_s0/weights/best.pt runs/carry/student.pt
#   cp runs/bench/gpu/teacher/*/weights/best.pt runs/carry/gpu_teacher.pt   # if trained here beforehand (≈ 1 h)
# Rehearse it here first, tiny and on the CPU (what each stage does, not how long it takes there; the venv's bin
# first on PATH, as the stages call python3):
#   OUT=/tmp/gs DEVICE=cpu IMGSZ=64 FRAMES=20 PROFILE=tiny.yaml FRCNN_PROFILE=tiny_frcnn.yaml \
#     bash tools/gpu_session.sh setup deploy gpu frcnn
#   (tiny*.yaml: profiles of a few 64 px scenes and one epoch, tiny_frcnn.yaml's teacher with `backbone:` a file
#   from `detkd teacher backbone --epochs 1 --per-class 4 --imgsz 32` or none, since `crops` pretrains at full
#   size; here setup fails on the Python 3.12 wheels, harmless;
#   SETUP_LIMIT, DEPLOY_LIMIT, GPU_LIMIT, FRCNN_LIMIT change a stage's limit, e.g. to see a cut stage return its
#   results)
set -u
OUT=${OUT:-/tmp/gpu_session}
DEVICE=${DEVICE:-0}
IMGSZ=${IMGSZ:-640}
FRAMES=${FRAMES:-300}
PROFILE=${PROFILE:-gpu}
FRCNN_PROFILE=${FRCNN_PROFILE:-frcnn}
STUDENT=${STUDENT:-runs/carry/student.pt}
TEACHER=${TEACHER:-docs/benchmarks/converged/teacher/teacher.pt}
DEPLOY_FILES="/tmp/deploy/deploy.md /tmp/deploy/deploy.json"
GPU_FILES="/tmp/bench/results.md /tmp/bench/results.json /tmp/bench/map_vs_epoch.png"
FRCNN_FILES="/tmp/frcnn/results.md /tmp/frcnn/results.json /tmp/frcnn/map_vs_epoch.png"
mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=0

log() { echo "[$(($(date +%s) - START)) s] $*"; }

collect() {  # copy FILES into $OUT whole: through a temporary name, so that a kill never leaves half a file there
  for f in "$@"; do
    [ -f "$f" ] && cp "$f" "$OUT/.partial" && mv "$OUT/.partial" "$OUT/$(basename "$f")"
  done
}

keep_copying() {  # collect FILES every 10 s while a stage runs (a stage cut by its limit still returns them)
  while true; do collect "$@"; sleep 10; done
}

stage() {  # stage NAME LIMIT_S FILES COMMAND...: output appended to $OUT/session.log, FILES collected at the end
  local name=$1 limit=$2 files=$3 status
  shift 3
  log "$name: start (limit ${limit} s)" | tee -a "$OUT/session.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/session.log" 2>&1
  status=$?
  collect $files
  [ $status = 0 ] || FAILED=$((FAILED + 1))
  log "$name: exit $status$( ( [ $status = 124 ] || [ $status = 137 ] ) && echo ': cut at its limit')" \
    | tee -a "$OUT/session.log"
}

setup() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  fi
  python3 -c "import torch, ultralytics, detkd; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'ultralytics', ultralytics.__version__)"
  nproc
}

deploy() {
  python3 -m detkd.cli synth --out /tmp/deploy_data --train 32 --val 100 --imgsz "$IMGSZ" > /dev/null || return 1
  python3 -m detkd.cli synth --video /tmp/traffic.mp4 --frames "$FRAMES" --imgsz "$IMGSZ" > /dev/null || return 1
  keep_copying $DEPLOY_FILES &
  trap "kill $! 2> /dev/null" EXIT  # the copier ends with the stage (a cut one: timeout kills the whole group)
  python3 tools/deploy_report.py "$STUDENT" "$TEACHER" --data /tmp/deploy_data/data.yaml --footage /tmp/traffic.mp4 \
    --imgsz "$IMGSZ" --device "$DEVICE" --formats onnx --out /tmp/deploy
}

gpu() {
  local teacher=()
  if [ -f runs/carry/gpu_teacher.pt ]; then
    teacher=(--teacher runs/carry/gpu_teacher.pt)
  elif [ "$PROFILE" = gpu ]; then  # training it there would take most of the stage's limit
    echo "gpu: no runs/carry/gpu_teacher.pt: train the gpu profile's teacher on the CPU machine first (see the header)"
    return 3
  fi
  keep_copying $GPU_FILES &
  trap "kill $! 2> /dev/null" EXIT
  python3 -m detkd.cli benchmark --profile "$PROFILE" --out /tmp/bench "${teacher[@]}"
}

frcnn() {  # the teacher first (it trains alone), then the student runs side by side
  keep_copying $FRCNN_FILES &
  trap "kill $! 2> /dev/null" EXIT
  python3 -m detkd.cli benchmark --profile "$FRCNN_PROFILE" --out /tmp/frcnn --parallel 9
}

# the stages run as `bash -c NAME` under timeout, which cannot run a function of this shell itself
export OUT DEVICE IMGSZ FRAMES PROFILE FRCNN_PROFILE STUDENT TEACHER START DEPLOY_FILES GPU_FILES FRCNN_FILES
export -f log collect keep_copying setup deploy gpu frcnn
for name in "$@"; do
  case $name in
    setup) stage setup "${SETUP_LIMIT:-60}" "" bash -c setup ;;
    deploy) stage deploy "${DEPLOY_LIMIT:-150}" "$DEPLOY_FILES" bash -c deploy ;;
    gpu) stage gpu "${GPU_LIMIT:-480}" "$GPU_FILES" bash -c gpu ;;
    frcnn) stage frcnn "${FRCNN_LIMIT:-480}" "$FRCNN_FILES" bash -c frcnn ;;
    *) echo "gpu_session.sh: unknown stage '$name' (setup, deploy, gpu, frcnn)" >&2; exit 2 ;;
  esac
done
log "done: $FAILED stage(s) failed or cut"
tail -n 40 "$OUT/session.log"
exit "$FAILED"
