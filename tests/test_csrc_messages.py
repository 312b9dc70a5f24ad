"""The C++ error messages stream no integers (a CPU test of the CUDA sources).

On the H100 machine (torch 2.11 built with gcc-toolset-13, this extension with Ubuntu's gcc 13),
an integer streamed into a TORCH_CHECK message from this library's code segfaults the process
instead of raising (see num() in csrc/common.cuh). Only a GPU run reaches most of these checks,
and one such message landed that way once (check_thin_operands, stop 21). So every argument of
every TORCH_CHECK message in csrc/ must be one of the kinds known to stream safely: string
literals, the string formatters (num, dims, fnum, std::to_string and this library's string
helpers), names of `const char*` / string values, tensors' dtypes and devices, and conditionals
between string literals.
"""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Calls that return a string (or a dtype/device, which stream through their own operators).
SAFE_CALLS = re.compile(r"^(num|dims|fnum|std::to_string|std::string|arg_name|size)\(")
# Names that hold a const char* or std::string in csrc (argument names, reasons, env values).
SAFE_NAMES = re.compile(r"^(\w*name|what|why|env|dtype)$")
SAFE_MEMBERS = re.compile(r"(\.|->)(scalar_type|device)\(\)$")
STRING_CONDITIONAL = re.compile(r'^[^?]+\?\s*"[^"]*"\s*:\s*"[^"]*"$')


def _calls(source: str, macro: str):
    """(line, [arguments]) of each macro(...) call, split at top-level commas."""
    for m in re.finditer(rf"\b{macro}\(", source):
        i, depth, args, cur = m.end(), 1, [], ""
        while depth:
            c = source[i]
            if c == '"':  # a string literal, escapes included
                j = i + 1
                while source[j] != '"':
                    j += 2 if source[j] == "\\" else 1
                cur += source[i:j + 1]
                i = j + 1
                continue
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
                if depth == 0:
                    break
            if c == "," and depth == 1:
                args.append(cur.strip())
                cur = ""
            else:
                cur += c
            i += 1
        args.append(cur.strip())
        yield source[:m.start()].count("\n") + 1, args


def _streams_safely(arg: str) -> bool:
    arg = " ".join(arg.split())
    return bool(arg.startswith('"') or SAFE_CALLS.match(arg) or SAFE_NAMES.match(arg) or SAFE_MEMBERS.search(arg)
                or STRING_CONDITIONAL.match(arg))


def test_torch_check_messages_stream_no_integers():
    files = sorted(f for f in os.listdir(CSRC) if f.endswith((".cu", ".cuh", ".cpp", ".h")))
    assert "dropout.cu" in files and "common.cuh" in files, files
    checked, bad = 0, []
    for name in files:
        source = open(os.path.join(CSRC, name)).read()
        for line, args in _calls(source, "TORCH_CHECK"):
            checked += 1
            bad += [f"{name}:{line}: {a}" for a in args[1:] if not _streams_safely(a)]
    assert checked > 50, checked
    assert not bad, "wrap integers in num() (streaming them crashes the H100 build):\n" + "\n".join(bad)


def test_the_scan_flags_an_integer():
    """The scan itself: the message that crashed (an int streamed), and the fixed one."""
    crashed = 'TORCH_CHECK(a == b, second_name, ": expected dim ", second_dim, " to be ", num(n));'
    fixed = 'TORCH_CHECK(a == b, second_name, ": expected dim ", num(second_dim), " to be ", num(n));'
    [(_, args)] = list(_calls(crashed, "TORCH_CHECK"))
    assert [a for a in args[1:] if not _streams_safely(a)] == ["second_dim"]
    [(_, args)] = list(_calls(fixed, "TORCH_CHECK"))
    assert all(_streams_safely(a) for a in args[1:])
