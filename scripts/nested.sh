#!/usr/bin/env bash
# Run a `vmm` command line on a nested KVM host inside QEMU (docs/nested.md).
#
#   scripts/nested.sh --host npt        -- bench --repeat 3
#   scripts/nested.sh --host kvm-shadow -- test --mmu all
#   scripts/nested.sh --three-way [--out DIR] [-- BENCH ARGS]
#
# QEMU in TCG (software) mode emulates an AMD CPU with SVM and nested paging;
# a stock Debian kernel inside it loads kvm_amd with npt=1 (an NPT host) or
# npt=0 (KVM's own shadow MMU), and runs the vmm binary there. The kernel
# package is fetched with `apt-get download` and unpacked into a cache under
# target/nested (never installed into /boot); the initramfs (busybox, the vmm
# binary with the libraries ldd lists and the dynamic loader, the modules) is
# cached by content, so a second run costs only the boot.
#
# The nested console streams to stdout. The inner command's exit code is this
# script's exit code. Files the command writes (--out, --json, --stats-json,
# --svg, and bench's default bench-report/) come back through a 9p share.
# This script's own failures are one line on stderr and exit 2 (usage),
# 3 (setup: QEMU, kernel, SVM/NPT, kvm_amd, init) or 5 (timeout).
set -uo pipefail

prog=nested
usage_text="usage: scripts/nested.sh --host npt|kvm-shadow [options] -- VMM ARGS...
       scripts/nested.sh --three-way [options] [-- BENCH ARGS...]

Runs a vmm command line on a nested KVM host inside QEMU (TCG).

  --host NAME        npt: kvm_amd npt=1 (hardware-style nested paging, QEMU's model)
                     kvm-shadow: kvm_amd npt=0 (KVM's own shadow MMU)
  --three-way        vmm bench on both hosts, then one combined report
                     (NPT, KVM's shadow MMU, our shadow and pv MMUs on each host)
  --out DIR          --three-way: where the report goes [default: nested-report]
  --timeout SECS     end QEMU after this many seconds [default: 1800]
  --memory SIZE      QEMU's RAM [default: 2G]
  --cpu MODEL        QEMU's CPU model [default: EPYC,+svm,+npt]
  --smp N            QEMU's CPUs (multi-threaded TCG when N > 1) [default: the
                     --vcpus N of the vmm command line, else 1]
  -h, --help         this help

Environment: VMM_BIN (the vmm binary to run [default: cargo build --release]),
NESTED_CACHE (kernel/initramfs cache [default: target/nested]).
Exit codes: the inner command's; 2 usage, 3 setup, 5 timeout (this script's own)."

die() { # die CODE MESSAGE: one line, non-zero exit
    echo "$prog: error: $2" >&2
    exit "$1"
}
usage_error() {
    echo "$prog: error: $1" >&2
    echo "(scripts/nested.sh --help shows the options)" >&2
    exit 2
}

host=""
three_way=0
report_dir="nested-report"
timeout_s=1800
qemu_mem=2G
cpu="EPYC,+svm,+npt"
smp=""
vmm_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --host) [ $# -ge 2 ] || usage_error "--host needs a value: npt or kvm-shadow"; host=$2; shift 2 ;;
        --host=*) host=${1#--host=}; shift ;;
        --three-way) three_way=1; shift ;;
        --out) [ $# -ge 2 ] || usage_error "--out needs a folder"; report_dir=$2; shift 2 ;;
        --timeout) [ $# -ge 2 ] || usage_error "--timeout needs a number of seconds"; timeout_s=$2; shift 2 ;;
        --memory) [ $# -ge 2 ] || usage_error "--memory needs a size (2G)"; qemu_mem=$2; shift 2 ;;
        --cpu) [ $# -ge 2 ] || usage_error "--cpu needs a QEMU CPU model"; cpu=$2; shift 2 ;;
        --smp) [ $# -ge 2 ] || usage_error "--smp needs a number of CPUs"; smp=$2; shift 2 ;;
        -h|--help) echo "$usage_text"; exit 0 ;;
        --) shift; vmm_args=("$@"); break ;;
        *) usage_error "unknown option '$1' (the vmm command line goes after --)" ;;
    esac
done
case "$timeout_s" in ''|*[!0-9]*) usage_error "--timeout '$timeout_s' is not a whole number of seconds" ;; esac
[[ "$qemu_mem" =~ ^[0-9]+[MG]$ ]] || usage_error "--memory '$qemu_mem' is not a size like 2G or 1536M"
# QEMU's CPUs: as many as the guest VM's vCPUs unless told (--vcpus N or
# --vcpus=N in the vmm command line), so its vCPU threads run in parallel.
if [ -z "$smp" ]; then
    smp=1
    prev=""
    for a in "${vmm_args[@]}"; do
        case "$a" in --vcpus=*) smp=${a#--vcpus=} ;; esac
        [ "$prev" = "--vcpus" ] && smp=$a
        prev=$a
    done
fi
case "$smp" in ''|*[!0-9]*|0) usage_error "--smp '$smp' is not a number of CPUs (1 or more)" ;; esac
accel=tcg
[ "$smp" -gt 1 ] && accel="tcg,thread=multi"

root=$(cd "$(dirname "$0")/.." && pwd)

if [ "$three_way" = 1 ]; then
    [ -z "$host" ] || usage_error "--three-way runs both hosts: leave out --host"
    case " ${vmm_args[*]-} " in
        *" --out "*|*" --out="*|*" --json "*|*" --json="*|*" --svg "*|*" --svg="*|*" --mmu "*|*" --mmu="*)
            usage_error "--three-way chooses bench's --mmu, --out, --json and --svg itself; pass other bench options" ;;
    esac
    mkdir -p "$report_dir" || die 3 "cannot create $report_dir"
    for h in npt kvm-shadow; do
        echo "== $h host: vmm bench --mmu all ${vmm_args[*]-}"
        "$0" --host "$h" --timeout "$timeout_s" --memory "$qemu_mem" --cpu "$cpu" --smp "$smp" -- \
            bench --mmu all --out "$report_dir/$h-host" "${vmm_args[@]}"
        rc=$?
        [ "$rc" = 0 ] || { echo "$prog: error: vmm bench on the $h host failed (exit $rc)" >&2; exit "$rc"; }
    done
    echo "== three-way report"
    exec "${VMM_BIN:-$root/target/release/vmm}" compare \
        "$report_dir/npt-host/report.json" "$report_dir/kvm-shadow-host/report.json" --out "$report_dir"
fi

case "$host" in
    npt) npt=1 ;;
    kvm-shadow) npt=0 ;;
    "") usage_error "which nested host? --host npt or --host kvm-shadow (or --three-way)" ;;
    *) usage_error "unknown host '$host': expected npt or kvm-shadow" ;;
esac
[ ${#vmm_args[@]} -gt 0 ] || usage_error "no vmm command line: put it after --, e.g. -- test --mmu all"

cache=${NESTED_CACHE:-$root/target/nested}
mkdir -p "$cache" || die 3 "cannot create the cache folder $cache"

# --- packages -----------------------------------------------------------
apt_updated=0
apt_update_once() {
    [ "$apt_updated" = 1 ] && return 0
    apt_updated=1
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$cache/apt.log" 2>&1
}
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
static_busybox() { # a statically linked busybox with insmod (the initramfs has no libc for it)
    [ -x /bin/busybox ] || return 1
    local applets linkage
    applets=$(/bin/busybox --list 2>/dev/null)
    linkage=$(ldd /bin/busybox 2>&1)
    [[ $'\n'"$applets"$'\n' == *$'\n'insmod$'\n'* && "$linkage" == *"not a dynamic"* ]]
}
static_busybox || missing+=(busybox-static)
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die 3 "missing ${missing[*]}: install with 'apt-get install ${missing[*]}' (as root)"
    fi
    echo "$prog: installing ${missing[*]}" >&2
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$cache/apt.log" 2>&1 \
        || die 3 "cannot install ${missing[*]} with apt-get (log: $cache/apt.log)"
fi

# --- the kernel: a stock Debian linux-image, unpacked, never installed ----
modules_needed="irqbypass kvm ccp kvm-amd netfs fscache 9pnet 9p virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet_virtio"
kdir="$cache/kernel"
if [ ! -f "$kdir/vmlinuz" ] || [ ! -f "$kdir/version" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        apt_update_once
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || die 3 "apt-cache knows no linux-image-amd64 kernel package (a Debian apt source is needed)"
    echo "$prog: fetching $pkg (once; cached in $kdir)" >&2
    tmp=$(mktemp -d "$cache/kernel-fetch.XXXXXX")
    (cd "$tmp" && apt-get download "$pkg" >"$tmp/download.log" 2>&1) \
        || die 3 "apt-get download $pkg failed (log: $tmp/download.log)"
    dpkg-deb -x "$tmp"/*.deb "$tmp/root" || die 3 "dpkg-deb cannot unpack $pkg"
    rm -rf "$kdir" && mkdir -p "$kdir/modules"
    cp "$tmp"/root/boot/vmlinuz-* "$kdir/vmlinuz" || die 3 "$pkg holds no vmlinuz"
    for m in $modules_needed; do
        f=$(find "$tmp"/root/lib/modules -name "$m.ko" -o -name "$m.ko.xz" | head -1)
        [ -n "$f" ] || die 3 "$pkg has no module $m"
        case "$f" in *.xz) xz -dc "$f" >"$kdir/modules/$m.ko" ;; *) cp "$f" "$kdir/modules/$m.ko" ;; esac
    done
    echo "$pkg" >"$kdir/version"
    rm -rf "$tmp"
fi
kversion=$(cat "$kdir/version")

# --- the vmm binary -------------------------------------------------------
if [ -n "${VMM_BIN:-}" ]; then
    vmm=$VMM_BIN
else
    (cd "$root" && cargo build --release -q -p vmm) || die 3 "cargo build --release failed"
    vmm=$root/target/release/vmm
fi
[ -x "$vmm" ] || die 3 "no vmm binary at $vmm"

# --- initramfs, cached by content -----------------------------------------
read -r -d '' init_script <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "NESTED:INIT"
fail() { echo "NESTED:FAIL:$1"; poweroff -f; sleep 10; }
. /run/params
grep -qw svm /proc/cpuinfo || fail "QEMU's CPU model has no SVM (try --cpu EPYC,+svm,+npt)"
if [ "$NPT" = 1 ]; then grep -qw npt /proc/cpuinfo || fail "QEMU's CPU model has no NPT (try --cpu EPYC,+svm,+npt)"; fi
for m in irqbypass kvm ccp; do
    insmod /lib/modules/$m.ko 2>/tmp/err || fail "cannot load $m: $(cat /tmp/err) $(dmesg | tail -1)"
done
insmod /lib/modules/kvm-amd.ko npt=$NPT 2>/tmp/err || fail "kvm_amd refused to load (npt=$NPT): $(cat /tmp/err); kernel: $(dmesg | tail -1)"
[ -c /dev/kvm ] || fail "kvm_amd loaded but /dev/kvm is missing"
got=$(cat /sys/module/kvm_amd/parameters/npt)
case "$NPT$got" in 1Y|11|0N|00) ;; *) fail "kvm_amd runs with npt=$got, not npt=$NPT" ;; esac
for m in netfs fscache 9pnet 9p virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet_virtio; do
    insmod /lib/modules/$m.ko 2>/tmp/err || fail "cannot load $m (for the 9p share): $(cat /tmp/err)"
done
mkdir -p /share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /share 2>/tmp/err \
    || fail "cannot mount the 9p share: $(cat /tmp/err)"
cd /share/work
echo "NESTED:RUN"
# Through a pipe, so that the vmm's progress bar (drawn only on a
# terminal) stays out of the console log.
{ sh /run/cmd; echo $? >/tmp/rc; } 2>&1 | cat
rc=$(cat /tmp/rc)
cd /
sync
umount /share
echo "NESTED:EXIT:$rc"
poweroff -f
EOF

key=$( (sha256sum "$vmm" | cut -c1-64; echo "$init_script"; echo "$kversion") | sha256sum | cut -c1-16)
initrd="$cache/initrd-$key.cpio.gz"
if [ ! -f "$initrd" ]; then
    echo "$prog: building the initramfs for $vmm" >&2
    ir=$(mktemp -d "$cache/initrd.XXXXXX")
    mkdir -p "$ir"/{bin,proc,sys,dev,tmp,run,lib/modules}
    cp /bin/busybox "$ir/bin/busybox"
    printf '%s\n' "$init_script" >"$ir/init" && chmod +x "$ir/init"
    # Without debug information: a debug build shrinks from ~100 MB.
    strip --strip-debug -o "$ir/bin/vmm" "$vmm" 2>/dev/null || cp "$vmm" "$ir/bin/vmm"
    # The shared libraries and the dynamic loader, at the paths ldd names.
    for lib in $(ldd "$vmm" | grep -o '/[^ ]*'); do
        mkdir -p "$ir$(dirname "$lib")" && cp -L "$lib" "$ir$lib"
    done
    cp "$kdir"/modules/*.ko "$ir/lib/modules/"
    (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.tmp" || die 3 "cannot build the initramfs"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$ir"
    # Older initramfs images of other binaries stay until the cache is cleaned;
    # keep the five newest.
    ls -t "$cache"/initrd-*.cpio.gz 2>/dev/null | tail -n +6 | xargs -r rm -f
fi

# --- this run: the command, and the share for files in and out ------------
run=$(mktemp -d "$cache/run.XXXXXX")
cleanup() { rm -rf "$run"; }
trap cleanup EXIT
mkdir -p "$run/share/work" "$run/rd/run"

q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
subcommand=${vmm_args[0]}
cmd="/bin/vmm"
outs=() # "share path<TAB>caller's path"
kernels=() # input files copied in
n=0
i=0
while [ $i -lt ${#vmm_args[@]} ]; do
    a=${vmm_args[$i]}
    opt=""; val=""
    case "$a" in
        --out|--json|--stats-json|--svg|--kernel)
            opt=$a
            if [ "$a" = --json ] && [ "$subcommand" = info ]; then opt=""; fi
            if [ -n "$opt" ]; then
                i=$((i + 1))
                [ $i -lt ${#vmm_args[@]} ] || usage_error "$a needs a value"
                val=${vmm_args[$i]}
            fi ;;
        --out=*|--json=*|--stats-json=*|--svg=*|--kernel=*) opt=${a%%=*}; val=${a#*=} ;;
    esac
    if [ -n "$opt" ]; then
        # A relative path stays as it is (the command's working folder maps
        # to the caller's); an absolute one, or one that climbs out with
        # .., goes to files/N in the share and is copied back afterwards.
        case "$val" in
            /*|..|../*|*/../*|*/..) n=$((n + 1)); rel="files/$n/$(basename -- "$val")" ;;
            *) rel=$val ;;
        esac
        mkdir -p "$run/share/work/$(dirname -- "$rel")"
        if [ "$opt" = --kernel ]; then
            [ -f "$val" ] || usage_error "--kernel $val: no such file"
            cp "$val" "$run/share/work/$rel"
            kernels+=("$rel")
        elif [ "$rel" != "$val" ]; then
            outs+=("$rel"$'\t'"$val")
        fi
        cmd="$cmd $opt $(q "$rel")"
    else
        cmd="$cmd $(q "$a")"
    fi
    i=$((i + 1))
done
printf '%s\n' "$cmd" >"$run/rd/run/cmd"
# The console shows the caller's paths, not their stand-ins in the share.
: >"$run/paths.sed"
for o in "${outs[@]}"; do
    from=$(printf '%s' "${o%%$'\t'*}" | sed 's/[]|&\\.*^$[]/\\&/g')
    to=$(printf '%s' "${o#*$'\t'}" | sed 's/[|&\\]/\\&/g')
    printf 's|%s|%s|g\n' "$from" "$to" >>"$run/paths.sed"
done
printf 'NPT=%s\n' "$npt" >"$run/rd/run/params"
(cd "$run/rd" && find . | cpio -o -H newc --quiet | gzip -1) >"$run/params.cpio.gz"
cat "$initrd" "$run/params.cpio.gz" >"$run/initrd.cpio.gz"

# --- boot ------------------------------------------------------------------
log="$cache/last-console.log"
echo "$prog: booting the $host host (QEMU TCG, -cpu $cpu -smp $smp, kvm_amd npt=$npt): $(basename "$vmm") ${vmm_args[*]}" >&2
start=$(date +%s)
timeout -k 10 "$timeout_s" qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m "$qemu_mem" -smp "$smp" \
    -display none -monitor none -serial stdio -no-reboot \
    -kernel "$kdir/vmlinuz" -initrd "$run/initrd.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 oops=panic" \
    -virtfs "local,path=$run/share,mount_tag=share,security_model=none,id=share" \
    </dev/null 2>"$run/qemu.err" \
    | sed -u 's/\r$//' | tee "$log" | sed -u -e '/^NESTED:/d' -e '/reboot: Power down$/d' -f "$run/paths.sed"
qemu_rc=${PIPESTATUS[0]}
elapsed=$(($(date +%s) - start))

if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
    die 5 "timeout: the $host host was still running after ${timeout_s}s (console: $log)"
fi
if ! grep -q '^NESTED:INIT' "$log"; then
    err=$(grep -v -e '^\s*$' -e 'warning:' "$run/qemu.err" | tail -1)
    [ -n "$err" ] && die 3 "QEMU failed before the nested kernel reached init: $err"
    die 3 "the nested kernel did not reach init (QEMU exit $qemu_rc; console: $log)"
fi
failure=$(sed -n 's/^NESTED:FAIL://p' "$log" | head -1)
[ -z "$failure" ] || die 3 "$host host: $failure"
code=$(sed -n 's/^NESTED:EXIT:\([0-9]*\)$/\1/p' "$log" | tail -1)
[ -n "$code" ] || die 3 "the $host host ended before the vmm command did (QEMU exit $qemu_rc; console: $log)"

# --- files back --------------------------------------------------------------
for o in "${outs[@]}"; do
    rel=${o%%$'\t'*}
    dest=${o#*$'\t'}
    src="$run/share/work/$rel"
    [ -e "$src" ] || continue
    if [ -d "$src" ]; then
        mkdir -p "$dest" && cp -r "$src/." "$dest/"
    else
        mkdir -p "$(dirname -- "$dest")" && cp "$src" "$dest"
    fi
done
rm -rf "$run/share/work/files"
for k in "${kernels[@]}"; do rm -f "$run/share/work/$k"; done
# Anything else the command wrote in its working folder (bench's default
# bench-report/) lands in the caller's working folder.
if [ -n "$(ls -A "$run/share/work")" ]; then
    cp -r "$run/share/work/." ./
fi
echo "$prog: the $host host ran the command in ${elapsed}s (boot included); exit code $code" >&2
exit "$code"
