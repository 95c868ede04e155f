#!/usr/bin/env bash
# Builds gantry and prints the agent's fingerprint as JSON. On a host with an NVIDIA GPU and its
# driver, every GPU must appear with its model, memory and UUID (source "nvml"); the script fails
# otherwise. On a host without one it prints the fingerprint and says that no GPU was expected.
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
