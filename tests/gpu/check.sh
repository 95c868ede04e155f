#!/usr/bin/env bash
# Builds gantry and prints the agent's fingerprint as JSON. On a host with an NVIDIA GPU and its
# driver, every GPU must appear with its model, memory and UUID (source "nvml"); the script fails
# otherwise; then a one-GPU job on the process runtime must see exactly its GPU. On a host without
# one it prints the fingerprint and says that no GPU was expected.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
fingerprint=$(./target/release/gantry agent fingerprint --data-dir "${TMPDIR:-/tmp}")
echo "$fingerprint"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  expected=$(nvidia-smi -L | grep -c '^GPU ')
  found=$(printf '%s' "$fingerprint" | python3 -c '
import json, sys
gpus = json.load(sys.stdin)["nodes"][0]["gpus"]
ok = [g for g in gpus if g["source"] == "nvml" and g["uuid"] and g["model"] and g["memory_bytes"] > 0]
print(len(ok))')
  echo "nvidia-smi lists $expected GPU(s); the fingerprint has $found with model, memory and UUID" >&2
  [ "$found" -eq "$expected" ] || { echo "FAIL: fingerprint and nvidia-smi disagree" >&2; exit 1; }
  nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv >&2
else
  echo "no NVIDIA GPU here (nvidia-smi absent or failing): the fingerprint must list none from NVML" >&2
fi

# A process-runtime allocation given one GPU sees exactly that GPU: a coordinator and an agent
# on loopback run a one-GPU batch job whose unit runs `nvidia-smi -L`; its output must list one
# GPU, the one whose UUID the allocation was given.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
  bin=./target/release/gantry
  port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  quic="127.0.0.1:$(port)"; http="127.0.0.1:$(port)"
  "$bin" coordinator --init --data-dir "$work/c" --listen "$quic" --http "$http" >"$work/c.log" 2>&1 &
  for _ in $(seq 100); do [ -s "$work/c/admin.token" ] && break; sleep 0.1; done
  export GANTRY_API="http://$http" GANTRY_TOKEN; GANTRY_TOKEN=$(cat "$work/c/admin.token")
  join=$("$bin" token create --role agent)
  printf 'name = "gpu-check"\nallow_process = true\n' >"$work/agent.toml"
  "$bin" agent --coordinator "$quic" --join "$join" --data-dir "$work/a" --config "$work/agent.toml" >"$work/a.log" 2>&1 &
  printf 'name: gpu-check\nkind: batch\ncommand: ["nvidia-smi", "-L"]\nresources: { gpus: 1, cpus: 0.5, memory: 256MiB }\nbatch: { max_retries: 0 }\n' >"$work/job.yaml"
  for _ in $(seq 300); do "$bin" nodes -o json 2>/dev/null | grep -q '"status": "ready"' && break; sleep 0.1; done
  job=$("$bin" submit "$work/job.yaml")
  state=""
  for _ in $(seq 600); do
    state=$("$bin" status "$job" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    case "$state" in succeeded|failed|cancelled) break ;; esac
    sleep 0.1
  done
  [ "$state" = succeeded ] || { echo "FAIL: the one-GPU job ended $state" >&2; cat "$work/a.log" >&2; exit 1; }
  listed=$("$bin" logs "$job")
  echo "inside the allocation, nvidia-smi -L printed:" >&2
  echo "$listed" >&2
  given=$("$bin" status "$job" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocations"][0]["gpus"][0])')
  uuid=$(printf '%s' "$fingerprint" | python3 -c "
import json, sys
gpus = json.load(sys.stdin)['nodes'][0]['gpus']
print(next(g['uuid'] for g in gpus if g['index'] == $given))")
  [ "$(printf '%s\n' "$listed" | grep -c '^GPU ')" -eq 1 ] || { echo "FAIL: the allocation sees more or fewer than one GPU" >&2; exit 1; }
  printf '%s' "$listed" | grep -q "$uuid" || { echo "FAIL: the allocation sees a GPU other than $uuid (index $given)" >&2; exit 1; }
  echo "ok: the allocation given GPU $given sees exactly $uuid" >&2
fi
