#!/usr/bin/env bash
# Fuzzes the parsers and front doors that untrusted bytes reach (see docs/fuzzing.md):
# gguf, safetensors, tokenizer, chat_template, sampler, server.
#
#   scripts/fuzz.sh [--time SECS | --runs N | --smoke] [TARGET...]
#
# --time SECS  give each target this much CPU time (default 3600)
# --runs N     stop each target after N executions (and at most --time)
# --smoke      60 seconds each: a new crash in a hot spot shows up
#
# The budget is CPU time, not wall time: two targets run side by side (one script per
# target list) or beside a build still each get their hour of fuzzing. A target stops
# at its budget (SIGINT; libFuzzer prints its final statistics) or after three times
# the budget of wall time, whichever comes first.
#
# Needs the nightly toolchain (rustup) and cargo-fuzz (installed here if missing).
# Each target starts from its seeds and regression inputs in tests/fixtures/fuzz/<t>/
# and keeps what it learns in fuzz/corpus/<t>/ (not committed). libFuzzer runs with a
# 10 s timeout per input and a 2 GiB memory limit (one allocation past it is a crash
# too). A crash or a timeout is copied into tests/fixtures/fuzz/<t>/ -- where the test
# suite replays it on stable Rust -- and the script exits 1. One line of statistics
# per target goes to fuzz/stats.tsv and to standard output.
set -euo pipefail
cd "$(dirname "$0")/.."
time_s=3600
runs=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time) time_s="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --smoke) time_s=60; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
all=(gguf safetensors tokenizer chat_template sampler server)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [ -d "tests/fixtures/fuzz/$t" ] || { echo "error: no fuzz target '$t' (${all[*]})" >&2; exit 2; }
done
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "error: cargo fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked >&2
fi
# libFuzzer: -runs=-1 is no limit.
limit=$([ "$runs" -gt 0 ] && echo "$runs" || echo -1)
cd fuzz
# Debug assertions and overflow checks on, AddressSanitizer on (the default).
cargo +nightly fuzz build -a >&2
stats=stats.tsv
[ -f "$stats" ] || printf 'date\ttarget\tcpu_seconds\twall_seconds\texecutions\texec_per_cpu_s\tcoverage\tfeatures\tcorpus\tpeak_rss_mb\tresult\n' > "$stats"
tick=$(getconf CLK_TCK)
# CPU seconds (user + system) a process has used so far.
cpu_of() { awk -v t="$tick" '{ print int(($14 + $15) / t) }' "/proc/$1/stat" 2>/dev/null || echo 0; }
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last.log"
    start=$(date +%s)
    # The binary cargo-fuzz built, run directly so that its CPU time can be read.
    ASAN_OPTIONS="detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
        "target/x86_64-unknown-linux-gnu/release/$t" "corpus/$t" "../tests/fixtures/fuzz/$t" \
        -max_total_time=$((time_s * 3)) -runs="$limit" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -interrupted_exitcode=72 -artifact_prefix="artifacts/$t/" \
        > "$log" 2>&1 &
    pid=$!
    cpu=0
    interrupted=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        now=$(cpu_of "$pid")
        [ "${now:-0}" -gt "$cpu" ] && cpu=$now
        if [ "$cpu" -ge "$time_s" ]; then
            interrupted=1
            kill -INT "$pid" 2>/dev/null || true
            break
        fi
    done
    set +e
    wait "$pid"
    rc=$?
    set -e
    [ $interrupted -eq 1 ] && [ $rc -eq 72 ] && rc=0
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || true)
    ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || true)
    units=$(ls "corpus/$t" | wc -l)
    result=ok
    if [ $rc -ne 0 ]; then
        result=FAILED
        failed=1
        for a in artifacts/"$t"/crash-* artifacts/"$t"/timeout-* artifacts/"$t"/oom-* artifacts/"$t"/leak-*; do
            [ -f "$a" ] || continue
            cp "$a" "../tests/fixtures/fuzz/$t/$(basename "$a")"
            echo "$t: $(basename "$a") kept in tests/fixtures/fuzz/$t/" >&2
        done
        grep -E 'ERROR|panicked|SUMMARY' "$log" | head -5 >&2 || true
    fi
    per_s=$(( ${execs:-0} / (cpu > 0 ? cpu : 1) ))
    line="$(date -u +%FT%TZ)\t$t\t$cpu\t$took\t${execs:-0}\t$per_s\t${cov:-?}\t${ft:-?}\t$units\t${rss:-?}\t$result"
    printf "$line\n" >> "$stats"
    printf "$line\n"
done
exit $failed
