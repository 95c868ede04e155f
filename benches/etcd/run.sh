#!/usr/bin/env bash
# etcd on this machine, measured the way `cargo bench --bench submit` measures gantry: a 3-member
# etcd cluster on loopback (each member's data dir under $TMPDIR, fsync on every commit, as
# etcd always does) and closed-loop clients writing 256-byte values to the leader.
#
#   benches/etcd/run.sh [--clients 1,64,512] [--seconds 8] [--clients-per-connection 10]
#
# Needs etcd and protoc (Debian: apt-get install etcd-server protobuf-compiler). Run it next to
# the gantry bench, alternating, to compare the two on the same machine at the same time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for tool in etcd protoc; do
    if ! command -v "$tool" >/dev/null; then
        echo "benches/etcd/run.sh needs $tool (Debian: apt-get install etcd-server protobuf-compiler)" >&2
        exit 1
    fi
done
cargo build --quiet --release --manifest-path "$here/Cargo.toml"

dir="$(mktemp -d)"
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
base="${ETCD_BENCH_PORT:-23379}"
cluster=""
for n in 1 2 3; do
    cluster+="${cluster:+,}m$n=http://127.0.0.1:$((base + 10 * n + 1))"
done
endpoints=""
for n in 1 2 3; do
    client="http://127.0.0.1:$((base + 10 * n))"
    peer="http://127.0.0.1:$((base + 10 * n + 1))"
    endpoints+="${endpoints:+,}$client"
    etcd --name "m$n" --data-dir "$dir/m$n" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "$cluster" --initial-cluster-state new \
        --log-level error >"$dir/m$n.log" 2>&1 &
done
# The members elect a leader within a few seconds; the client retries its first status call.
for _ in $(seq 60); do
    if "$here/target/release/etcd-put-bench" --endpoints "$endpoints" --clients 1 --seconds 1 >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done
"$here/target/release/etcd-put-bench" --endpoints "$endpoints" "$@"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); etcd $(etcd --version | awk '/etcd Version/ {print $3}'), 3 members and the clients share them"
