#!/usr/bin/env bash
# Lint fdqueue's systemd units without a running systemd (CI containers have no PID 1 systemd).
#
# Usage: check-units.sh [DIR]      DIR defaults to this script's directory.
#   1. systemd-analyze verify on every *.service/*.socket/*.timer in DIR, inside a throwaway
#      --root where every Exec*= binary exists (the app is not installed here). Typos and bad
#      values are only warnings unless --recursive-errors=yes, so we pass it, and we also fail
#      on any output on stderr.
#   2. systemd-analyze security --offline on every *.service: exposure must be <= THRESHOLD
#      tenths (default 20, i.e. 2.0; the option takes integer tenths, "2.0" is rejected).
# Exit status: 0 when everything passes, 1 otherwise.
set -euo pipefail

THRESHOLD=${THRESHOLD:-20}
unit_dir=$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")}" && pwd)

ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null && return 0
    echo "systemd-analyze not found: installing Debian's systemd package" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
    command -v systemd-analyze >/dev/null
}

# Every absolute or PATH-resolved command named by an Exec*= line (prefixes like '-' or '+' dropped).
exec_commands() {
    grep -hoE '^Exec[A-Za-z]*=[-@:+!|]*[^[:space:]]+' "$@" | sed -E 's/^[^=]+=[-@:+!|]*//' | sort -u
}

# A root with systemd's own units (sysinit.target, network-online.target...) and the binaries.
build_root() {
    local root=$1; shift
    mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/bin" "$root/usr/sbin"
    cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
    for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
    cp "$@" "$root/etc/systemd/system/"
    local cmd target
    while read -r cmd; do
        case "$cmd" in
            /*) target=$cmd ;;
            *) target=$(type -P "$cmd") || { echo "Exec command not in PATH: $cmd" >&2; return 1; } ;;
        esac
        mkdir -p "$root$(dirname "$target")"
        if [ -x "$target" ]; then
            cp -L "$target" "$root$target"
        else  # fdqueue itself is not installed on the build machine: a stub is enough to verify
            printf '#!/bin/sh\nexit 0\n' >"$root$target"
            chmod +x "$root$target"
        fi
    done < <(exec_commands "$@")
}

run_verify() {
    local root=$1 err=$2; shift 2
    local rc=0
    systemd-analyze verify --man=no --generators=no --recursive-errors=yes --root="$root" "$@" \
        2>"$err" || rc=$?
    # name the files the reader edits, not their copies in the throwaway root
    sed "s|$root/etc/systemd/system/|$unit_dir/|g" "$err" >&2
    if [ "$rc" -ne 0 ] || [ -s "$err" ]; then
        echo "FAIL verify (exit $rc, $(wc -l <"$err") diagnostic line(s))"
        return 1
    fi
    echo "ok   verify: ${*##*/}"
}

run_security() {
    local root=$1 unit=$2 out rc=0
    out=$(systemd-analyze security --offline=true --root="$root" --threshold="$THRESHOLD" \
        --no-pager "/etc/systemd/system/$unit" 2>&1) || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "$out"
        echo "FAIL security: $unit (exit $rc, threshold $THRESHOLD tenths)"
        return 1
    fi
    echo "ok   security: $(grep -F 'Overall exposure level' <<<"$out")"
}

main() {
    ensure_systemd_analyze || { echo "FAIL: systemd-analyze unavailable and not installable"; exit 1; }
    shopt -s nullglob
    local files=("$unit_dir"/*.service "$unit_dir"/*.socket "$unit_dir"/*.timer)
    [ "${#files[@]}" -gt 0 ] || { echo "FAIL: no unit files in $unit_dir"; exit 1; }

    # globals, so the EXIT trap still sees them after main returns
    root=$(mktemp -d) err=$(mktemp)
    trap 'rm -rf "$root" "$err"' EXIT
    build_root "$root" "${files[@]}"

    local names=() f status=0
    for f in "${files[@]}"; do names+=("/etc/systemd/system/$(basename "$f")"); done
    run_verify "$root" "$err" "${names[@]}" || status=1
    for f in "$unit_dir"/*.service; do
        run_security "$root" "$(basename "$f")" || status=1
    done
    if [ "$status" -eq 0 ]; then echo "units OK"; else echo "units FAILED"; fi
    return "$status"
}

main
