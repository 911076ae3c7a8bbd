"""Stop a local Ray instance when the process that started it dies, however it dies.

Run as a script (``python ray_reaper.py MARKER``; it imports nothing of metarl, so it starts in
milliseconds) by :mod:`metarl.rollouts.ray_collector` just before ``ray.init`` starts a local
instance. Its stdin is a pipe whose only writer is the driver: the read returns end-of-file
when the driver exits, normally or by SIGKILL (the kernel closes a dead process's files). It then
stops every process of that instance, found two ways:
* its environment carries ``METARL_RAY_OWNER=MARKER``: the driver sets that variable while
  ``ray.init`` spawns the GCS server, the raylet and the agents, and the raylet passes it on to
  the workers and actors it forks;
* it holds a file (a log, a socket) in the instance's session directory, whose path the driver
  writes to the pipe once ``ray.init`` returns: the agents rename themselves with setproctitle,
  which overwrites what ``/proc/PID/environ`` shows, so the marker alone missed them.

Why not Ray's own mechanisms: on Linux Ray binds its head processes to the driver with
``PR_SET_PDEATHSIG``, so the GCS server and the raylet die with a SIGKILLed driver and the
workers follow the raylet, but the dashboard and runtime-env agents, children of the raylet,
were seen to linger for more than a minute (ray 2.60: they block reporting the raylet's death
to the GCS that is already gone). Ray's own reaper is only started where that fate sharing is
missing, and it kills its process group, which the actors leave (each worker is its own group).
"""
from __future__ import annotations

import os
import signal
import sys
import time

MARKER_VAR = "METARL_RAY_OWNER"


def _holds_file_in(pid: str, directory: str) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(directory):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def marked_processes(marker: str, session_dir: str = "", spare: tuple[int, ...] = ()) -> list[int]:
    """Pids of the live processes whose environment holds ``METARL_RAY_OWNER=marker``, or
    which hold a file below ``session_dir`` (when given); never this one or those in ``spare``."""
    needle = f"{MARKER_VAR}={marker}".encode()
    directory = session_dir.rstrip("/") + "/" if session_dir else ""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or int(entry) in spare:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in env or (directory and _holds_file_in(entry, directory)):
            found.append(int(entry))
    return found


def stop(marker: str, session_dir: str = "", spare: tuple[int, ...] = (), grace: float = 2.0) -> int:
    """SIGTERM the instance's processes, SIGKILL what is left after ``grace`` seconds; how many
    were still there at the end (0). ``spare``: the driver, which holds its own log in the
    session directory and is still alive when it closes the pipe on a normal exit."""
    pids = marked_processes(marker, session_dir, spare)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = set(marked_processes(marker, session_dir, spare))
            pids = [p for p in pids if p in alive]
        if not pids:
            break
    return len(pids)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1]:
        print("usage: ray_reaper.py MARKER", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; we clean up after it
    driver = os.getppid()
    session_dir = ""
    try:
        for line in sys.stdin:  # the driver writes the session directory, then nothing: EOF when it exits
            if line.strip().startswith("/"):
                session_dir = line.strip()
    except OSError:
        pass
    stop(argv[1], session_dir, spare=(driver,))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
