#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, install this checkout on
# every worker, start the same `python -m ir_jax.train` on all workers detached
# from ssh, follow its logs, and start again after a preemption (the run resumes
# from its checkpoints).
#
# Usage (from the repository root, with gcloud authenticated):
#
#   PROJECT=my-project ZONE=us-west4-a NAME=ir-v5e16 ACCEL=v5litepod-16 \
#   BUCKET=my-bucket \
#   bash launch/tpu_pod.sh --config configs/llama7b.py \
#       --config.model.checkpoint=../gcs/ckpt/llama7b --config.mesh.data=1 --config.mesh.fsdp=-1
#
# docs/scaling.md walks through the whole sequence (bucket, weights, data, this script).
#
# Dry run: print every command (gcloud, tar, the scripts each worker runs, with the
# resolved `python -m ir_jax.train ...` line) instead of running it, and exit 0; needs
# no gcloud and touches nothing. Either DRY_RUN=1 or --dry-run as the first argument:
#
#   PROJECT=my-project ZONE=us-west4-a ACCEL=v5litepod-16 BUCKET=my-bucket \
#   bash launch/tpu_pod.sh --dry-run --config configs/llama7b.py
#
# It shows the path of a first run (the slice assumed absent, so it is created,
# and training succeeding); the preemption loop below reruns the same commands.
#
# Everything after the script name (and --dry-run) goes to `python -m ir_jax.train`
# unchanged; the script adds --workdir (and data.data_dir) on the bucket. Environment:
#   PROJECT, ZONE   GCP project and zone with TPU quota (required)
#   NAME            TPU VM name (default ir-jax-$ACCEL); also the queued resource's name
#   ACCEL           accelerator type: v5litepod-16 (v5e 4x4), v5litepod-64 (v5e 8x8),
#                   v5p-16 (v5p 2x2x2), v4-16 (v4 2x2x2), v6e-16 (v6e 4x4)
#   RUNTIME         TPU VM image (default by generation: v2-alpha-tpuv5-lite for v5e,
#                   v2-alpha-tpuv5 for v5p, tpu-ubuntu2204-base for v4, v2-alpha-tpuv6e)
#   SPOT=1          a Spot slice (cheaper, preemptible); the loop below recreates it
#   QUEUED=1        request the slice as a queued resource (gcloud compute tpus
#                   queued-resources create; waits until it is ACTIVE) instead of
#                   `tpu-vm create`, which fails at once when no capacity is free
#   BUCKET          GCS bucket mounted with gcsfuse at ~/gcs on every worker: the workdir
#                   (~/gcs/runs/$RUN), TFDS data (~/gcs/tfds) and the workers' logs
#                   (~/gcs/runs/$RUN/logs) must be visible to all workers and survive a
#                   preemption (required). Orbax commits a checkpoint by renaming a
#                   directory: create the bucket with hierarchical namespace (atomic
#                   folder renames), or set GCSFUSE_FLAGS=--rename-dir-limit=200000 for a
#                   flat one; the trainer refuses at start a mount that cannot rename
#   GCSFUSE_FLAGS   extra gcsfuse flags (default none)
#   LOG_EVERY       seconds between copies of each worker's log to the bucket (default 60)
#   RUN             run name under the bucket (default $NAME)
#   MAX_RESTARTS    preemptions (and lost ssh sessions) to survive (default 20)
#   DELETE_AT_END=1 delete the slice when training has finished
#   DRY_RUN=1       print the commands instead of running them (same as --dry-run)
#   UV_VERSION      uv, installed with the image's pip to provide Python 3.11 (default
#                   0.13.8); PYTHON_VERSION the interpreter uv installs (default 3.11)
#
# Python: jax 0.10.2 (and flax, orbax, grain, numpy as pinned) require Python >= 3.11,
# while the TPU VM images' python3 is 3.10 (Ubuntu 22.04). Each worker installs uv
# (pip install --user uv==$UV_VERSION) and makes ~/venv with a uv-managed CPython
# $PYTHON_VERSION (`uv venv --seed`, so the venv has its own pip).
# gcsfuse comes from Google's apt repository (packages.cloud.google.com/apt,
# gcsfuse-<codename>), added with its signing key when gcsfuse is missing.
#
# What runs on each worker: JAX detects the Cloud TPU VM and calls
# jax.distributed.initialize() itself (ir_jax/distributed.py); process 0 writes
# logs and run.json, each worker reads its own data shard, orbax writes the
# checkpoint cooperatively. The trainer runs under setsid/nohup, so a dropped ssh
# connection does not stop it: its output goes to ~/ir_jax_job.log on the worker,
# copied to the bucket (runs/$RUN/logs/<worker host>.log) every LOG_EVERY seconds and
# at the end; the ssh session only follows that log, and a rerun of this script while the
# job runs follows it again instead of starting another. SIGTERM (maintenance,
# preemption notice) makes the trainer save a checkpoint and exit 143; rerunning the
# same command resumes. Logs followed here are appended to runs/tpu_pod_$NAME.log.
#
# Before the first run, check that the config fits the slice, on any CPU machine:
#   python -m ir_jax.aot --config configs/llama7b.py --topology v5e:4x4 \
#       --config.mesh.data=1 --config.mesh.fsdp=-1      # see docs/scaling.md
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
if [[ "${DRY_RUN}" != 0 && "${DRY_RUN}" != 1 ]]; then
  echo "tpu_pod.sh: DRY_RUN must be 0 or 1, got ${DRY_RUN}" >&2
  exit 2
fi

: "${PROJECT:?set PROJECT to the GCP project}"
: "${ZONE:?set ZONE to a zone with TPU quota, e.g. us-west4-a}"
: "${ACCEL:=v5litepod-16}"
: "${NAME:=ir-jax-${ACCEL}}"
: "${BUCKET:?set BUCKET to a GCS bucket for the workdir and data (shared by all workers)}"
: "${RUN:=${NAME}}"
: "${MAX_RESTARTS:=20}"
: "${UV_VERSION:=0.13.8}"
: "${PYTHON_VERSION:=3.11}"
: "${GCSFUSE_FLAGS:=}"
: "${QUEUED:=0}"
: "${LOG_EVERY:=60}"
if [[ ! "${LOG_EVERY}" =~ ^[1-9][0-9]*$ ]]; then
  echo "tpu_pod.sh: LOG_EVERY must be a positive number of seconds, got ${LOG_EVERY}" >&2
  exit 2
fi
for flag in SPOT QUEUED DELETE_AT_END; do
  if [[ "${!flag:-0}" != 0 && "${!flag:-0}" != 1 ]]; then
    echo "tpu_pod.sh: ${flag} must be 0 or 1, got ${!flag}" >&2
    exit 2
  fi
done
if [[ -z "${RUNTIME:-}" ]]; then
  case "${ACCEL}" in
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) echo "tpu_pod.sh: set RUNTIME for accelerator type ${ACCEL}" >&2; exit 2 ;;
  esac
fi
if [[ $# -eq 0 ]]; then
  echo "tpu_pod.sh: pass the ir_jax.train flags, e.g. --config configs/llama7b.py" >&2
  exit 2
fi

dry() { [[ "${DRY_RUN}" == 1 ]]; }

quote() {  # the arguments as one line of shell, single-quoted only where needed
  local out=() a
  for a in "$@"; do
    if [[ -n "${a}" && "${a}" != *[!A-Za-z0-9_./:=,@%+-]* ]]; then
      out+=("${a}")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

x() {  # run a command, or print it in a dry run
  if dry; then
    printf '+ %s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

if ! dry && ! command -v gcloud >/dev/null; then
  echo "tpu_pod.sh: gcloud not found; install the Google Cloud CLI (DRY_RUN=1 prints the" \
    "commands without it)" >&2
  exit 2
fi

GC=(gcloud compute tpus tpu-vm --project="${PROJECT}" --zone="${ZONE}")
QR=(gcloud compute tpus queued-resources --project="${PROJECT}" --zone="${ZONE}")
LOG="runs/tpu_pod_${NAME}.log"
REMOTE_DIR="ir_jax"          # the checkout on each worker, under ~
MOUNT="\$HOME/gcs"           # expanded on the workers
RUN_DIR="${MOUNT}/runs/${RUN}"
JOB="\$HOME/ir_jax_job"      # the job's pid, status, scripts and log on each worker
dry || mkdir -p runs

state() {  # the slice's state as the loop reads it: READY, a waiting state, or another
  if [[ "${QUEUED}" == 1 ]]; then
    local s
    s="$("${QR[@]}" describe "${NAME}" --format='value(state.state)' 2>/dev/null || true)"
    case "${s}" in
      ACTIVE) echo READY ;;
      WAITING_FOR_RESOURCES|ACCEPTED|PROVISIONING|CREATING) echo CREATING ;;
      *) echo "${s}" ;;
    esac
  else
    "${GC[@]}" describe "${NAME}" --format='value(state)' 2>/dev/null || true
  fi
}

delete_slice() {
  if [[ "${QUEUED}" == 1 ]]; then
    x "${QR[@]}" delete "${NAME}" --force --quiet  # --force: the TPU VM with it
  else
    x "${GC[@]}" delete "${NAME}" --quiet
  fi
}

ensure_slice() {
  local s spot=()
  if dry; then
    if [[ "${QUEUED}" == 1 ]]; then
      x "${QR[@]}" describe "${NAME}" --format='value(state.state)'
    else
      x "${GC[@]}" describe "${NAME}" --format='value(state)'
    fi
    echo "# dry run: assuming ${NAME} does not exist (READY: reused; PREEMPTED, ...: deleted first)"
    s=""
  else
    s="$(state)"
  fi
  case "${s}" in
    READY) return 0 ;;
    "") ;;
    CREATING|STARTING|RESTARTING|REPAIRING)
      echo "tpu_pod.sh: ${NAME} is ${s}; waiting" >&2
      while [[ "$(state)" != READY ]]; do sleep 60; done
      return 0 ;;
    *)  # PREEMPTED, TERMINATED, SUSPENDED, FAILED, ...: a Spot slice does not come back
      echo "tpu_pod.sh: ${NAME} is ${s}; deleting and recreating it" >&2
      delete_slice ;;
  esac
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  if [[ "${QUEUED}" == 1 ]]; then
    x "${QR[@]}" create "${NAME}" --node-id="${NAME}" --accelerator-type="${ACCEL}" \
      --runtime-version="${RUNTIME}" "${spot[@]}"
    if dry; then
      echo "# dry run: then polls the describe line above every 60 s until the state is ACTIVE"
    else
      echo "tpu_pod.sh: queued resource ${NAME} requested; waiting until it is ACTIVE" >&2
      local now
      while [[ "$(state)" != READY ]]; do
        now="$(state)"
        if [[ "${now}" != CREATING && -n "${now}" ]]; then
          echo "tpu_pod.sh: queued resource ${NAME} is ${now}, not ACTIVE; see" \
            "\`${QR[*]} describe ${NAME}\`" >&2
          exit 1
        fi
        sleep 60
      done
    fi
  else
    x "${GC[@]}" create "${NAME}" --accelerator-type="${ACCEL}" --version="${RUNTIME}" "${spot[@]}"
  fi
}

on_all() {  # run a shell command on every worker, output streamed here
  x "${GC[@]}" ssh "${NAME}" --worker=all --command="$1" \
    --ssh-flag="-o ServerAliveInterval=60"
}

# Shell run on a worker first by install and train: is this worker's job still running?
# (its pid file names a live process whose command line is the job's script)
RUNNING="test -f ${JOB}.pid && grep -qas ir_jax_job \"/proc/\$(cat ${JOB}.pid)/cmdline\""

install() {
  # The working tree as it is (uncommitted edits included), without local runs and venvs.
  local tmp
  if dry; then tmp="${TMPDIR:-/tmp}/ir_jax.XXXXXX"; else tmp="$(mktemp -d -t ir_jax.XXXXXX)"; fi
  x tar --exclude=./.venv --exclude=./runs --exclude=./assets --exclude=./.git \
      -czf "${tmp}/ir_jax.tar.gz" .
  x "${GC[@]}" scp "${tmp}/ir_jax.tar.gz" "${NAME}:ir_jax.tar.gz" --worker=all
  x rm -rf "${tmp}"
  on_all "set -e
    if ${RUNNING}; then echo \"\$(hostname): training is running; checkout left as it is\"; exit 0; fi
    rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/ir_jax.tar.gz -C ~/${REMOTE_DIR}
    # Python >= ${PYTHON_VERSION} from uv (the image's python3 is older); a venv of another version is replaced.
    test -x ~/.local/bin/uv || python3 -m pip install -q --user 'uv==${UV_VERSION}'
    if ! ~/venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, \"${PYTHON_VERSION}\".split(\".\"))))' 2>/dev/null; then
      rm -rf ~/venv && ~/.local/bin/uv venv -q --seed --python ${PYTHON_VERSION} ~/venv
    fi
    ~/venv/bin/pip install -q --upgrade pip
    ~/venv/bin/pip install -q -e ~/${REMOTE_DIR} 'jax[tpu]==0.10.2'
    if ! command -v gcsfuse >/dev/null; then
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \\
        | sudo gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \\
        | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
    fi
    if ! mountpoint -q ${MOUNT}; then
      mkdir -p ${MOUNT} && gcsfuse --implicit-dirs ${GCSFUSE_FLAGS:+${GCSFUSE_FLAGS} }${BUCKET} ${MOUNT}
    fi
    mkdir -p ${MOUNT}/runs ${MOUNT}/tfds ${RUN_DIR}/logs"
}

train() {
  local args=() a cmd
  for a in "$@"; do args+=("$(printf '%q' "${a}")"); done
  cmd="cd ~/${REMOTE_DIR} && exec ~/venv/bin/python -m ir_jax.train ${args[*]} --workdir=${RUN_DIR}"
  cmd+=" --config.data.data_dir=${MOUNT}/tfds"
  # Each worker: start the job detached (setsid nohup; its output to ${JOB}.log, copied to
  # the bucket every minute and at the end), unless it is still running from an earlier
  # session; then follow the log until the job ends and exit with its status.
  on_all "set -e
    if ${RUNNING}; then
      echo \"\$(hostname): following the running job (pid \$(cat ${JOB}.pid))\"
      from=20
    else
      from=+1
      rm -f ${JOB}.status
      cat > ${JOB}.train.sh <<'IR_JAX_TRAIN'
${cmd}
IR_JAX_TRAIN
      cat > ${JOB}.sh <<'IR_JAX_JOB'
log=\"\$HOME/ir_jax_job.log\"; dest=\"${RUN_DIR}/logs/\$(hostname).log\"
bash \"\$HOME/ir_jax_job.train.sh\" > \"\$log\" 2>&1 &
pid=\$!
while kill -0 \"\$pid\" 2>/dev/null; do cp \"\$log\" \"\$dest\" 2>/dev/null || true; sleep ${LOG_EVERY}; done
status=0; wait \"\$pid\" || status=\$?
cp \"\$log\" \"\$dest\" 2>/dev/null || true
echo \"\$status\" > \"\$HOME/ir_jax_job.status\"
IR_JAX_JOB
      : > ${JOB}.log
      setsid nohup bash ${JOB}.sh < /dev/null > /dev/null 2>&1 &
      echo \$! > ${JOB}.pid
    fi
    tail -n \"\$from\" --pid=\"\$(cat ${JOB}.pid)\" -f ${JOB}.log
    exit \"\$(cat ${JOB}.status 2>/dev/null || echo 255)\""
}

restarts=0
while true; do
  ensure_slice
  install
  if dry; then
    train "$@"
    echo "# output followed here and appended to ${LOG}; workdir gs://${BUCKET}/runs/${RUN}," \
      "worker logs gs://${BUCKET}/runs/${RUN}/logs"
    status=0
  else
    set +e
    train "$@" 2>&1 | tee -a "${LOG}"
    status=${PIPESTATUS[0]}
    set -e
  fi
  if [[ ${status} -eq 0 ]]; then
    if ! dry; then
      echo "tpu_pod.sh: training finished; workdir gs://${BUCKET}/runs/${RUN}" | tee -a "${LOG}"
    fi
    if [[ "${DELETE_AT_END:-0}" == 1 ]]; then delete_slice; fi
    exit 0
  fi
  s="$(state)"
  # 143: the trainer saved a checkpoint on SIGTERM. 255: ssh lost the workers (the job,
  # detached, may still run: the next round follows it). Either way, a slice that is no
  # longer READY was preempted: recreate it and resume.
  if [[ "${s}" == READY && ${status} -ne 143 && ${status} -ne 255 ]]; then
    echo "tpu_pod.sh: training failed with status ${status} on a healthy slice; not retrying" >&2
    exit "${status}"
  fi
  restarts=$((restarts + 1))
  if [[ ${restarts} -gt ${MAX_RESTARTS} ]]; then
    echo "tpu_pod.sh: ${MAX_RESTARTS} restarts used up; giving up" >&2
    exit "${status}"
  fi
  echo "tpu_pod.sh: status ${status}, slice ${s:-gone}; restart ${restarts}/${MAX_RESTARTS}" \
    | tee -a "${LOG}"
  sleep 60
done
