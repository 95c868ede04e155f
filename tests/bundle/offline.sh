#!/bin/sh
# Run by tests/bundle.rs inside a network namespace of its own, with no route anywhere: installs
# Gantry from the unpacked bundle at $1 under the root $2, then, from what it installed only,
# starts three coordinators (the first from the installed config) and an agent that joins with a
# token, runs a batch job through them and checks its output. Exits 0 when the job succeeded.
set -eu
bundle=$1
root=$2
log() { echo "offline.sh: $*" >&2; }
fail() { log "FAIL: $*"; for f in "$root"/*.log; do echo "== $f" >&2; tail -n 20 "$f" >&2; done; exit 1; }
# Every process started here is stopped on the way out (strace waits for them all).
pids=""
trap 'kill $pids 2>/dev/null || true; wait' EXIT

ip link set lo up
if [ -n "$(ip route show)" ] || [ -n "$(ip -6 route show | grep -v '^::1 \|^fe80')" ]; then
    fail "this namespace has a route other than loopback: $(ip route show)"
fi

"$bundle/install.sh" --root "$root" --no-images
g="$root/usr/local/bin/gantry"
[ -x "$g" ] || fail "install.sh did not install $g"
[ -f "$root/etc/systemd/system/gantry-coordinator.service" ] || fail "no coordinator unit installed"
[ -f "$root/etc/gantry/agent.toml" ] || fail "no agent config installed"

data="$root/var/lib/gantry"
# As the install's next steps say: this host's address for the other members (loopback here).
cat >>"$root/etc/gantry/coordinator.toml" <<'TOML'
advertise_quic = "127.0.0.1:7443"
advertise_http = "127.0.0.1:7080"
TOML
# The first member from the installed config (QUIC on 0.0.0.0:7443, HTTP on 127.0.0.1:7080).
"$g" coordinator --config "$root/etc/gantry/coordinator.toml" --data-dir "$data/c1" --init >"$root/c1.log" 2>&1 &
pids="$pids $!"
for _ in $(seq 300); do [ -s "$data/c1/admin.token" ] && break; sleep 0.1; done
[ -s "$data/c1/admin.token" ] || fail "the first coordinator wrote no admin token"
export GANTRY_API=127.0.0.1:7080
GANTRY_TOKEN=$(cat "$data/c1/admin.token")
export GANTRY_TOKEN
up=no
for _ in $(seq 300); do "$g" cluster status >/dev/null 2>&1 && up=yes && break; sleep 0.1; done
[ "$up" = yes ] || fail "the first coordinator's API did not answer"

ctoken=$("$g" token create --role coordinator)
"$g" coordinator --data-dir "$data/c2" --listen 127.0.0.1:7444 --http 127.0.0.1:7081 --join "$ctoken@127.0.0.1:7443" >"$root/c2.log" 2>&1 &
pids="$pids $!"
"$g" coordinator --data-dir "$data/c3" --listen 127.0.0.1:7445 --http 127.0.0.1:7082 --join "$ctoken@127.0.0.1:7443" >"$root/c3.log" 2>&1 &
pids="$pids $!"
export GANTRY_API=127.0.0.1:7080,127.0.0.1:7081,127.0.0.1:7082
voters=0
for _ in $(seq 600); do
    voters=$("$g" cluster status -o json 2>/dev/null | grep -c '"voter"' || true)
    [ "$voters" -ge 3 ] && break
    sleep 0.1
done
[ "$voters" -ge 3 ] || fail "three coordinators did not become voters ($voters)"
log "three coordinators are voters"

atoken=$("$g" token create --role agent)
cat >"$root/agent.toml" <<'TOML'
site = "offline-a"
kind = "on-prem"
cost_per_cpu_hour = 0.02
allow_process = true
TOML
"$g" agent --coordinator 127.0.0.1:7443 --join "$atoken" --data-dir "$data/agent" --config "$root/agent.toml" >"$root/agent.log" 2>&1 &
pids="$pids $!"
ready=no
for _ in $(seq 300); do
    if "$g" nodes -o json 2>/dev/null | grep -q '"status": "ready"'; then ready=yes; break; fi
    sleep 0.1
done
[ "$ready" = yes ] || fail "the agent did not become ready"
log "the agent is ready"

cat >"$root/job.yaml" <<'YAML'
name: offline-shards
kind: batch
command: ["sh", "-c", "echo offline shard $SHARD_INDEX of $SHARD_COUNT"]
resources: { cpus: 0.5, memory: 64MiB }
batch: { shards: 2, parallelism: 2, max_retries: 0 }
YAML
job=$("$g" submit "$root/job.yaml")
state=""
for _ in $(seq 600); do
    state=$("$g" status "$job" -o json | sed -n 's/^  "state": "\([a-z]*\)".*/\1/p')
    case "$state" in succeeded|failed|cancelled) break ;; esac
    sleep 0.1
done
[ "$state" = succeeded ] || fail "the job ended '$state'"
output=$("$g" logs "$job")
echo "$output" | grep -q "offline shard 0 of 2" || fail "shard 0's output missing: $output"
echo "$output" | grep -q "offline shard 1 of 2" || fail "shard 1's output missing: $output"
log "job $job succeeded offline"
