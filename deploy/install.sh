#!/bin/sh
# Installs Gantry from the bundle this script lies in (`gantry bundle` writes it), with no network:
# checks every file against MANIFEST, then installs
#   bin/gantry        -> ROOT/usr/local/bin/gantry
#   config/*.toml     -> ROOT/etc/gantry/ (an existing config is kept; the new one goes beside it as .new)
#   systemd/*.service -> ROOT/etc/systemd/system/
#   images/*.tar      -> the local Docker daemon (`gantry images load`), where one answers
#
# usage: install.sh [--root DIR] [--no-systemd] [--no-images]
#   --root DIR     install under DIR instead of / (a chroot, an image being built, a test)
#   --no-systemd   do not install the units nor reload systemd
#   --no-images    do not load the images into Docker
set -eu

usage() {
    sed -n 's/^# \{0,1\}//; 2,13p' "$0"
}

root=/
systemd=yes
images=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --root)
            [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }
            root=$2
            shift 2
            ;;
        --root=*) root=${1#--root=}; shift ;;
        --no-systemd) systemd=no; shift ;;
        --no-images) images=no; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
if command -v sha256sum >/dev/null 2>&1; then
    if ! sha256sum --quiet -c MANIFEST; then
        echo "install.sh: the bundle is damaged: the files above do not match MANIFEST" >&2
        exit 1
    fi
else
    echo "install.sh: no sha256sum here: the bundle's files are not checked" >&2
fi

bin_dir="$root/usr/local/bin"
etc_dir="$root/etc/gantry"
mkdir -p "$bin_dir" "$etc_dir"
# Written beside and renamed, so that a running gantry is never overwritten in place.
cp bin/gantry "$bin_dir/.gantry.new"
chmod 0755 "$bin_dir/.gantry.new"
mv -f "$bin_dir/.gantry.new" "$bin_dir/gantry"
echo "installed $bin_dir/gantry ($("$bin_dir/gantry" --version))"

for config in config/*.toml; do
    target="$etc_dir/$(basename "$config")"
    if [ -e "$target" ]; then
        cp "$config" "$target.new"
        echo "kept $target; this bundle's is $target.new"
    else
        cp "$config" "$target"
        echo "installed $target"
    fi
done

if [ "$systemd" = yes ]; then
    unit_dir="$root/etc/systemd/system"
    mkdir -p "$unit_dir"
    for unit in systemd/*.service; do
        cp "$unit" "$unit_dir/"
        echo "installed $unit_dir/$(basename "$unit")"
    done
    if [ "$root" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
    fi
fi

if [ "$images" = yes ]; then
    if [ -S /var/run/docker.sock ] || [ -n "${DOCKER_HOST:-}" ]; then
        for image in images/*.tar; do
            "$bin_dir/gantry" images load "$image" ||
                echo "install.sh: $image not loaded (see above); later: gantry images load $here/$image" >&2
        done
    else
        echo "no Docker daemon answers here: images not loaded (later: gantry images load $here/images/FILE.tar)"
    fi
fi

cat <<EOF

Next:
  coordinators: edit $etc_dir/coordinator.toml, then on the first one
      gantry coordinator --config $etc_dir/coordinator.toml --init
    and on the others, with a token from \`gantry token create --role coordinator\` on the first:
      gantry coordinator --config $etc_dir/coordinator.toml --join TOKEN@FIRST:7443
    then \`systemctl enable --now gantry-coordinator\`.
  agents: edit $etc_dir/agent.toml (coordinators, site, prices), put
      GANTRY_JOIN_TOKEN=...   (from \`gantry token create --role agent\`)
    in /etc/gantry/agent.env, then \`systemctl enable --now gantry-agent\`.
EOF
