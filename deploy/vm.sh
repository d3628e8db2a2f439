#!/bin/sh
# The vm service of compose.yaml: build the test guest if needed, then boot it
# against nbdcache's socket with vm-images/boot.sh.
#
# Arguments are passed to boot.sh after --socket; the default command in
# compose.yaml is `--workload fs --timeout 600`.  NBDCACHE_VM_CACHE (set in
# compose.yaml to a named volume) holds the kernel and initramfs, so the build
# (which downloads Debian's kernel and compiles a static fio; see
# vm-images/README.md) runs once per volume and is a no-op afterwards.
#
# Environment (defaults in brackets):
#   NBDCACHE_SOCKET  the NBD socket to boot from [/run/nbdcache/nbdcache.sock]
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
socket=${NBDCACHE_SOCKET:-/run/nbdcache/nbdcache.sock}

"$here/vm-images/build.sh"
exec "$here/vm-images/boot.sh" --socket "$socket" "$@"
