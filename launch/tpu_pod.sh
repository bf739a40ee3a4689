#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, install this checkout on
# every worker, run the same `python -m ir_jax.train` on all workers, stream the
# logs, and start again after a preemption (the run resumes from its checkpoints).
#
# Usage (from the repository root, with gcloud authenticated):
#
#   PROJECT=my-project ZONE=us-west4-a NAME=ir-v5e16 ACCEL=v5litepod-16 \
#   BUCKET=my-bucket \
#   bash launch/tpu_pod.sh --config configs/llama7b.py \
#       --config.mesh.data=1 --config.mesh.fsdp=-1
#
# Dry run: print every command (gcloud, tar, the remote scripts with the resolved
# `python -m ir_jax.train ...` line) instead of running it, and exit 0; needs no
# gcloud and touches nothing. Either DRY_RUN=1 or --dry-run as the first argument:
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
#   NAME            TPU VM name (default ir-jax-$ACCEL)
#   ACCEL           accelerator type: v5litepod-16 (v5e 4x4), v5litepod-64 (v5e 8x8),
#                   v5p-16 (v5p 2x2x2), v4-16 (v4 2x2x2), v6e-16 (v6e 4x4)
#   RUNTIME         TPU VM image (default by generation: v2-alpha-tpuv5-lite for v5e,
#                   v2-alpha-tpuv5 for v5p, tpu-ubuntu2204-base for v4, v2-alpha-tpuv6e)
#   SPOT=1          create a Spot slice (cheaper, preemptible); the loop below recreates it
#   BUCKET          GCS bucket mounted with gcsfuse at ~/gcs on every worker: the workdir
#                   (~/gcs/runs/$RUN) and TFDS data (~/gcs/tfds) must be visible to all
#                   workers and survive a preemption (required)
#   RUN             run name under the bucket (default $NAME)
#   MAX_RESTARTS    preemptions to survive before giving up (default 20)
#   DELETE_AT_END=1 delete the slice when training has finished
#   DRY_RUN=1       print the commands instead of running them (same as --dry-run)
#
# What runs on each worker: JAX detects the Cloud TPU VM and calls
# jax.distributed.initialize() itself (ir_jax/distributed.py); process 0 writes
# logs and run.json, each worker reads its own data shard, orbax writes the
# checkpoint cooperatively. SIGTERM (maintenance, preemption notice) makes the
# trainer save a checkpoint and exit 143; rerunning the same command resumes.
# Logs: printed here and appended to runs/tpu_pod_$NAME.log.
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
LOG="runs/tpu_pod_${NAME}.log"
REMOTE_DIR="ir_jax"          # the checkout on each worker, under ~
MOUNT="\$HOME/gcs"           # expanded on the workers
dry || mkdir -p runs

state() {
  "${GC[@]}" describe "${NAME}" --format='value(state)' 2>/dev/null || true
}

ensure_slice() {
  local s
  if dry; then
    x "${GC[@]}" describe "${NAME}" --format='value(state)'
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
      while [[ "$(state)" != READY ]]; do sleep 30; done
      return 0 ;;
    *)  # PREEMPTED, TERMINATED, STOPPED, ...: a Spot slice does not come back; recreate it
      echo "tpu_pod.sh: ${NAME} is ${s}; deleting and recreating it" >&2
      x "${GC[@]}" delete "${NAME}" --quiet ;;
  esac
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  x "${GC[@]}" create "${NAME}" --accelerator-type="${ACCEL}" --version="${RUNTIME}" "${spot[@]}"
}

on_all() {  # run a shell command on every worker, output streamed here
  x "${GC[@]}" ssh "${NAME}" --worker=all --command="$1" \
    --ssh-flag="-o ServerAliveInterval=60"
}

install() {
  # The working tree as it is (uncommitted edits included), without local runs and venvs.
  local tmp
  if dry; then tmp="${TMPDIR:-/tmp}/ir_jax.XXXXXX"; else tmp="$(mktemp -d -t ir_jax.XXXXXX)"; fi
  x tar --exclude=./.venv --exclude=./runs --exclude=./assets --exclude=./.git \
      -czf "${tmp}/ir_jax.tar.gz" .
  x "${GC[@]}" scp "${tmp}/ir_jax.tar.gz" "${NAME}:ir_jax.tar.gz" --worker=all
  x rm -rf "${tmp}"
  on_all "set -e
    rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/ir_jax.tar.gz -C ~/${REMOTE_DIR}
    test -d ~/venv || python3 -m venv ~/venv
    ~/venv/bin/pip install -q --upgrade pip
    ~/venv/bin/pip install -q -e ~/${REMOTE_DIR} 'jax[tpu]==0.10.2'
    if ! mountpoint -q ${MOUNT}; then
      command -v gcsfuse >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }
      mkdir -p ${MOUNT} && gcsfuse --implicit-dirs ${BUCKET} ${MOUNT}
    fi
    mkdir -p ${MOUNT}/runs ${MOUNT}/tfds"
}

train() {
  local args=() a cmd
  for a in "$@"; do args+=("$(printf '%q' "${a}")"); done
  cmd="exec ~/venv/bin/python -m ir_jax.train ${args[*]} --workdir=${MOUNT}/runs/${RUN}"
  cmd+=" --config.data.data_dir=${MOUNT}/tfds"
  # A trainer left over from a lost ssh session would hold the TPU: stop it first.
  on_all "if test -f ~/ir_jax_train.pid; then kill \$(cat ~/ir_jax_train.pid) 2>/dev/null; sleep 10; fi
    cd ~/${REMOTE_DIR} && echo \$\$ > ~/ir_jax_train.pid && ${cmd}"
}

restarts=0
while true; do
  ensure_slice
  install
  if dry; then
    train "$@"
    echo "# output streamed here and appended to ${LOG}; workdir gs://${BUCKET}/runs/${RUN}"
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
    if [[ "${DELETE_AT_END:-0}" == 1 ]]; then x "${GC[@]}" delete "${NAME}" --quiet; fi
    exit 0
  fi
  s="$(state)"
  # 143: the trainer saved a checkpoint on SIGTERM. 255: ssh lost the workers. Either way,
  # a slice that is no longer READY was preempted: recreate it and resume.
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
