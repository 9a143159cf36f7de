#!/usr/bin/env bash
# Build and install CRIU 4.1.1 (the live-migration baseline of `cloudlet bench migrate`).
#
# Why from source: Debian 12's CRIU 3.17 fails on current kernels ("vdso: Unexpected rt vDSO area
# bounds"); 4.1.1 works. Its source comes from Debian 13 through a deb-src entry only (no binary
# package from trixie is ever installed). Idempotent: does nothing when this
# script's build (same version and patch) is already installed. Installs to /usr/local/sbin/criu.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
patch_file="$here/criu-sockopt-eopnotsupp.patch"
stamp=/usr/local/sbin/.criu-cloudlet-build
want="4.1.1 $(sha256sum "$patch_file" | cut -d' ' -f1)"
if [ -x /usr/local/sbin/criu ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "== criu: $(/usr/local/sbin/criu --version | head -1) (patched) already installed"
  exit 0
fi

work=${CRIU_BUILD_DIR:-/var/cache/cloudlet-criu}
mkdir -p "$work"
src_list=/etc/apt/sources.list.d/cloudlet-trixie-src.sources
if [ ! -f "$src_list" ]; then
  cat > "$src_list" <<'SRC'
# Added by cloudlet tools/install-criu.sh: source packages only, for building CRIU 4.x.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
echo "== criu: installing build dependencies"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev libprotobuf-c-dev protobuf-c-compiler \
  protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libgnutls28-dev \
  libnftables-dev libbsd-dev uuid-dev libaio-dev libdrm-dev pkg-config gcc make >/dev/null

cd "$work"
if ! ls criu_4.*.orig.tar.* >/dev/null 2>&1; then
  echo "== criu: fetching the 4.x source tarball from Debian trixie"
  # The .dsc may answer 404 while the tarball downloads: check for the tarball, not the exit code.
  apt-get source --download-only criu/trixie >/dev/null 2>&1 || true
fi
tarball=$(ls criu_4.*.orig.tar.* 2>/dev/null | head -1)
[ -n "$tarball" ] || { echo "criu: could not fetch the CRIU 4.x source tarball" >&2; exit 1; }
dir=$(tar -tf "$tarball" | sed -n "1s|/.*||p;1q" || true)
[ -d "$dir" ] || tar -xf "$tarball"
if ! grep -q dump_opt_unsupported_ok "$dir/criu/sockets.c"; then
  # Linux 6.16+ refuses SO_PASSCRED/SO_PASSSEC on inet sockets (EOPNOTSUPP); CRIU 4.1.1 treats that
  # as fatal, so no container with a TCP socket could be checkpointed. Skip those two options there.
  patch -d "$dir" -p1 < "$patch_file" >/dev/null
fi
echo "== criu: building $dir (about a minute)"
make -C "$dir" -j"$(nproc)" criu >/dev/null
install -m 0755 "$dir/criu/criu" /usr/local/sbin/criu
echo "$want" > "$stamp"
echo "== criu: $(/usr/local/sbin/criu --version | head -1) installed"
