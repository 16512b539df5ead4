#!/usr/bin/env python3
"""Drives `husk run -t -i ... sh` (or any command given) through a real
pty, as a user's terminal would: checks that the container sees a terminal
of the size this side has, that a resize here reaches it, and that the
exit code comes back. Prints the transcript; exits 1 on a failed check."""
import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time

cmd = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(cmd[0], cmd)


def set_size(rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


transcript = b""


def read_until(token, timeout=60):
    global transcript
    end = time.time() + timeout
    while time.time() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return False
            if not data:
                return False
            transcript += data
            if token in transcript:
                return True
    return False


def fail(why):
    sys.stdout.write(transcript.decode(errors="replace"))
    print(f"\nFAIL: {why}")
    os.kill(pid, 9)
    sys.exit(1)


set_size(40, 100)
if not read_until(b"# "):
    fail("no shell prompt")
time.sleep(1)
os.write(fd, b"tty | grep -q /dev/pts/ && [ -t 0 ] && [ -t 1 ] && echo is-a-$((6*6))-tty; stty size\n")
if not read_until(b"is-a-36-tty"):
    fail("the container has no terminal")
if not read_until(b"40 100"):
    fail("the first size did not arrive")
set_size(50, 120)
time.sleep(2)
os.write(fd, b"stty size\n")
if not read_until(b"50 120"):
    fail("the resize did not arrive")
if b"^@" in transcript:
    fail("a NUL byte reached the terminal's input (echoed as ^@)")
os.write(fd, b"exit 7\n")
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.stdout.write(transcript.decode(errors="replace"))
print(f"\ntty-session: exit {code}")
sys.exit(0 if code == 7 else 1)
