#!/usr/bin/env bash
# Builds the `gantry` binary linked statically against musl, so that the one file runs on any
# x86_64 Linux host whatever its C library: what `gantry bundle` ships to air-gapped sites.
#
#   deploy/build-static.sh              # release build: target/static/x86_64-unknown-linux-musl/release/gantry
#   deploy/build-static.sh --dev        # unoptimised, no debug info (what the tests bundle)
#   deploy/build-static.sh --print-path # the same, then the binary's path alone on stdout
#
# Installs what it needs where it is missing: the musl target of the Rust toolchain (rustup) and
# Debian's musl-tools (musl-gcc, for the C parts of ring). Build output goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
profile=release
print_path=false
for arg in "$@"; do
    case "$arg" in
        --dev) profile=dev ;;
        --print-path) print_path=true ;;
        *) echo "build-static.sh: unknown argument $arg (expected --dev or --print-path)" >&2; exit 2 ;;
    esac
done
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" >&2
fi
if ! command -v musl-gcc >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "build-static.sh: musl-gcc is missing: apt-get install musl-tools" >&2
        exit 1
    fi
    (apt-get install -y musl-tools || (apt-get update && apt-get install -y musl-tools)) >&2
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/static}"
# No debug information: a tenth of the size, and quicker to build.
export CARGO_PROFILE_DEV_DEBUG=0
export CARGO_PROFILE_RELEASE_DEBUG=0
cargo build --locked --profile "$profile" --target "$target" --bin gantry >&2
dir=$profile
[ "$profile" = dev ] && dir=debug
binary="$CARGO_TARGET_DIR/$target/$dir/gantry"
if readelf -l "$binary" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    echo "build-static.sh: $binary names a program interpreter: it is not static" >&2
    exit 1
fi
if $print_path; then
    echo "$binary"
else
    echo "static binary: $binary" >&2
fi
