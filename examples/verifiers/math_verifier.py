#!/usr/bin/env python3
"""A verifiable reward for math answers, for `temper ppo|grpo --reward cmd:...` or `--reward http://...`.

Each request is a JSON object: the prompt record's fields (so its "answer"), "prompt" and
"completion" as TRL passes them to a reward function, "response" (the completion's text) and
"prompt_text" (the prompt as rendered). The reward is 1.0 when the response's final answer equals the record's "answer",
else 0.0. The final answer is the content of the last \\boxed{...} in the response if there is
one, else its last number. Numbers compare as numbers (so "12", "12.0" and "1,2"-free "12"
agree); anything else compares as trimmed text.

    temper grpo --init runs/sft --data prompts.jsonl \\
        --reward "cmd:python3 examples/verifiers/math_verifier.py"

    python3 examples/verifiers/math_verifier.py --http 8765 &
    temper grpo --init runs/sft --data prompts.jsonl --reward http://127.0.0.1:8765/score

Modes:
  (default)    JSON lines: one request per line on stdin, one {"reward": x} per line on stdout.
  --http PORT  HTTP on 127.0.0.1:PORT (0 picks a free port); each POST body is a JSON array of
               requests and the reply a JSON array of {"reward": x}. Prints "listening on PORT"
               once it is ready.
"""

import json
import re
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def boxed(text):
    """Content of the last \\boxed{...}, braces balanced, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    out = []
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return "".join(out)
        out.append(c)
        i += 1
    return None


def final_answer(response):
    b = boxed(response)
    if b is not None:
        return b.strip()
    nums = NUMBER.findall(response.replace(",", ""))
    return nums[-1] if nums else response.strip()


def same(a, b):
    try:
        return abs(float(a) - float(b)) < 1e-9
    except ValueError:
        return a.strip() == b.strip()


def reward(req):
    answer = req.get("answer")
    if answer is None:
        raise ValueError("the prompt record has no \"answer\" field")
    return 1.0 if same(final_answer(req.get("response", "")), str(answer)) else 0.0


def serve_lines():
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        print(json.dumps({"reward": reward(req)}), flush=True)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            reqs = json.loads(body)
            out = json.dumps([{"reward": reward(r)} for r in reqs]).encode()
            code = 200
        except (ValueError, TypeError, AttributeError) as e:
            out, code = str(e).encode(), 400
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def serve_http(port):
    server = HTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--http":
        serve_http(int(sys.argv[2]))
    else:
        serve_lines()
