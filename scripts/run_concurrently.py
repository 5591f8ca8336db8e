"""Run several training commands at once on one GPU and keep only those that can finish in time.

    python3 scripts/run_concurrently.py --deadline SECONDS --log-dir DIR NAME=COMMAND [NAME=COMMAND ...]

A small model's run leaves the GPU idle between its kernels (host time), so several side by side
finish sooner than one after another. The commands are listed in priority order. Every
``--interval`` seconds each log's last ``step N/TOTAL`` gives its rate. When a run would end past
the deadline at its present share of the GPU, the lowest-priority run still going is stopped (the
others speed up) and the rates are measured afresh before the next decision; a late run that is
itself the last in line goes on, as the others' ends may speed it up enough. The tokens/s such runs log is their share of the
GPU, not a speed figure. Prints the runs' progress every ``--window`` seconds and one line per run
at the end: finished, failed or stopped.
"""
import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time

STEP = re.compile(rb"step (\d+)/(\d+)")


def last_step(path):
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 65536))
            found = STEP.findall(fh.read())
    except OSError:
        return None
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deadline", type=float, required=True, help="seconds from now by which every kept run ends")
    ap.add_argument("--log-dir", required=True, help="each run's output goes to LOG_DIR/NAME.log")
    ap.add_argument("--interval", type=float, default=20.0, help="seconds between progress checks")
    ap.add_argument("--window", type=float, default=60.0, help="seconds of progress a rate is measured over")
    ap.add_argument("--margin", type=float, default=1.1, help="projected run time is multiplied by this")
    ap.add_argument("--warmup", type=float, default=150.0,
                    help="seconds before the first stop (kernel builds make the first steps slow)")
    ap.add_argument("runs", nargs="+", metavar="NAME=COMMAND")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.runs:
        name, sep, command = spec.partition("=")
        if not sep or not name or not command:
            ap.error(f"{spec!r}: expected NAME=COMMAND")
        runs.append((name, command))
    os.makedirs(args.log_dir, exist_ok=True)
    start = time.monotonic()
    end = start + args.deadline
    procs, logs, status, seen, ended = {}, {}, {}, {}, {}
    for name, command in runs:
        logs[name] = os.path.join(args.log_dir, f"{name}.log")
        with open(logs[name], "wb") as log:
            procs[name] = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        seen[name] = []
    settle_until = start  # after a stop, rates are measured afresh
    last_report = start
    while True:
        now = time.monotonic()
        alive = [n for n, _ in runs if n not in status]
        for name in alive:
            rc = procs[name].poll()
            if rc is not None:
                status[name] = "finished" if rc == 0 else f"failed (exit {rc})"
                ended[name] = now
                continue
            step = last_step(logs[name])
            if step:
                seen[name].append((now, *step))
        alive = [n for n, _ in runs if n not in status]
        if not alive:
            break
        if now >= end:
            for name in alive:
                os.killpg(procs[name].pid, signal.SIGTERM)
                status[name] = "stopped at the deadline"
                ended[name] = now
            continue
        measured = {}
        for name in alive:
            recent = [s for s in seen[name] if s[0] >= max(now - args.window, settle_until)]
            if len(recent) >= 2 and recent[-1][1] > recent[0][1] and now - recent[0][0] >= args.window / 2:
                rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
                measured[name] = (recent[-1][2] - recent[-1][1]) / rate  # seconds left at today's share
        if now - last_report >= args.window:
            last_report = now
            print(f"{now - start:4.0f} s: " + ", ".join(
                f"{n} {seen[n][-1][1] if seen[n] else '-'}" + (f" (~{measured[n]:.0f} s)" if n in measured else "")
                for n in alive), flush=True)
        # late: would end past the deadline at today's share (a share only grows as runs end)
        late = [n for n in alive if n in measured and now + measured[n] * args.margin > end]
        if now - start >= args.warmup and len(alive) > 1 and any(n != alive[-1] for n in late):
            victim = alive[-1]  # a late run that is itself the last in line may still finish: it waits
            os.killpg(procs[victim].pid, signal.SIGTERM)
            status[victim] = "stopped: " + ", ".join(f"{n} needed ~{measured[n]:.0f} s" for n in late) + \
                f" at its share, {end - now:.0f} s were left"
            ended[victim] = now
            settle_until = now + 5
        time.sleep(args.interval)
    for name, _ in runs:
        step = last_step(logs[name])
        print(f"{name}: {status[name]} after {ended[name] - start:.0f} s; last step {step[0] if step else '-'}"
              f"{'/' + str(step[1]) if step else ''}")
    return 0 if all(s == "finished" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
