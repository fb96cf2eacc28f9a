#!/usr/bin/env bash
# Builds hoist's offline test images and serves them from a local registry:
#   $HOIST_TEST_REGISTRY/hoist/test:{v1,v2,v3,broken,hc}
# v1/v2/v3 run busybox httpd on port 80 serving their tag; broken exits 3 at once; hc is v1 with a Docker
# HEALTHCHECK that fails once /tmp/unhealthy exists. No internet needed: the images are made from the
# busybox-static package and the registry is Debian's docker-registry. Idempotent; fast when done.
set -euo pipefail

REG="${HOIST_TEST_REGISTRY:-127.0.0.1:5000}"
DIR="${HOIST_FIXTURES_DIR:-/tmp/hoist-fixtures}"
REPO="$REG/hoist/test"
BUSYBOX=/bin/busybox # shipped by busybox-static (dpkg -L busybox-static)

mkdir -p "$DIR"

registry_up() { curl -fsS "http://$REG/v2/" >/dev/null 2>&1; }

if ! registry_up; then
  command -v docker-registry >/dev/null || { echo "fixtures: docker-registry is not installed (apt-get install docker-registry)" >&2; exit 1; }
  mkdir -p "$DIR/registry"
  cat >"$DIR/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $DIR/registry
  delete:
    enabled: true
http:
  addr: $REG
EOF
  # Its own session, so it outlives the shell that started it (a CI step, a test script).
  setsid nohup docker-registry serve "$DIR/registry.yml" </dev/null >"$DIR/registry.log" 2>&1 &
  for _ in $(seq 1 100); do
    registry_up && break
    sleep 0.2
  done
  registry_up || { echo "fixtures: registry did not answer on http://$REG/v2/ (see $DIR/registry.log)" >&2; exit 1; }
  echo "fixtures: registry started on $REG"
fi

# True when the registry already serves the tag; then the image is not built again.
in_registry() {
  curl -fs -o /dev/null "http://$REG/v2/hoist/test/manifests/$1" \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json'
}

# A minimal rootfs: static busybox, its applet symlinks, /www/index.html holding $1, and /tmp.
make_rootfs() {
  local root="$DIR/rootfs-$1"
  rm -rf "$root"
  mkdir -p "$root/bin" "$root/www" "$root/tmp"
  chmod 1777 "$root/tmp"
  cp "$BUSYBOX" "$root/bin/busybox"
  local applet
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  echo "$1" >"$root/www/index.html"
  echo "$root"
}

HTTPD_CMD='CMD ["/bin/httpd","-f","-p","80","-h","/www"]'

# import_image TAG CONTENT CMD: builds the rootfs and imports it as $REPO:TAG.
import_image() {
  local root
  root=$(make_rootfs "$2")
  tar -C "$root" -c . | docker import --change "$3" - "$REPO:$1" >/dev/null
  rm -rf "$root"
}

push() {
  docker push -q "$REPO:$1" >/dev/null
  echo "fixtures: $REPO:$1 pushed"
}

for tag in v1 v2 v3 broken hc; do
  if in_registry "$tag"; then
    echo "fixtures: $REPO:$tag present"
    continue
  fi
  case "$tag" in
    v1 | v2 | v3) import_image "$tag" "$tag" "$HTTPD_CMD" ;;
    broken) import_image broken broken 'CMD ["/bin/sh","-c","echo broken >&2; exit 3"]' ;;
    hc)
      # docker import's --change does not take HEALTHCHECK, so hc is a classic build on top of v1.
      docker image inspect "$REPO:v1" >/dev/null 2>&1 || docker pull -q "$REPO:v1" >/dev/null
      ctx="$DIR/hc-context"
      mkdir -p "$ctx"
      cat >"$ctx/Dockerfile" <<EOF
FROM $REPO:v1
HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD ["/bin/sh","-c","test -f /www/index.html && ! test -f /tmp/unhealthy"]
EOF
      # The legacy builder warns that it is deprecated; keep its output for failures only.
      DOCKER_BUILDKIT=0 docker build -q -t "$REPO:hc" "$ctx" >"$DIR/hc-build.log" 2>&1 ||
        { cat "$DIR/hc-build.log" >&2; exit 1; }
      ;;
  esac
  push "$tag"
done

# hoist/systemd-test:bookworm: a minimal Debian 12 booting systemd as PID 1, for the test that runs the
# packaged unit under a real systemd (crates/hoist/tests/package.rs). Made with debootstrap from the
# Debian archive apt uses here, so no image registry is needed. Built once; kept as a local image.
SYSTEMD_IMAGE=hoist/systemd-test:bookworm
if docker image inspect "$SYSTEMD_IMAGE" >/dev/null 2>&1; then
  echo "fixtures: $SYSTEMD_IMAGE present"
else
  command -v debootstrap >/dev/null || { echo "fixtures: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  root="$DIR/systemd-rootfs"
  rm -rf "$root"
  # shellcheck disable=SC2086 # no mirror: debootstrap's default
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps bookworm "$root" $mirror \
    >"$DIR/debootstrap.log" 2>&1 || { tail -20 "$DIR/debootstrap.log" >&2; exit 1; }
  tar -C "$root" -c . | docker import --change 'ENV container=docker' --change 'CMD ["/lib/systemd/systemd"]' - "$SYSTEMD_IMAGE" >/dev/null
  rm -rf "$root"
  echo "fixtures: $SYSTEMD_IMAGE built"
fi

# Tests that roll a container to v2 must really pull it from the registry: drop the local copy (kept
# if a container still uses it).
docker rmi -f "$REPO:v2" "$REPO:v3" >/dev/null 2>&1 || true
