#!/usr/bin/env bash
# Boot the nbdcache test guest against an NBD server on a Unix socket.
#
# Usage: boot.sh --socket PATH --workload NAME [--timeout S] [--qmp PATH]
#                [--serial-log FILE] [--mem MB] [--reconnect-delay S]
#                [--param KEY=VALUE]...
#
#   --socket PATH        NBD server's Unix socket (e.g. nbdkit -U PATH)
#   --workload NAME      smoke | fs | fio | fsync (see vm-images/README.md)
#   --timeout S          hard limit on the whole QEMU run (default 300)
#   --qmp PATH           also serve QMP on this Unix socket
#   --serial-log FILE    serial console to FILE instead of stdout
#   --mem MB             guest memory (default 512)
#   --reconnect-delay S  how long QEMU retries a lost NBD connection before
#                        failing I/O (default 5)
#   --param KEY=VALUE    extra guest setting, passed as nbdcache.KEY=VALUE
#                        (size_mb, runtime, timeout, hold)
#
# Exits 0 if the guest printed a result line with "ok": true, 1 if it printed
# one with "ok": false, 2 if no result line appeared (timeout, QEMU failure).
# The image must have been built with vm-images/build.sh.  The QEMU command
# line is the same one nbdcache/vm.py builds.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${NBDCACHE_VM_CACHE:-$HERE/cache}

die() { printf 'boot.sh: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

socket='' workload='' timeout_s=300 qmp='' serial_log='' mem=512 reconnect=5 params=()
while [ $# -gt 0 ]; do
    case "$1" in
        --socket) socket=${2:?}; shift 2 ;;
        --workload) workload=${2:?}; shift 2 ;;
        --timeout) timeout_s=${2:?}; shift 2 ;;
        --qmp) qmp=${2:?}; shift 2 ;;
        --serial-log) serial_log=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --reconnect-delay) reconnect=${2:?}; shift 2 ;;
        --param) params+=("nbdcache.${2:?}"); shift 2 ;;
        -h|--help) usage 0 ;;
        *) printf 'boot.sh: unknown argument %s\n' "$1" >&2; usage 2 ;;
    esac
done
[ -n "$socket" ] || die "--socket is required"
[ -n "$workload" ] || die "--workload is required"
[ -S "$socket" ] || die "no Unix socket at $socket (is the NBD server running?)"
for f in "$CACHE/vmlinuz" "$CACHE/initramfs.img"; do
    [ -f "$f" ] || die "missing $f: run vm-images/build.sh first"
done

# TCG unless the CPU has hardware virtualisation and KVM is not kvm_pvm, a
# software hypervisor under which the Debian kernel fails.
accel=tcg,thread=multi
if grep -Eqw 'vmx|svm' /proc/cpuinfo && [ ! -e /sys/module/kvm_pvm ] && [ -w /dev/kvm ]; then
    accel=kvm
fi

# The guest's watchdog fires before the host's timeout, so a stuck workload
# still reports itself.
guest_timeout=$((timeout_s > 40 ? timeout_s - 20 : timeout_s))
append="console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off nbdcache.workload=$workload"
append+=" nbdcache.timeout=$guest_timeout ${params[*]}"

blockdev=$(printf '{"driver":"nbd","node-name":"nbd0","server":{"type":"unix","path":"%s"},"discard":"unmap","reconnect-delay":%d,"open-timeout":10}' \
    "$socket" "$reconnect")

# shellcheck disable=SC2054  # the commas belong to QEMU's option syntax
qemu=(qemu-system-x86_64
      -accel "$accel" -machine q35 -cpu max -smp 1 -m "$mem"
      -nodefaults -no-user-config -display none -no-reboot
      -bios /usr/share/qemu/qboot.rom
      -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.img" -append "$append"
      -blockdev "$blockdev"
      -device virtio-blk-pci,drive=nbd0,write-cache=on,rerror=report,werror=report
      -serial stdio)
[ -n "$qmp" ] && qemu+=(-qmp "unix:$qmp,server=on,wait=off")

log=${serial_log:-$(mktemp /tmp/nbdcache-serial.XXXXXX)}
echo "boot.sh: booting workload $workload (accel $accel, timeout $timeout_s s, serial log $log)" >&2
start=$(date +%s.%N)
rc=0
if [ -n "$serial_log" ]; then
    timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null >"$log" 2>&1 || rc=$?
else
    timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 | tee "$log" || rc=$?
fi
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

result=$(grep -a -o 'NBDCACHE-RESULT {.*}' "$log" | tail -n 1 || true)
[ -z "$serial_log" ] && rm -f "$log"
if [ -z "$result" ]; then
    what="QEMU exited with status $rc"
    [ "$rc" = 124 ] && what="timed out after $timeout_s s"
    echo "boot.sh: no NBDCACHE-RESULT line from the guest ($what, $secs s)" >&2
    [ -n "$serial_log" ] && tail -n 15 "$serial_log" | sed 's/^/boot.sh:   | /' >&2
    exit 2
fi
echo "boot.sh: result after $secs s" >&2
[ -n "$serial_log" ] && echo "$result"
case "$result" in
    *'"ok": true'*) exit 0 ;;
    *) exit 1 ;;
esac
