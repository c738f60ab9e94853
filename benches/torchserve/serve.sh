#!/usr/bin/env bash
# Starts or stops TorchServe with the lite0 archive that setup.sh builds.
#
#   serve.sh start [--workers N] [--threads T] [--batch-size B] [--max-batch-delay MS]
#                  [--netty-threads K] [--job-queue-size Q] [--quiet-logs]
#   serve.sh stop
#
# start writes run/config.properties, starts TorchServe in the background and returns once GET /ping says
# Healthy and all N workers of lite0 are READY (or fails, printing the end of the log and stopping it).
#   --workers N          worker processes (each a Python process with its own copy of the model); default 2
#   --threads T          torch intra-op threads per worker (BENCH_TORCH_THREADS, OMP_NUM_THREADS,
#                        MKL_NUM_THREADS); default max(1, cores / workers), 1 for 2 workers on 2 cores
#   --batch-size B       server-side batching: up to B queued requests run as one forward pass; default 1
#   --max-batch-delay MS how long a worker waits to fill a batch; default 100 (TorchServe's), unused at B=1
#   --netty-threads K    frontend (Java) I/O threads; default TorchServe's own (one per core)
#   --job-queue-size Q   requests queued per model before 503s; default 100 (TorchServe's)
#   --quiet-logs         log warnings only: TorchServe's own log4j2.xml logs at DEBUG, several lines per request
#                        (ts_log, access_log, model/ts metrics); this drops them to WARN / off
# Other OpenMP settings pass through the environment to the workers, e.g. OMP_WAIT_POLICY=PASSIVE.
# Ports (environment): TS_PORT 8080 (inference), TS_MANAGEMENT_PORT 8081, TS_METRICS_PORT 8082,
# TS_GRPC_INFERENCE_PORT 7070, TS_GRPC_MANAGEMENT_PORT 7071. All listen on 127.0.0.1 only.
# TorchServe keeps one pid file per machine (/tmp/.model_server.pid): one instance at a time.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
VENV=$HERE/.venv
MODEL_NAME=lite0
PID_FILE=${TMPDIR:-/tmp}/.model_server.pid

TS_PORT=${TS_PORT:-8080}
TS_MANAGEMENT_PORT=${TS_MANAGEMENT_PORT:-8081}
TS_METRICS_PORT=${TS_METRICS_PORT:-8082}
TS_GRPC_INFERENCE_PORT=${TS_GRPC_INFERENCE_PORT:-7070}
TS_GRPC_MANAGEMENT_PORT=${TS_GRPC_MANAGEMENT_PORT:-7071}

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

running_pid() {
  # The frontend's pid, if the pid file names a live process.
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid=$(head -n 1 "$PID_FILE")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}

stop() {
  local pid pids=() i
  if ! pid=$(running_pid); then
    echo "serve: TorchServe is not running"
    rm -f "$PID_FILE"
    return 0
  fi
  # The frontend and its workers, to wait for them to exit (the frontend stops its workers itself).
  pids=("$pid" $(descendants "$pid"))
  "$VENV/bin/torchserve" --stop >/dev/null
  for i in $(seq 1 60); do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && { echo "serve: stopped"; return 0; }
    sleep 0.5
  done
  echo "serve: TorchServe did not stop within 30 s; killing pids ${pids[*]}" >&2
  kill -9 "${pids[@]}" 2>/dev/null || true
}

start() {
  local workers=2 threads="" batch=1 delay=100 netty="" queue=100 quiet=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers) workers=$2; shift 2 ;;
      --threads) threads=$2; shift 2 ;;
      --batch-size) batch=$2; shift 2 ;;
      --max-batch-delay) delay=$2; shift 2 ;;
      --netty-threads) netty=$2; shift 2 ;;
      --job-queue-size) queue=$2; shift 2 ;;
      --quiet-logs) quiet=1; shift ;;
      *) usage ;;
    esac
  done
  local cores
  cores=$(nproc)
  [ -n "$threads" ] || threads=$(( cores / workers > 0 ? cores / workers : 1 ))
  [ -f "model-store/$MODEL_NAME.mar" ] || { echo "serve: model-store/$MODEL_NAME.mar is missing; run setup.sh" >&2; exit 1; }
  if pid=$(running_pid); then
    echo "serve: TorchServe is already running (pid $pid); run '$0 stop' first" >&2
    exit 1
  fi

  local port
  for port in "$TS_PORT" "$TS_MANAGEMENT_PORT" "$TS_METRICS_PORT" "$TS_GRPC_INFERENCE_PORT" "$TS_GRPC_MANAGEMENT_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "serve: port $port on 127.0.0.1 is in use (editserve's default is 8080 too); set TS_PORT etc." >&2
      exit 1
    fi
  done

  mkdir -p run logs
  cat >run/config.properties <<EOF
# Written by serve.sh start $(date -u +%FT%TZ)
inference_address=http://127.0.0.1:$TS_PORT
management_address=http://127.0.0.1:$TS_MANAGEMENT_PORT
metrics_address=http://127.0.0.1:$TS_METRICS_PORT
grpc_inference_address=127.0.0.1
grpc_management_address=127.0.0.1
grpc_inference_port=$TS_GRPC_INFERENCE_PORT
grpc_management_port=$TS_GRPC_MANAGEMENT_PORT
model_store=$HERE/model-store
default_workers_per_model=$workers
job_queue_size=$queue
disable_token_authorization=true
# The per-minute system-metrics collector is a Python process of its own: off, to keep the CPUs for serving.
disable_system_metrics=true
${netty:+number_of_netty_threads=$netty}
models={"$MODEL_NAME": {"1.0": {"defaultVersion": true, "marName": "$MODEL_NAME.mar", "minWorkers": $workers, "maxWorkers": $workers, "batchSize": $batch, "maxBatchDelay": $delay, "responseTimeout": 120}}}
EOF

  local log_config=()
  if [ "$quiet" = 1 ]; then
    # TorchServe's own log4j2.xml, from its jar, with the per-request loggers turned down.
    "$VENV/bin/python" - "$VENV" >run/log4j2.xml <<'PY'
import glob, re, sys, zipfile
jar = glob.glob(sys.argv[1] + "/lib/python3*/site-packages/ts/frontend/model-server.jar")[0]
xml = zipfile.ZipFile(jar).read("log4j2.xml").decode()
for name, level in [("ACCESS_LOG", "off"), ("MODEL_LOG", "warn"), ("MODEL_METRICS", "off"),
                    ("TS_METRICS", "off"), ("org.pytorch.serve", "warn")]:
    xml, n = re.subn(r'(<Logger name="%s" level=")[a-z]+"' % re.escape(name), r'\g<1>%s"' % level, xml)
    assert n == 1, name
sys.stdout.write(xml)
PY
    log_config=(--log-config "$HERE/run/log4j2.xml")
  fi

  echo "serve: starting TorchServe: $workers workers x $threads threads, batch size $batch, max batch delay ${delay} ms$([ "$quiet" = 1 ] && echo ", quiet logs"), inference on 127.0.0.1:$TS_PORT"
  # Workers inherit the frontend's environment: these set each worker's torch threads (see handler.py).
  LOG_LOCATION=$HERE/logs METRICS_LOCATION=$HERE/logs \
  BENCH_TORCH_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads \
  PATH=$VENV/bin:$PATH \
    nohup "$VENV/bin/torchserve" --start --ncs --disable-token-auth \
      --model-store "$HERE/model-store" --models "$MODEL_NAME=$MODEL_NAME.mar" \
      --ts-config "$HERE/run/config.properties" "${log_config[@]}" >logs/torchserve-stdout.log 2>&1 </dev/null &

  local deadline=$(( $(date +%s) + ${TS_START_TIMEOUT:-180} )) ping="" ready=0
  while [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 1
    ping=$(curl -s --max-time 2 "http://127.0.0.1:$TS_PORT/ping" || true)
    if grep -q '"Healthy"' <<<"$ping"; then
      ready=$(curl -s --max-time 2 "http://127.0.0.1:$TS_MANAGEMENT_PORT/models/$MODEL_NAME" \
        | grep -o '"status": *"READY"' | wc -l || true)
      if [ "$ready" -ge "$workers" ]; then
        echo "serve: ready: http://127.0.0.1:$TS_PORT/predictions/$MODEL_NAME ($ready workers READY; logs in $HERE/logs)"
        return 0
      fi
    fi
  done
  echo "serve: TorchServe was not ready within ${TS_START_TIMEOUT:-180} s (ping: ${ping:-no answer}, $ready workers READY); last log lines:" >&2
  tail -n 40 logs/model_log.log logs/ts_log.log logs/torchserve-stdout.log 2>/dev/null >&2 || true
  stop >&2
  exit 1
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; [ $# -eq 0 ] || usage; stop ;;
  *) usage ;;
esac
