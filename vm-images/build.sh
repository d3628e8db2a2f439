#!/usr/bin/env bash
# Build the nbdcache test guest into vm-images/cache/.
#
# Theory of operation
#   The guest is a kernel and an initramfs, nothing else: no root disk, no
#   network.  Three steps, each skipped when its output already exists:
#
#     kernel     Debian's cloud kernel (linux-image-cloud-amd64 resolved to the
#                versioned package), vmlinuz and the virtio modules extracted
#                from the .deb with dpkg-deb | tar, no root tricks.
#     fio        a static fio built from Debian's source package (a private
#                deb-src list under cache/apt/ leaves the system's apt alone);
#                if that fails, Debian's dynamic fio with its ldd closure.
#     initramfs  busybox-static, e2fsprogs (ldd closure), fio, the modules and
#                vm-images/init, packed with busybox cpio (sorted list, fixed
#                mtimes, owner 0:0) and zstd.  A stamp holds the hash of every
#                input, so editing init rebuilds only this step.
#
#   Outputs (fixed names, read by boot.sh and nbdcache/vm.py):
#     cache/vmlinuz  cache/initramfs.img  cache/image.txt (what was built)
#
#   Logs of the noisy steps go to cache/logs/; progress lines start with
#   "[vm-images]".  An flock on cache/.lock serialises concurrent builds.
#
# Usage: vm-images/build.sh [--force]   (--force rebuilds every step)

set -euo pipefail
umask 022
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${NBDCACHE_VM_CACHE:-$HERE/cache}
INIT=$HERE/init
LOGS=$CACHE/logs

# Modules in insmod order (each after the ones its depends= names).
# button and evdev are optional (ACPI power button).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
         button evdev)
REQUIRED_MODULES=(virtio_ring virtio virtio_pci virtio_blk)

# Fixed mtime of every file in the initramfs (2024-01-01T00:00:00Z).
EPOCH=1704067200

FIO_BUILD_DEPS=(dpkg-dev build-essential pkg-config libaio-dev zlib1g-dev)

say() { printf '[vm-images] %s\n' "$*"; }
die() { printf '[vm-images] error: %s\n' "$*" >&2; exit 1; }

force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (usage: build.sh [--force])" ;;
esac

mkdir -p "$CACHE" "$LOGS"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another build holds $CACHE/.lock, waiting ..."
    flock 9
fi

# run_logged LOG CMD...: run CMD with its output in LOG; on failure show the tail.
run_logged() {
    local log=$1 rc=0; shift
    "$@" >"$log" 2>&1 || rc=$?
    [ "$rc" = 0 ] && return 0
    printf '[vm-images] command failed (exit %d): %s\n' "$rc" "$*" >&2
    tail -n 20 "$log" | sed 's/^/[vm-images]   | /' >&2
    return "$rc"
}

# is_static FILE: true if FILE is a statically linked executable.
is_static() {
    local out
    out=$(ldd "$1" 2>&1 || true)
    case "$out" in
        *"not a dynamic executable"*|*"statically linked"*) return 0 ;;
        *) return 1 ;;
    esac
}

apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        say "running apt-get update ..."
        run_logged "$LOGS/apt-update.log" apt-get update || return
        apt_updated=1
    fi
}

# with_apt_retry CMD...: run an apt command; on failure apt-get update once and retry.
with_apt_retry() {
    local log
    log=$LOGS/apt-$(date +%s%N).log
    if "$@" >"$log" 2>&1; then
        rm -f "$log"; return 0
    fi
    say "apt command failed, refreshing package lists and retrying: $*"
    apt_update || return
    run_logged "$log" "$@" || return
    rm -f "$log"
}

ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]} ..."
        with_apt_retry env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "${missing[@]}" || return
    fi
}

# ---------------------------------------------------------------- kernel
resolve_kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true
}

download_deb() {
    (cd "$CACHE/debs" && run_logged "$LOGS/apt-download.log" \
        apt-get -o APT::Sandbox::User=root download "$1")
}

build_kernel() {
    local kdir=$CACHE/kernel
    if [ "$force" = 0 ] && [ -f "$kdir/kernel.stamp" ] && [ -f "$CACHE/vmlinuz" ]; then
        say "kernel: cached ($(cat "$kdir/kernel.stamp"))"
        return
    fi
    say "kernel: resolving linux-image-cloud-amd64 ..."
    local pkg deb
    pkg=$(resolve_kernel_package)
    if [ -z "$pkg" ]; then
        apt_update
        pkg=$(resolve_kernel_package)
    fi
    [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 to a versioned package"
    mkdir -p "$CACHE/debs"
    deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
    if [ -n "$deb" ]; then
        say "kernel: $(basename "$deb") already downloaded"
    else
        say "kernel: downloading $pkg ..."
        if ! download_deb "$pkg"; then
            # Stale package lists name a package the mirror no longer has.
            say "kernel: download failed, refreshing package lists and retrying ..."
            apt_update
            pkg=$(resolve_kernel_package)
            [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 to a versioned package"
            download_deb "$pkg" || die "apt-get download $pkg failed (see $LOGS/apt-download.log)"
        fi
        deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb | head -n 1)
    fi

    say "kernel: extracting vmlinuz and modules from $(basename "$deb") ..."
    rm -rf "$kdir"
    mkdir -p "$kdir/x" "$kdir/modules"
    dpkg-deb --fsys-tarfile "$deb" \
        | tar -x -C "$kdir/x" --wildcards './boot/vmlinuz-*' \
              './lib/modules/*/kernel/drivers/virtio/*' \
              './lib/modules/*/kernel/drivers/block/virtio_blk.ko*' \
              './lib/modules/*/kernel/drivers/acpi/button.ko*' \
              './lib/modules/*/kernel/drivers/input/evdev.ko*'
    local vmlinuz kver m f
    vmlinuz=$(ls "$kdir"/x/boot/vmlinuz-* | head -n 1)
    kver=${vmlinuz##*/vmlinuz-}
    for m in "${MODULES[@]}"; do
        f=$(find "$kdir/x/lib/modules" -name "$m.ko*" | head -n 1)
        if [ -z "$f" ]; then
            say "kernel: module $m not found (built in or absent), skipping"
            continue
        fi
        case "$f" in
            *.ko.xz) xz -dc "$f" >"$kdir/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$kdir/modules/$m.ko" ;;
            *.ko) cp "$f" "$kdir/modules/$m.ko" ;;
        esac
        echo "$m" >>"$kdir/modules/order"
    done
    for m in "${REQUIRED_MODULES[@]}"; do
        [ -f "$kdir/modules/$m.ko" ] || die "required module $m missing from $pkg"
    done
    cp "$vmlinuz" "$CACHE/vmlinuz.tmp"
    mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
    rm -rf "$kdir/x"
    echo "$pkg $kver" >"$kdir/kernel.stamp"
    say "kernel: $pkg ($kver), $(wc -l <"$kdir/modules/order") modules"
}

# ---------------------------------------------------------------- fio
fio_configure_flags() {
    # Disable every optional engine and library configure knows about, so
    # that the static link needs nothing beyond libc, libaio and zlib.
    local help=$1 flags=() opt
    for opt in rdma rados rbd http gfapi libnfs pmem gfio xnvme libblkio dfs \
               libzbc tcmalloc numa libiscsi nbd lex ipv6 tls-check; do
        if grep -q -- "--disable-$opt\b" "$help"; then
            flags+=("--disable-$opt")
        fi
    done
    echo "${flags[@]}"
}

# Every step ends in "|| return 1": the caller tests this function in an if,
# where bash ignores set -e.
build_fio_static() {
    local fdir=$1 apt=$CACHE/apt
    ensure_packages "${FIO_BUILD_DEPS[@]}" || return 1

    local codename mirror
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ { print $2; exit }' \
             /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources.list.d"
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$mirror" "$codename" >"$apt/sources.list"
    local aptopts=(-o "Dir::Etc::SourceList=$apt/sources.list"
                   -o "Dir::Etc::SourceParts=$apt/sources.list.d"
                   -o "Dir::State::Lists=$apt/lists"
                   -o "Dir::Cache=$apt/cache"
                   -o "APT::Sandbox::User=root")

    local src=$fdir/src
    if ! ls "$fdir"/dl/fio_*.dsc >/dev/null 2>&1; then
        if ! ls "$apt"/lists/*Sources* >/dev/null 2>&1; then
            say "fio: fetching the deb-src index for $codename (private list in cache/apt) ..."
            run_logged "$LOGS/apt-src-update.log" apt-get "${aptopts[@]}" update || return 1
        fi
        say "fio: downloading the fio source package ..."
        mkdir -p "$fdir/dl"
        if ! (cd "$fdir/dl" && apt-get "${aptopts[@]}" source --download-only fio \
                >"$LOGS/apt-source.log" 2>&1); then
            say "fio: download failed, refreshing the deb-src index and retrying ..."
            run_logged "$LOGS/apt-src-update.log" apt-get "${aptopts[@]}" update || return 1
            (cd "$fdir/dl" && run_logged "$LOGS/apt-source.log" \
                apt-get "${aptopts[@]}" source --download-only fio) || return 1
        fi
    fi
    rm -rf "$src"
    say "fio: unpacking $(basename "$(ls "$fdir"/dl/fio_*.dsc)") ..."
    run_logged "$LOGS/fio-unpack.log" dpkg-source --no-check -x "$(ls "$fdir"/dl/fio_*.dsc)" "$src" || return 1

    (cd "$src" && ./configure --help >"$LOGS/fio-configure-help.txt" 2>&1) || true
    local flags
    flags=$(fio_configure_flags "$LOGS/fio-configure-help.txt")
    say "fio: configure --build-static --disable-native $flags ..."
    # shellcheck disable=SC2086  # flags is a word list by construction
    (cd "$src" && run_logged "$LOGS/fio-configure.log" \
        ./configure --build-static --disable-native $flags) || return 1
    say "fio: compiling (make -j$(nproc), ~20-60 s) ..."
    # No LDFLAGS on the make command line: it would override configure's -static.
    (cd "$src" && run_logged "$LOGS/fio-make.log" make -j"$(nproc)" fio) || return 1
    if ! is_static "$src/fio"; then
        say "fio: the build is not static:"
        ldd "$src/fio" | sed 's/^/[vm-images]   | /'
        return 1
    fi
    strip "$src/fio" || return 1
    install -m 0755 "$src/fio" "$fdir/fio" || return 1
}

build_fio() {
    local fdir=$CACHE/fio
    if [ "$force" = 0 ] && [ -f "$fdir/fio" ] && [ -f "$fdir/fio.kind" ]; then
        say "fio: cached ($(cat "$fdir/fio.kind"))"
        return
    fi
    mkdir -p "$fdir"
    rm -f "$fdir/fio" "$fdir/fio.kind"
    if build_fio_static "$fdir"; then
        echo "static $("$fdir/fio" --version)" >"$fdir/fio.kind"
        rm -rf "$fdir/src" "$fdir"/*.orig.tar.*
    else
        say "fio: WARNING: static build failed (logs in $LOGS), falling back to Debian's"
        say "fio: dynamic /usr/bin/fio with its ldd closure (a much larger initramfs)"
        ensure_packages fio
        install -m 0755 /usr/bin/fio "$fdir/fio"
        echo "dynamic $(/usr/bin/fio --version)" >"$fdir/fio.kind"
    fi
    say "fio: $(cat "$fdir/fio.kind"), $(du -h "$fdir/fio" | cut -f1)"
}

# ---------------------------------------------------------------- initramfs
# Host binaries put in the guest, at the same paths (shared libs follow them).
GUEST_BINARIES=(/sbin/mke2fs /sbin/e2fsck)

# lib_closure FILE...: the shared libraries (and loader) the files need.
lib_closure() {
    local f
    for f in "$@"; do
        ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' || true
    done | sort -u
}

initramfs_inputs() {
    local kind
    kind=$(cut -d' ' -f1 "$CACHE/fio/fio.kind")
    echo "$INIT"
    echo "$HERE/build.sh"    # the layout is defined here
    echo /bin/busybox
    printf '%s\n' "${GUEST_BINARIES[@]}"
    echo "$CACHE/fio/fio"
    ls "$CACHE"/kernel/modules/*
    if [ "$kind" = dynamic ]; then
        lib_closure "${GUEST_BINARIES[@]}" "$CACHE/fio/fio"
    else
        lib_closure "${GUEST_BINARIES[@]}"
    fi
}

initramfs_stamp() {
    {
        echo "epoch $EPOCH"
        initramfs_inputs | while read -r f; do
            printf '%s %s\n' "$f" "$(sha256sum <"$(readlink -f "$f")" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -d' ' -f1
}

build_initramfs() {
    [ -f "$INIT" ] || die "missing $INIT"
    local stamp
    stamp=$(initramfs_stamp)
    if [ "$force" = 0 ] && [ -f "$CACHE/initramfs.img" ] \
       && [ "$(cat "$CACHE/initramfs.stamp" 2>/dev/null)" = "$stamp" ]; then
        say "initramfs: cached ($(du -h "$CACHE/initramfs.img" | cut -f1), stamp ${stamp:0:12})"
        return
    fi
    say "initramfs: assembling the guest root ..."
    local root=$CACHE/rootfs
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,etc,lib/modules}
    install -m 0755 "$INIT" "$root/init"
    install -m 0755 /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    ln -s mke2fs "$root/sbin/mkfs.ext4"
    local f lib
    for f in "${GUEST_BINARIES[@]}"; do
        install -D -m 0755 "$(readlink -f "$f")" "$root$f"
    done
    install -m 0755 "$CACHE/fio/fio" "$root/usr/bin/fio"
    local closure=("${GUEST_BINARIES[@]}")
    if grep -q '^dynamic' "$CACHE/fio/fio.kind"; then
        closure+=(/usr/bin/fio)
    fi
    while read -r lib; do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done < <(lib_closure "${closure[@]}")
    install -m 0644 "$CACHE"/kernel/modules/*.ko "$root/lib/modules/"
    install -m 0644 "$CACHE/kernel/modules/order" "$root/lib/modules/order"
    cut -d' ' -f2 "$CACHE/kernel/kernel.stamp" >"$root/etc/kernel-release"
    cp "$CACHE/fio/fio.kind" "$root/etc/fio-kind"

    say "initramfs: packing with busybox cpio + zstd ..."
    find "$root" -exec touch -h -d "@$EPOCH" {} +
    (cd "$root" && find . -mindepth 1 | sort \
        | busybox cpio -o -H newc -R 0:0 2>/dev/null) \
        | zstd -q -19 -T1 -c >"$CACHE/initramfs.img.tmp"
    mv "$CACHE/initramfs.img.tmp" "$CACHE/initramfs.img"
    echo "$stamp" >"$CACHE/initramfs.stamp"
    say "initramfs: $(find "$root" -type f | wc -l) files, $(du -sh "$root" | cut -f1) unpacked," \
        "$(du -h "$CACHE/initramfs.img" | cut -f1) compressed, sha256" \
        "$(sha256sum "$CACHE/initramfs.img" | cut -c1-12)"
    rm -rf "$root"
}

write_summary() {
    {
        echo "kernel: $(cat "$CACHE/kernel/kernel.stamp")"
        echo "modules: $(tr '\n' ' ' <"$CACHE/kernel/modules/order")"
        echo "fio: $(cat "$CACHE/fio/fio.kind")"
        echo "vmlinuz: $(stat -c %s "$CACHE/vmlinuz") bytes"
        echo "initramfs: $(stat -c %s "$CACHE/initramfs.img") bytes, stamp $(cat "$CACHE/initramfs.stamp")"
    } >"$CACHE/image.txt.tmp"
    mv "$CACHE/image.txt.tmp" "$CACHE/image.txt"
}

t0=$(date +%s.%N)
for tool in dpkg-deb tar zstd busybox ldd flock; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
is_static /bin/busybox || ensure_packages busybox-static
[ -x /sbin/mke2fs ] || ensure_packages e2fsprogs

build_kernel
build_fio
build_initramfs
write_summary
say "done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s:" \
    "$CACHE/vmlinuz $CACHE/initramfs.img"
