#!/usr/bin/env bash
# Builds the hoist Debian package with plain dpkg-deb:
#   scripts/build-deb.sh                 # cargo build --release -p hoist, then package target/release/hoist
#   HOIST_BIN=path/to/hoist scripts/build-deb.sh   # package that binary as it is (the tests pass their
#                                                  # debug build, which saves a release build's minutes)
#   HOIST_DEB_DIR=dir                    # where the .deb goes (default: $CARGO_TARGET_DIR or target, /debian)
#   HOIST_DEB_REVISION=n                 # the Debian revision (default 1)
# Prints the path of the .deb it wrote: <dir>/hoist_<version>-<revision>_<arch>.deb. The version is the
# binary's own (`hoist --version`, from the workspace's Cargo.toml). The packaging files are in
# packaging/deb/.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
if [ -z "${HOIST_BIN:-}" ]; then
  cargo build --release --locked -p hoist >&2
  HOIST_BIN="$target/release/hoist"
fi
[ -x "$HOIST_BIN" ] || { echo "build-deb: $HOIST_BIN is not an executable" >&2; exit 1; }
out="${HOIST_DEB_DIR:-$target/debian}"

version=$("$HOIST_BIN" --version | awk '{print $2}')
[ -n "$version" ] || { echo "build-deb: $HOIST_BIN --version printed no version" >&2; exit 1; }
version="$version-${HOIST_DEB_REVISION:-1}"
arch=$(dpkg --print-architecture)
maintainer="Hoist maintainers <hoist@example.org>"
# Reproducible dates: the last commit's, else now.
when=$(git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$when}"

mkdir -p "$out"
root=$(mktemp -d "$out/hoist-deb.XXXXXX")
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

doc="$root/usr/share/doc/hoist"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/hoist/containers.d" \
  "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d" "$root/usr/share/man/man1" "$doc"

install -m 0755 "$HOIST_BIN" "$root/usr/bin/hoist"
# A debug build carries debug info the package has no use for.
strip --strip-unneeded "$root/usr/bin/hoist" 2>/dev/null || true
install -m 0644 packaging/deb/hoist.service "$root/lib/systemd/system/hoist.service"
install -m 0644 packaging/deb/hoist.yaml "$root/etc/hoist/hoist.yaml"

# Completions and man pages from the clap definitions of the binary being packaged.
"$HOIST_BIN" completions bash >"$root/usr/share/bash-completion/completions/hoist"
"$HOIST_BIN" completions zsh >"$root/usr/share/zsh/vendor-completions/_hoist"
"$HOIST_BIN" completions fish >"$root/usr/share/fish/vendor_completions.d/hoist.fish"
"$HOIST_BIN" man --dir "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1

install -m 0644 packaging/deb/copyright "$doc/copyright"
install -D -m 0644 packaging/deb/lintian-overrides "$root/usr/share/lintian/overrides/hoist"
{
  echo "hoist ($version) unstable; urgency=medium"
  echo
  echo "  * Built from the hoist workspace$(git rev-parse --short HEAD 2>/dev/null | sed 's/^/ at commit /')."
  echo
  echo " -- $maintainer  $(date -R -u -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz" "$root"/usr/share/man/man1/*.gz "$root"/usr/share/*/*completions*/*

install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
echo /etc/hoist/hoist.yaml >"$root/DEBIAN/conffiles"

# Shared-library dependencies as dpkg-shlibdeps finds them; libc6 and libgcc-s1 without dpkg-dev.
depends="libc6, libgcc-s1"
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
  shlib=$(mktemp -d)
  mkdir -p "$shlib/debian"
  printf 'Source: hoist\n\nPackage: hoist\nArchitecture: any\n' >"$shlib/debian/control"
  found=$(cd "$shlib" && dpkg-shlibdeps -O "$root/usr/bin/hoist" 2>/dev/null | sed -n 's/^shlibs:Depends=//p') || true
  rm -rf "$shlib"
  [ -z "$found" ] || depends="$found"
fi
# The unit's ExecReload runs /bin/kill.
depends="$depends, procps"

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: hoist
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $depends
Recommends: docker.io | docker-ce
Section: admin
Priority: optional
Description: per-node Docker container manager
 One hoist agent per machine keeps a declared set of Docker containers
 running, health-checked and up to date, each with its own state machine,
 driven by Docker events, health probes, a key-value store holding the
 desired image tag, and operator commands. Governors limit how many
 instances pull or restart at once. A single node keeps its state in an
 embedded store; a fleet shares NATS JetStream. Container data is Puppet
 Hiera data (hoist::containers).
CONTROL

deb="$out/hoist_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
echo "$deb"
