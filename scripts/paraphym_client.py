#!/usr/bin/env python3
"""A minimal paraphym client: one generation, Python 3 standard library only.

Written from docs/PROTOCOL.md alone, to show that the protocol can be scripted
without Rust. It prints what `paraphym run` prints and exits with its codes:
0 ok, 1 error, 2 usage, 3 no daemon running, 4 unknown model, 5 busy,
6 context overflow, 130 cancelled (Ctrl-C cancels the generation; a second
Ctrl-C leaves at once).

    python3 scripts/paraphym_client.py --raw --max-tokens 20 "Paris is"
    python3 scripts/paraphym_client.py --json --system "Be brief." "Hi!"
"""

import argparse
import json
import math
import os
import signal
import socket
import struct
import sys

MAGIC, VERSION, MAX_FRAME = b"PARAPHYM", 5, 16 << 20
GEN_ID = 1  # our Generate's request id
STOPS = ["end_of_generation", "max_tokens", "stop_string", "context_full", "cancelled"]
KINDS = ["bad_request", "unknown_model", "context_overflow", "busy", "model_failed",
         "shutting_down", "internal", "offline", "access_denied", "out_of_memory"]
EXIT_CODES = {"unknown_model": 4, "busy": 5, "context_overflow": 6}


class Fail(Exception):
    """An error for stderr, with the exit code to leave with."""
    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# Encoding (section 3): fixed-width little-endian; String = u64 length + UTF-8;
# Option = u8 tag (+ value); Vec = u64 count + elements; enum = u32 variant index.
def u32(v): return struct.pack("<I", v)
def u64(v): return struct.pack("<Q", v)
def f32(v): return struct.pack("<f", v)
def string(s): return u64(len(s.encode())) + s.encode()
def option(v, enc): return b"\x00" if v is None else b"\x01" + enc(v)
def vec(items, enc): return u64(len(items)) + b"".join(enc(i) for i in items)


class Reader:
    """Decodes one message payload; running short or bad UTF-8 is an error."""
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Fail("malformed message from the daemon (truncated)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u32(self): return struct.unpack("<I", self.take(4))[0]
    def u64(self): return struct.unpack("<Q", self.take(8))[0]
    def f32(self): return struct.unpack("<f", self.take(4))[0]
    def string(self):
        try:
            return self.take(self.u64()).decode()
        except UnicodeDecodeError:
            raise Fail("malformed message from the daemon (bad UTF-8)")


def generate_msg(a):
    """ClientMsg { id: GEN_ID, request: Generate(...) } (section 4)."""
    if a.raw:
        prompt = u32(0) + string(a.prompt)                      # Prompt::Raw
    else:
        msgs = ([("system", a.system)] if a.system is not None else []) + [("user", a.prompt)]
        prompt = (u32(1) + vec(msgs, lambda m: string(m[0]) + string(m[1]) + vec([], None))
                  + option(None, None))                         # Prompt::Chat, think: None
    options = (option(a.temperature, f32) + option(a.top_k, u32) + option(a.top_p, f32)
               + option(a.min_p, f32) + option(a.repeat_penalty, f32) + option(a.seed, u64)
               + option(a.max_tokens, u32) + vec(a.stop, string)
               + b"\x00"                                       # ignore_eos: false
               + u32(1 if a.drop_oldest else 0)                 # overflow: Error / DropOldest
               + option(None, None) + option(None, None)        # presence, frequency penalty
               + option(None, None)                             # logprobs
               + u32(0)                                         # format: Text
               + vec([], None)                                  # tools: none
               + option(a.context, u32))                        # context (num_ctx)
    generate = (option(a.model, string) + prompt + options + option(a.keep_alive_ms, u64)
                + option(a.session, string))
    return u64(GEN_ID) + u32(0) + generate                      # Request::Generate


def default_socket():
    """protocol/src/paths.rs: empty variables count as unset."""
    env = lambda k: os.environ.get(k) or None
    if env("PARAPHYM_SOCKET"):
        return env("PARAPHYM_SOCKET")
    xdg = env("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        base = xdg
    elif env("HOME"):
        base = os.path.join(env("HOME"), ".paraphym")
    else:
        raise Fail("no socket path: set PARAPHYM_SOCKET, XDG_RUNTIME_DIR or HOME")
    return os.path.join(base, f"paraphym-v{VERSION}", "paraphymd.sock")


class Conn:
    """A connected, handshaken socket that sends and receives frames."""
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise Fail(f"no daemon is running on {path}", 3)
        self.file = self.sock.makefile("rb")  # read(n): n bytes, fewer only at the end
        self.sock.settimeout(10)  # a daemon that accepts but never answers
        self.sock.sendall(MAGIC + u32(VERSION))
        answer = self.file.read(13)
        if len(answer) < 13 or answer[:8] != MAGIC:
            raise Fail(f"{path} is not a paraphym daemon (bad handshake)")
        theirs = struct.unpack("<I", answer[8:12])[0]
        if answer[12] != 0 or theirs != VERSION:
            raise Fail(f"protocol version mismatch: this client speaks {VERSION}, the daemon "
                       f"{theirs}; use a client for the daemon's version")
        self.sock.settimeout(None)

    def send(self, payload):
        self.sock.sendall(u32(len(payload)) + payload)

    def frame(self):
        head = self.file.read(4)
        if not head:
            raise Fail("the daemon closed the connection")
        n = struct.unpack("<I", head)[0] if len(head) == 4 else None
        if n is not None and n > MAX_FRAME:
            raise Fail(f"the daemon sent a frame of {n} bytes, over the 16 MiB limit")
        payload = self.file.read(n) if n is not None else b""
        if n is None or len(payload) < n:
            raise Fail("the daemon closed the connection inside a frame")
        return payload


def decode(payload):
    """A DaemonMsg as an event dict; None for answers to other requests."""
    r = Reader(payload)
    msg_id, variant = r.u64(), r.u32()
    # id 0 answers no request: an Error there is about the whole connection.
    if msg_id != GEN_ID and not (msg_id == 0 and variant == 2):
        return None
    if variant == 0:                                   # Token { text }
        event = {"event": "token", "text": r.string()}
    elif variant == 1:                                 # Done(GenStats)
        event = {"event": "done", "prompt_tokens": r.u32(), "generated_tokens": r.u32(),
                 "time_to_first_token_us": r.u64(),
                 "prefill_tokens_per_s": r.f32(), "decode_tokens_per_s": r.f32()}
        stop = r.u32()
        if stop >= len(STOPS):
            raise Fail(f"unknown stop reason {stop} from the daemon")
        event["stop"] = f"stop_string:{r.u32()}" if stop == 2 else STOPS[stop]
        event["cached_tokens"] = r.u32()
        event["dropped_messages"] = r.u32()
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            if not math.isfinite(event[k]):
                event[k] = None                        # as serde_json writes them
    elif variant == 2:                                 # Error(WireError)
        kind = r.u32()
        event = {"event": "error", "kind": KINDS[kind] if kind < len(KINDS) else f"kind_{kind}",
                 "message": r.string()}
    elif variant == 11:                                # Stage(Stage): progress
        stage = r.u32()
        if stage == 0:
            event = {"event": "stage", "stage": "queued", "position": r.u32()}
        elif stage == 1:
            event = {"event": "stage", "stage": "loading", "percent": r.take(1)[0]}
        elif stage == 2:
            event = {"event": "stage", "stage": "prefill", "done": r.u32(), "total": r.u32()}
        elif stage == 3:
            event = {"event": "stage", "stage": "generating"}
        else:
            raise Fail(f"unknown stage {stage} from the daemon")
    else:
        raise Fail(f"unexpected answer (Response variant {variant}) to a Generate")
    if r.pos != len(payload):
        raise Fail(f"malformed message from the daemon ({len(payload) - r.pos} bytes left over)")
    return event


def uint(bits):
    """An argparse type: an unsigned integer of `bits` bits."""
    def parse(s):
        if not 0 <= int(s) < 1 << bits:
            raise ValueError(s)
        return int(s)
    parse.__name__ = f"u{bits}"
    return parse


def parse_args():
    p = argparse.ArgumentParser(description="One generation from paraphymd (docs/PROTOCOL.md).")
    p.add_argument("--socket", help="the daemon's socket [default: as paraphym]")
    p.add_argument("--model", default=os.environ.get("PARAPHYM_MODEL") or None,
                   help="a model reference [default: $PARAPHYM_MODEL, else the daemon's]")
    p.add_argument("--raw", action="store_true", help="complete the text as is (no chat template)")
    p.add_argument("--system", help="a system message (chat only)")
    for name in ("--temperature", "--top-p", "--min-p", "--repeat-penalty"):
        p.add_argument(name, type=float)
    for name, bits in (("--top-k", 32), ("--max-tokens", 32), ("--seed", 64), ("--context", 32)):
        p.add_argument(name, type=uint(bits))
    p.add_argument("--stop", action="append", default=[], help="stop text (repeatable)")
    p.add_argument("--keep-alive-ms", type=uint(64), help="how long the model stays loaded")
    p.add_argument("--session", help="the conversation's name (the daemon prefers its cache)")
    p.add_argument("--drop-oldest", action="store_true",
                   help="past the context, leave out the oldest turns instead of failing")
    p.add_argument("--json", action="store_true", help="one JSON object per line per event")
    p.add_argument("prompt", nargs="?", help="the prompt [default: standard input]")
    a = p.parse_args()
    if a.raw and a.system is not None:
        p.error("--system needs a chat prompt (drop --raw)")
    if a.prompt is None:
        if sys.stdin.isatty():
            p.error("give a prompt as an argument or on standard input")
        a.prompt = sys.stdin.read()
    return a


def run(a):
    out = sys.stdout.buffer
    conn = Conn(a.socket or default_socket())
    conn.send(generate_msg(a))
    interrupts = 0

    def on_sigint(_sig, _frame):  # cancel; the generation still ends with Done
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            os._exit(130)
        conn.send(u64(2) + u32(1) + u64(GEN_ID))      # ClientMsg{id 2, Cancel{target}}

    signal.signal(signal.SIGINT, on_sigint)
    last = "\n"
    while True:
        event = decode(conn.frame())
        if event is None:
            continue
        if a.json:
            line = json.dumps(event, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
            out.write(line.encode() + b"\n")
        elif event["event"] == "token":
            out.write(event["text"].encode())
            last = event["text"][-1:] or last
        elif event["event"] == "done" and out.isatty() and last != "\n":
            out.write(b"\n")
        out.flush()
        if event["event"] == "done":
            return 130 if event["stop"] == "cancelled" else 0
        if event["event"] == "error":
            raise Fail(event["message"], EXIT_CODES.get(event["kind"], 1))


def main():
    a = parse_args()
    try:
        return run(a)
    except (Fail, OSError, OverflowError, struct.error) as e:
        print(f"paraphym_client: {e}", file=sys.stderr)
        return e.code if isinstance(e, Fail) else 1
    except KeyboardInterrupt:  # before the generation was sent
        return 130


if __name__ == "__main__":
    sys.exit(main())
