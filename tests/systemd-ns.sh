#!/usr/bin/env bash
# systemd-ns.sh - a real systemd as PID 1 of private pid, mount, cgroup, uts and ipc
# namespaces, for process tests of the systemd VM supervisor on hosts without systemd.
#
#   systemd-ns.sh start NAME     prints the host pid of the namespace's systemd once
#                                `systemctl is-system-running` says running (30 s at most)
#   systemd-ns.sh stop PID NAME  kills it (the kernel kills the whole pid namespace) and
#                                removes its cgroups; idempotent
#
# Enter it with `nsenter -t PID -a CMD...`. Shared with the host: the network namespace
# (daemons inside listen on 127.0.0.1), /tmp (test data dirs), the rest of the root file
# system. Private: /run, /etc/systemd/system, /var/log/journal, /sys/fs/cgroup.
# Each instance gets a sub-cgroup `sdns-NAME` under the caller's cgroup in every hierarchy,
# which becomes the root of the namespace's cgroup tree. Needs root and cgroup v1 (or
# hybrid), as on the CI hosts; adapted from a recipe that boots systemd 252 this way.
# State per instance (host side only): $SYSTEMD_NS_STATE/NAME/{cg,log,unshare.pid}.
set -euo pipefail

STATE=${SYSTEMD_NS_STATE:-${TMPDIR:-/tmp}/blixard-systemd-ns}
SELF=$(readlink -f "$0")

die() { echo "systemd-ns: $*" >&2; exit 1; }

# Runs as PID 1 of the new namespaces, then execs systemd.
inner() {
    # Private writable dirs; the host's are hidden, never written. /tmp stays shared.
    mount -t tmpfs -o mode=755,size=256m tmpfs /run
    mount -t tmpfs -o mode=755 tmpfs /etc/systemd/system
    if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
    # Fresh cgroup mounts, rooted at our cgroup namespace (the per-instance sub-cgroups).
    mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
    local c
    for c in $SDNS_V1; do
        mkdir -p "/sys/fs/cgroup/$c"
        if [ "$c" = systemd ]; then
            mount -t cgroup -o none,name=systemd,xattr cgroup /sys/fs/cgroup/systemd
        else
            mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
        fi
    done
    mkdir -p /sys/fs/cgroup/unified
    mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
    mount -o remount,bind,ro /sys/fs/cgroup
    # Only these unit dirs are searched, so nothing from /lib/systemd/system (udev,
    # remount-fs, sysctl, ...) can be pulled in: journald and empty targets.
    local units=/run/sdns-units t
    mkdir -p $units /run/systemd/system /run/systemd/transient
    cp /lib/systemd/system/systemd-journald.service /lib/systemd/system/systemd-journald.socket $units/
    # No dev-log socket (it would put /dev/log on the shared devtmpfs), no audit socket.
    sed -i 's/^Sockets=.*/Sockets=systemd-journald.socket/' $units/systemd-journald.service
    for t in sysinit basic sockets timers paths local-fs remote-fs network network-online \
        nss-lookup shutdown umount final halt poweroff reboot exit emergency rescue slices; do
        printf '[Unit]\nDescription=%s (stub)\nDefaultDependencies=no\n' "$t" > "$units/$t.target"
    done
    printf '[Slice]\n' > $units/system.slice
    printf '[Unit]\nDescription=systemd-ns\nDefaultDependencies=no\nWants=systemd-journald.service systemd-journald.socket\n' \
        > $units/sdns.target
    # Volatile journal; do not read the host's kernel log.
    mkdir -p /run/systemd/journald.conf.d
    printf '[Journal]\nStorage=volatile\nReadKMsg=no\n' > /run/systemd/journald.conf.d/sdns.conf
    # Mounts inside propagate to the mount namespaces systemd makes for units (and back),
    # as on a booted host, where systemd makes / shared: credentials (LoadCredential=) are
    # written by a helper in a namespace of its own and moved into place. The peer groups
    # are new ones of this namespace (its mounts were made private from the host's by
    # unshare), so nothing propagates to or from the host.
    mount --make-rshared /
    # container=other: systemd skips host-level setup (making / shared, kmod, console,
    # unmounting and remounting on shutdown).
    exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        SYSTEMD_UNIT_PATH=/run/systemd/transient:/etc/systemd/system:/run/systemd/system:$units \
        /lib/systemd/systemd --system --unit=sdns.target --log-target=journal \
        --log-level=info --show-status=no
}

# Host pid -> whether it runs (not gone, not a zombie).
running() { [ -e "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

start() {
    local name=$1 dir=$STATE/$1 c key rel p v1=""
    [ "$(id -u)" = 0 ] || die "needs root"
    [ -x /lib/systemd/systemd ] || die "no /lib/systemd/systemd"
    [ -e "$dir" ] && die "$name exists already ($dir)"
    mkdir -p "$dir"
    : > "$dir/cg"
    # A sub-cgroup in every v1 hierarchy, under the one this script runs in there.
    for c in /sys/fs/cgroup/*/; do
        c=$(basename "$c")
        [ "$c" = unified ] && continue
        if [ "$c" = systemd ]; then key=name=systemd; else key=$c; fi
        rel=$(awk -F: -v k="$key" '$2==k {print $3}' /proc/self/cgroup)
        p=/sys/fs/cgroup/$c${rel%/}/sdns-$name
        mkdir -p "$p"
        echo "$p" >> "$dir/cg"
        v1="$v1 $c"
        if [ "$c" = cpuset ]; then # an empty cpuset refuses tasks: inherit the parent's
            cat "$p/../cpuset.cpus" > "$p/cpuset.cpus"
            cat "$p/../cpuset.mems" > "$p/cpuset.mems"
        fi
    done
    [ -n "$v1" ] || die "no cgroup v1 hierarchies under /sys/fs/cgroup"
    rel=$(awk -F: '$1=="0" {print $3}' /proc/self/cgroup)
    p=/sys/fs/cgroup/unified${rel%/}/sdns-$name
    if [ -d /sys/fs/cgroup/unified ]; then mkdir -p "$p" && echo "$p" >> "$dir/cg"; fi
    (
        for p in $(cat "$dir/cg"); do echo $BASHPID > "$p/cgroup.procs"; done
        export SDNS_V1="$v1"
        # --kill-child: if unshare dies, so does the namespace.
        exec unshare --fork --kill-child --pid --mount --uts --ipc --cgroup --mount-proc \
            --propagation private bash "$SELF" _inner
    ) > "$dir/log" 2>&1 < /dev/null &
    local up=$! pid="" i state=""
    echo $up > "$dir/unshare.pid"
    # PID 1 of the namespace is unshare's child. Before the subshell execs unshare, its
    # children are the short-lived ones of `$(cat ...)`: look only once it is unshare.
    for i in $(seq 100); do
        case "$(readlink "/proc/$up/exe" 2>/dev/null || true)" in
        */unshare) pid=$(pgrep -P $up | head -1 || true) ;;
        esac
        [ -n "$pid" ] && break
        running $up || break
        sleep 0.05
    done
    if [ -z "$pid" ]; then
        echo "systemd-ns: $name: no namespace PID 1; log:" >&2
        cat "$dir/log" >&2
        stop "" "$name" 2>/dev/null || true
        exit 1
    fi
    for i in $(seq 300); do # 30 s
        state=$(nsenter -t "$pid" -a systemctl is-system-running 2>/dev/null || true)
        case "$state" in
        running) echo "$pid"; return 0 ;;
        degraded) break ;;
        esac
        running "$pid" || break
        sleep 0.1
    done
    {
        echo "systemd-ns: $name (PID 1 = host pid $pid) not running after start: '${state:-no answer}'"
        if running "$pid"; then
            nsenter -t "$pid" -a systemctl --failed --no-pager 2>&1 || true
            nsenter -t "$pid" -a journalctl --no-pager -n 30 2>&1 || true
        fi
        echo "log:"
        cat "$dir/log"
    } >&2
    stop "$pid" "$name" 2>/dev/null || true
    exit 1
}

stop() {
    local pid=$1 name=$2 dir=$STATE/$2 up p i
    [ -n "$name" ] || die "stop needs PID NAME"
    # Only kill PID if it still is this instance's systemd (its cgroup is ours).
    if [ -n "$pid" ] && grep -qE "/sdns-$name(/|\$)" "/proc/$pid/cgroup" 2>/dev/null; then
        # The kernel kills every process in the pid namespace with its PID 1.
        kill -9 "$pid" 2>/dev/null || true
        for i in $(seq 250); do running "$pid" || break; sleep 0.02; done
    fi
    up=$(cat "$dir/unshare.pid" 2>/dev/null || true)
    if [ -n "$up" ]; then
        for i in $(seq 250); do running "$up" || break; sleep 0.02; done
        # Still there: PID was not known or not ours (a start that failed early). The
        # namespace's PID 1 is unshare's only child.
        if running "$up" && grep -qE "/sdns-$name(/|\$)" "/proc/$up/cgroup" 2>/dev/null; then
            for p in $(pgrep -P "$up" || true); do kill -9 "$p" 2>/dev/null || true; done
            kill -9 "$up" 2>/dev/null || true
            for i in $(seq 250); do running "$up" || break; sleep 0.02; done
        fi
    fi
    # Remove the per-instance cgroup trees, deepest first; they empty as the kernel
    # finishes reaping.
    local left=""
    for p in $(cat "$dir/cg" 2>/dev/null || true); do
        for i in $(seq 50); do
            [ -d "$p" ] || break
            find "$p" -depth -type d -exec rmdir {} \; 2>/dev/null || true
            [ -d "$p" ] || break
            sleep 0.1
        done
        [ -d "$p" ] && left="$left $p"
    done
    [ -z "$left" ] || die "cgroups left behind:$left"
    rm -rf "$dir"
    rmdir "$STATE" 2>/dev/null || true
}

case "${1:-}" in
start) [ $# = 2 ] || die "usage: $0 start NAME"; start "$2" ;;
stop) [ $# = 3 ] || die "usage: $0 stop PID NAME"; stop "$2" "$3" ;;
_inner) set -e; inner ;;
*) die "usage: $0 start NAME | stop PID NAME" ;;
esac
