#!/usr/bin/env bash
# Soak test: kill train-ckpts and analyze with SIGKILL at random moments, resume them, and check that the
# end result equals an uninterrupted run: checkpoints byte for byte, tables row for row.
#
# Usage: scripts/soak.sh [CYCLES=20] [SECONDS=300]
#   At most CYCLES cycles, stopping early once SECONDS of soaking have passed (the reference run before
#   and the finishing run after come on top: about half a minute each here). A cycle is one start of
#   `train-ckpts --resume` or `analyze` on the soak folder, SIGKILLed after a random delay unless it
#   finished first; after every cycle each checkpoint, log and part on disk must read. A round trains
#   the folder to completion (analysing the partial folder now and then) and analyses it to completion,
#   then compares it with the reference and starts again from scratch; an unfinished last round is
#   finished without kills and compared.
# Environment: SOAK_DIR (default: a new folder under /tmp, kept), SOAK_SEED (default 1),
#   SOAK_WORKERS (analyze's local dask workers, default 2).
# Prints: rounds, cycles survived, kills delivered, rows lost, duplicate rows, ... Exit status 0 when
# nothing was lost, duplicated or corrupted; 1 otherwise.
set -uo pipefail
set -m  # every background job in its own process group: a killed analyze's workers can be found
CYCLES="${1:-20}"
BUDGET="${2:-300}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.venv/bin"
PY="$BIN/python"
WORK="${SOAK_DIR:-$(mktemp -d /tmp/soak.XXXXXX)}"
RANDOM="${SOAK_SEED:-1}"  # seeds bash's generator: the same kill delays on every run
WORKERS="${SOAK_WORKERS:-2}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1  # one BLAS thread per process; bitwise-reproducible training
mkdir -p "$WORK"

TRAIN=(--dataset digits --model-type ffnn --hidden-nodes 16 --hidden-layers 1 --experiment-type swap
       --optimizer both --cut-off-epochs 4 --num-epochs 12 --batch-size 16 --sgd-lr 0.05 --ngd-lr 0.05
       --seed 5 --quiet)
ANALYZE=(--estimators evaluate,weights,llc --llc-chains 2 --llc-draws 60 --llc-burnin 20 --workers "$WORKERS")

log() { printf '[soak %4ds] %s\n' "$SECONDS" "$*"; }

# ------------------------------------------------------------------ checks (Python)
check() {  # check DIR: every file a reader may meet reads; prints the number of problems
    "$PY" - "$1" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
from trainer.checkpoints import list_checkpoints, load_model, read_resume_state

root, problems = Path(sys.argv[1]), []
if not root.is_dir():  # killed before it wrote anything
    print(0)
    sys.exit()
def attempt(what, fn):
    try:
        fn()
    except Exception as e:
        problems.append(f"{what}: {type(e).__name__}: {e}")
for run in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "analysis"):
    for _, _, path in list_checkpoints(run):
        attempt(path, lambda: load_model(path))
    if (run / "resume.safetensors").exists():
        attempt(run / "resume.safetensors", lambda: read_resume_state(run / "resume.safetensors"))
    for name in ("epochs.parquet", "steps.parquet"):
        if (run / name).exists():
            attempt(run / name, lambda: pd.read_parquet(run / name))
    if (run / "run.json").exists():
        attempt(run / "run.json", lambda: json.loads((run / "run.json").read_text()))
out = root / "analysis"
if out.is_dir():
    import analyze
    attempt(out, lambda: analyze.load(out))
    for part in out.glob("*/part-*.parquet"):
        attempt(part, lambda: pd.read_parquet(part))
    tasks = out / "_tasks"
    for marker in (tasks.glob("*.json") if tasks.is_dir() else []):
        record = json.loads(marker.read_text())
        for table in record["tables"]:
            if not (out / table / f"part-{marker.stem}.parquet").exists():
                problems.append(f"{marker}: complete, but its {table} part is missing")
for p in problems[:5]:
    print(p, file=sys.stderr)
print(len(problems))
PY
}

compare() {  # compare REF SOAK: prints "checkpoint_mismatches rows_lost rows_extra duplicates temp_files tasks_ref tasks_soak"
    "$PY" - "$1" "$2" <<'PY'
import sys
from collections import Counter
from pathlib import Path
import pandas as pd
import analyze

ref, soak = Path(sys.argv[1]), Path(sys.argv[2])
mismatch = 0
for run in sorted(p for p in ref.iterdir() if p.is_dir() and p.name != "analysis"):
    names = sorted(p.name for p in run.iterdir())
    other = soak / run.name
    if not other.is_dir() or names != sorted(p.name for p in other.iterdir()):
        mismatch += 1
        print(f"{run.name}: files differ", file=sys.stderr)
        continue
    for name in names:
        if name.endswith(".safetensors") and (run / name).read_bytes() != (other / name).read_bytes():
            mismatch += 1
            print(f"{run.name}/{name}: bytes differ", file=sys.stderr)
        if name.endswith(".parquet"):
            a = pd.read_parquet(run / name).drop(columns=["seconds"], errors="ignore")
            b = pd.read_parquet(other / name).drop(columns=["seconds"], errors="ignore")
            if not a.equals(b):
                mismatch += 1
                print(f"{run.name}/{name}: rows differ", file=sys.stderr)

TIMING = {"seconds"}  # wall-clock columns; `path` differs because the folders do
def rows(frame: pd.DataFrame) -> Counter:
    frame = frame.drop(columns=[c for c in frame.columns if c in TIMING or c == "path"])
    frame = frame[sorted(frame.columns)]
    def norm(v):
        return repr(v.tolist() if hasattr(v, "tolist") else v)
    return Counter(tuple(norm(v) for v in row) for row in frame.itertuples(index=False, name=None))

a, b = analyze.load(ref / "analysis"), analyze.load(soak / "analysis")
lost = extra = dup = 0
for table in sorted(set(a) | set(b)):
    ra = rows(a[table]) if table in a else Counter()
    rb = rows(b[table]) if table in b else Counter()
    lost += sum((ra - rb).values())
    extra += sum((rb - ra).values())
    dup += sum(n - 1 for n in rb.values() if n > 1) - sum(n - 1 for n in ra.values() if n > 1)
    if ra != rb:
        print(f"table {table}: {sum((ra - rb).values())} row(s) lost, {sum((rb - ra).values())} extra", file=sys.stderr)
temp = sum(1 for _ in soak.rglob(".tmp-*"))
tasks = [len(list((d / "analysis" / "_tasks").glob("*.json"))) for d in (ref, soak)]
parts = [len(list((d / "analysis").glob("*/part-*.parquet"))) for d in (ref, soak)]
print(mismatch, lost, extra, dup, temp, tasks[0], tasks[1], parts[0], parts[1])
PY
}

wait_group_gone() {  # wait_group_gone PGID SECONDS: 0 if the process group vanished in time
    local deadline=$(( SECONDS + $2 ))
    while kill -0 -- "-$1" 2>/dev/null; do
        (( SECONDS >= deadline )) && return 1
        sleep 0.2
    done
    return 0
}

# ------------------------------------------------------------------ reference: uninterrupted
log "folder $WORK; reference run (uninterrupted)"
rm -rf "$WORK/ref" "$WORK/soak"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(now_ms)
"$BIN/train-ckpts" "${TRAIN[@]}" --out "$WORK/ref" > "$WORK/ref-train.log" 2>&1 || { log "reference training failed"; exit 1; }
t1=$(now_ms)
"$BIN/analyze" "$WORK/ref" "${ANALYZE[@]}" > "$WORK/ref-analyze.log" 2>&1 || { log "reference analysis failed"; exit 1; }
t2=$(now_ms)
TRAIN_MS=$(( t1 - t0 )) ANALYZE_MS=$(( t2 - t1 ))  # kill delays are drawn within these durations
ref_done=$SECONDS
log "reference done: train-ckpts $TRAIN_MS ms, analyze $ANALYZE_MS ms"

# ------------------------------------------------------------------ soak: kill and resume
# One cycle = one start of train-ckpts or analyze, SIGKILLed after a random delay unless it finished
# first. A round trains the soak folder to completion (after some kills, an analyze on the partial
# folder too) and then analyses it to completion; a finished round is compared with the reference and
# the next round starts from scratch.
cycles=0 survived=0 train_kills=0 analyze_kills=0 violations=0 orphans=0 crashes=0 rounds=0
mismatch=0 lost=0 extra=0 dup=0 temp=0 task_diff=0
train_done=1 analyze_done=1

ms() { printf '%d.%03d' $(( $1 / 1000 )) $(( $1 % 1000 )); }

after_cycle() {  # after_cycle WHAT: check the folder, count the cycle
    local n
    n=$(check "$WORK/soak")
    [[ "$n" =~ ^[0-9]+$ ]] || n=1
    violations=$(( violations + n ))
    (( n == 0 )) && survived=$(( survived + 1 ))
    log "round $rounds cycle $cycles: $1; problems on disk: $n"
}

train_cycle() {
    cycles=$(( cycles + 1 ))
    "$BIN/train-ckpts" "${TRAIN[@]}" --out "$WORK/soak" --resume >> "$WORK/soak-train.log" 2>&1 &
    local pid=$! delay=$(( TRAIN_MS * (5 + RANDOM % 91) / 100 )) code what  # 5-95% of an uninterrupted run
    sleep "$(ms "$delay")"
    if kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null; then
        train_kills=$(( train_kills + 1 ))
        wait "$pid" 2>/dev/null
        what="train-ckpts killed after $delay ms"
    else
        wait "$pid"; code=$?
        if (( code == 0 )); then train_done=1; what="train-ckpts finished"
        else crashes=$(( crashes + 1 )); what="train-ckpts exited $code"; fi
    fi
    after_cycle "$what"
}

analyze_cycle() {
    compgen -G "$WORK/soak/*/epoch-*.safetensors" > /dev/null || return 0  # nothing to analyse yet
    cycles=$(( cycles + 1 ))
    "$BIN/analyze" "$WORK/soak" "${ANALYZE[@]}" >> "$WORK/soak-analyze.log" 2>&1 &
    local pid=$! delay=$(( ANALYZE_MS * (5 + RANDOM % 91) / 100 )) code what  # dask start-up, then tasks
    sleep "$(ms "$delay")"
    if kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null; then  # the client only
        analyze_kills=$(( analyze_kills + 1 ))
        wait "$pid" 2>/dev/null
        if ! wait_group_gone "$pid" 30; then  # its dask workers must not outlive it
            orphans=$(( orphans + 1 ))
            kill -KILL -- "-$pid" 2>/dev/null
        fi
        what="analyze killed after $delay ms"
    else
        wait "$pid"; code=$?
        what="analyze exited $code"
        if (( code == 0 )) && (( train_done )); then analyze_done=1
        elif (( code != 0 && code != 1 )); then crashes=$(( crashes + 1 )); fi
    fi
    after_cycle "$what"
}

finish_round() {  # compare the finished soak folder with the reference
    local m l e d t tr ts pr ps
    read -r m l e d t tr ts pr ps < <(compare "$WORK/ref" "$WORK/soak")
    mismatch=$(( mismatch + m )) lost=$(( lost + l )) extra=$(( extra + e )) dup=$(( dup + d )) temp=$(( temp + t ))
    (( tr == ts && pr == ps )) || task_diff=$(( task_diff + 1 ))
    log "round $rounds compared: $m checkpoint mismatches, $l rows lost, $d duplicates, $e extra, tasks $ts/$tr, parts $ps/$pr, $t temp files"
}

start=$SECONDS
while (( cycles < CYCLES && SECONDS - start < BUDGET )); do
    if (( train_done && analyze_done )); then  # a new round from scratch
        rounds=$(( rounds + 1 )) train_done=0 analyze_done=0
        rm -rf "$WORK/soak"
    fi
    if (( ! train_done )); then
        train_cycle
        if (( ! train_done && RANDOM % 2 && cycles < CYCLES )); then analyze_cycle; fi  # a partial folder too
    else
        analyze_cycle
    fi
    if (( train_done && analyze_done )); then finish_round; fi
done
soaked=$(( SECONDS - start ))

# ------------------------------------------------------------------ finish the last round without kills
if (( ! (train_done && analyze_done) )); then
    log "finishing round $rounds: train-ckpts --resume and analyze without kills"
    "$BIN/train-ckpts" "${TRAIN[@]}" --out "$WORK/soak" --resume >> "$WORK/soak-train.log" 2>&1 || crashes=$(( crashes + 1 ))
    "$BIN/analyze" "$WORK/soak" "${ANALYZE[@]}" > "$WORK/soak-final-analyze.log" 2>&1 || crashes=$(( crashes + 1 ))
    grep -h "task(s) to compute" "$WORK/soak-final-analyze.log" | sed 's/^/    final analyze: /'
    finish_round
fi

cat <<EOF

soak summary ($WORK)
  rounds                 $rounds (each: train to completion and analyse, then compare with the reference)
  cycles survived        $survived of $cycles (in ${soaked} s of soaking; reference run $ref_done s; total $SECONDS s)
  kills delivered        $(( train_kills + analyze_kills )) (train-ckpts $train_kills, analyze $analyze_kills)
  problems on disk       $violations (unreadable checkpoint, log or part; complete task without its part)
  crashes                $crashes (an exit status other than 0, 1 or SIGKILL's)
  orphan worker groups   $orphans
  checkpoint mismatches  $mismatch (files differing from the uninterrupted run, byte for byte)
  rows lost              $lost
  duplicate rows         $dup
  extra rows             $extra
  task/part count diffs  $task_diff (rounds whose tasks or parts differ in number from the reference)
  temporary files left   $temp
EOF
bad=$(( violations + crashes + orphans + mismatch + lost + dup + extra + temp + task_diff ))
if (( bad )); then echo "soak: FAILED"; exit 1; fi
echo "soak: OK"
