#!/usr/bin/env bash
# Wall time to start /bin/true in each of kiln's sandboxes, RUNS runs with the kinds
# interleaved so that the shared machine's drift hits all of them alike. Prints the
# median and p90 per kind; `none` (no sandbox, plus this script's own timing overhead)
# is the floor to subtract. Needs root and bubblewrap, like the sandbox it measures:
#
#   sudo loadtests/sandbox-cost.sh [RUNS]
#
#   root-userns  bwrap as root, uid 65534 mapped to root (kiln before the uid per action)
#   setpriv      bwrap as root, no user namespace, setpriv to the action's uid (a host)
#   uid-userns   bwrap as the action's uid, mapped to 65534 in a user namespace (a
#                container without CAP_SYS_ADMIN)
#   warm         nsenter into a sandbox built once, as the action's uid (kiln's warm
#                sandboxes join the namespaces in the spawn child itself, without
#                nsenter's extra exec: this is an upper bound of their cost)
set -euo pipefail
runs=${1:-100}
uid=1600000000
dir=$(mktemp -d /tmp/kiln-sandbox-cost.XXXXXX)
init=""
# The held sandbox ends with its PID 1, which takes only SIGKILL from outside (a PID
# namespace's init ignores signals it has no handler for); bwrap then exits by itself.
trap '[ -n "$init" ] && kill -KILL "$init"; rm -rf "$dir"' EXIT
chmod 711 "$dir"
mkdir -p "$dir/actions/a"
chown "$uid:$uid" "$dir/actions/a"
# The arguments kiln passes (worker/src/sandbox.rs), for this host's merged /usr.
common=(--ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/sbin /sbin
    --symlink usr/lib /lib --symlink usr/lib64 /lib64 --ro-bind /etc /etc
    --dev /dev --proc /proc --perms 1777 --tmpfs /tmp
    --perms 0755 --dir "$dir" --perms 0755 --dir "$dir/actions"
    --bind "$dir/actions/a" "$dir/actions/a" --remount-ro /
    --unshare-pid --unshare-ipc --unshare-uts --unshare-cgroup-try --new-session
    --die-with-parent --unshare-net --chdir "$dir/actions/a")
userns=(--unshare-user --uid 65534 --gid 65534)
# A warm sandbox: the same mounts and namespaces, held open by a process of its own.
warm=("${common[@]}")
for i in "${!warm[@]}"; do
    case "${warm[$i]}" in --new-session | --die-with-parent) unset 'warm[i]' ;; esac
done
bwrap "${warm[@]}" -- /bin/sleep infinity </dev/null >/dev/null 2>&1 &
holder=$!
for _ in $(seq 100); do
    init=$(tr -d ' ' <"/proc/$holder/task/$holder/children" 2>/dev/null || true)
    [ -n "$init" ] && break
    sleep 0.01
done
setpriv=(setpriv "--reuid=$uid" "--regid=$uid" --clear-groups --inh-caps=-all --bounding-set=-all --)

run_kind() {
    case "$1" in
        none) /bin/true ;;
        root-userns) bwrap "${common[@]}" "${userns[@]}" -- /bin/true ;;
        setpriv) bwrap "${common[@]}" -- "${setpriv[@]}" /bin/true ;;
        uid-userns) setpriv "--reuid=$uid" "--regid=$uid" --clear-groups \
            bwrap "${common[@]}" "${userns[@]}" -- /bin/true ;;
        warm) nsenter -t "$init" -m -u -i -n -p -C -S "$uid" -G "$uid" \
            --wd="$dir/actions/a" /bin/true ;;
    esac
}

kinds=(none root-userns setpriv uid-userns warm)
declare -A times
for _ in $(seq "$runs"); do
    for kind in "${kinds[@]}"; do
        start=$(date +%s%N)
        run_kind "$kind" >/dev/null
        end=$(date +%s%N)
        times[$kind]+="$(( (end - start) / 1000 )) "
    done
done
for kind in "${kinds[@]}"; do
    echo "${times[$kind]}" | tr ' ' '\n' | grep . | sort -n | awk -v kind="$kind" \
        '{ t[NR] = $1 } END { printf "%-12s median %.2f ms  p90 %.2f ms\n", kind, t[int(NR / 2) + 1] / 1000, t[int(NR * 0.9)] / 1000 }'
done
