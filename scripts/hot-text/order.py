#!/usr/bin/env python3
"""Hot-text ordering for bosun-runc, from an lld map and first-hit traces.

    order.py artifacts BUILD.JSON   paths of the binaries and of the map's directory
    order.py addrs MAP OUT          function entry points, for first-hit
    order.py script MAP TRACES OUT  write the linker script (runtime/hot-text.ld)
    order.py check MAP TRACES       executed code outside .text.hot, per command

BUILD.JSON is cargo's --message-format=json output; MAP the linker's map of
bosun-runc, which runtime/build.rs has written to OUT_DIR/bosun-runc.map;
TRACES a directory of first-hit outputs named <scenario>-<command>.trace,
"bench-*" for the lifecycle benchmark's create/start/delete.

The linker script names input sections by glob patterns that survive
rebuilds: the crate disambiguators of v0-mangled Rust symbols
(-C symbol-mangling-version=v0, .cargo/config.toml) and LLVM's numeric
suffixes are wildcards, C code is named by archive member. A pattern that no
longer matches anything after a dependency or toolchain update costs nothing
but its share of the saving; `scripts/hot-text.sh check` reports such drift.
"""

import bisect
import json
import os
import re
import sys

TEXT_OUTPUTS = (".text", ".text.hot")
WINDOW = 64 * 1024  # the kernel's fault-around
LINE = re.compile(r"^\s*([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+(\d+) (\s*)(\S.*)$")


def parse_map(path):
    """Input sections and symbols of the text output sections of an lld map."""
    sections, symbols, hot = [], [], None
    current = None
    for line in open(path, encoding="utf-8", errors="replace"):
        m = LINE.match(line.rstrip("\n"))
        if not m:
            continue
        addr, size, indent, rest = int(m.group(1), 16), int(m.group(3), 16), m.group(5), m.group(6)
        if not indent:  # an output section
            current = rest if rest in TEXT_OUTPUTS else None
            if rest == ".text.hot":
                hot = (addr, addr + size)
            continue
        if current is None:
            continue
        s = re.match(r"(.*):\((\.text[^)]*)\)$", rest)
        if s:
            sections.append((addr, size, s.group(1), s.group(2)))
        elif ":(" not in rest:
            symbols.append(addr)
    sections.sort()
    return sections, sorted(set(symbols)), hot


class Sections:
    def __init__(self, sections):
        self.sections = sections
        self.starts = [s[0] for s in sections]

    def index(self, addr):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.sections[i][0] + max(self.sections[i][1], 1):
            return i
        return None


def glob_section(name):
    """A section name of the LTO object with its build-specific parts as `*`."""
    s, tail = name, ""
    s = re.sub(r"17h[0-9a-f]{16}E", "17h*E", s)  # legacy mangling's hash
    m = re.search(r"\.(\d+|llvm\.\d+)$", s)  # LLVM's uniquing suffixes
    if m:
        s, tail = s[: m.start()], "*"
    if "._R" in s:
        s = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", s)  # crate disambiguators
        s = re.sub(r"B[0-9A-Za-z]*_", "B*_", s)  # back-references (offsets)
        # The instantiating crate of a shared generic: whichever copy LTO keeps.
        m = re.search(r"Cs\*_(\d+)([A-Za-z_][A-Za-z0-9_]*)$", s)
        if m and len(m.group(2)) == int(m.group(1)):
            s, tail = s[: m.start()], "*"
    return re.sub(r"\*+", "*", s + tail)


def pattern(file, section):
    if file.endswith(".rcgu.o"):  # the LTO object: Rust, one function a section
        return f"*({glob_section(section)})"
    m = re.match(r".*/([^/(]+)\(([^)]+)\)$", file)
    if m:  # archive member: libc.a(malloc.o), lib*-<hash>.rlib(x.o)
        archive = re.sub(r"-[0-9a-f]{16}\.rlib$", "-*.rlib", m.group(1))
        return f"*{archive}:{m.group(2)}({section})"
    if file.endswith(".o"):
        return f"*{os.path.basename(file)}({section})"
    return None


def role(comm):
    if comm.startswith("youki:[1"):
        return "intermediate"
    if comm.startswith("youki:[2"):
        return "init"
    return "cli"


def load_traces(directory, secs):
    """{section index: set of (scenario-command, role)}"""
    used = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".trace"):
            continue
        key = name[: -len(".trace")]
        for line in open(os.path.join(directory, name)):
            parts = line.split()
            if len(parts) != 3:
                continue
            i = secs.index(int(parts[2], 16))
            if i is not None:
                used.setdefault(i, set()).add((key, role(parts[1])))
    return used


def bench(tags, command):
    return ("bench-" + command, "cli") in tags


GROUPS = [
    # The benchmark's three CLI calls first, shared code in the middle of
    # them, so that each call's code is one compact run.
    ("create, start and delete", lambda t: all(bench(t, c) for c in ("create", "start", "delete"))),
    ("create and start", lambda t: bench(t, "create") and bench(t, "start")),
    ("create and delete", lambda t: bench(t, "create") and bench(t, "delete")),
    ("create", lambda t: bench(t, "create")),
    ("create: intermediate process", lambda t: ("bench-create", "intermediate") in t),
    ("create: container init", lambda t: ("bench-create", "init") in t),
    ("start", lambda t: bench(t, "start")),
    ("delete", lambda t: bench(t, "delete")),
    ("state, exec, kill, features", lambda t: True),
]


def write_script(map_path, traces, out_path):
    sections, _, _ = parse_map(map_path)
    secs = Sections(sections)
    used = load_traces(traces, secs)
    placed, seen, groups = set(), set(), []
    for title, wanted in GROUPS:
        pats, size = set(), 0
        for i, tags in used.items():
            if i in placed or not wanted(tags):
                continue
            p = pattern(sections[i][2], sections[i][3])
            if p is None:
                continue
            placed.add(i)
            size += sections[i][1]
            if p not in seen:
                seen.add(p)
                pats.add(p)
        groups.append((title, sorted(pats), size))
    with open(out_path, "w") as f:
        f.write(
            "/* Generated by scripts/hot-text.sh from traces of bosun-runc: do not edit.\n"
            " * The functions each command runs, first in the text segment, so that a\n"
            " * call maps a few hundred KB of the binary instead of nearly all of it\n"
            " * (the kernel maps 64 KB around every page fault). Patterns that match\n"
            " * nothing are harmless; `scripts/hot-text.sh check` reports drift. */\n"
            "SECTIONS\n{\n  .text.hot : {\n"
        )
        for title, pats, size in groups:
            if not pats:
                continue
            f.write(f"    /* {title}: {len(pats)} patterns, {size // 1024} KB */\n")
            for p in pats:
                f.write(f"    {p}\n")
        f.write("  }\n}\nINSERT BEFORE .text;\n")
    for title, pats, size in groups:
        print(f"  {title}: {len(pats)} patterns, {size // 1024} KB")


def check(map_path, traces):
    """Executed code of the benchmark's commands that is not in .text.hot."""
    sections, _, hot = parse_map(map_path)
    if hot is None:
        print("  no .text.hot in the map: runtime/hot-text.ld was not applied")
        return False
    secs = Sections(sections)
    used = load_traces(traces, secs)
    ok = True
    for command in ("create", "start", "delete"):
        cold = sorted(
            (sections[i][1], sections[i][0], sections[i][3])
            for i, tags in used.items()
            if bench(tags, command) and not hot[0] <= sections[i][0] < hot[1]
        )
        # What it costs: the kernel maps the 64 KB around each.
        windows = {addr // WINDOW for _, addr, _ in cold}
        print(
            f"  {command}: {len(cold)} executed sections outside .text.hot, "
            f"{sum(s for s, _, _ in cold)} bytes in {len(windows)} 64 KB windows"
        )
        for size, _, name in cold[-5:]:
            print(f"    {size:7d} {name[:110]}")
        ok &= len(windows) <= 2
    return ok


def artifacts(path):
    """bosun-runc, bosun-testimage and bosun-runtime's build-script OUT_DIR."""
    found = {}
    for line in open(path):
        msg = json.loads(line)
        reason, exe = msg.get("reason"), msg.get("executable")
        if reason == "build-script-executed" and "#bosun-runtime@" in msg["package_id"]:
            found["out_dir"] = msg["out_dir"]
        if reason == "compiler-artifact" and exe:
            found[os.path.basename(exe)] = exe
    print(found.get("bosun-runc"), found.get("bosun-testimage"), found.get("out_dir"))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "artifacts":
        artifacts(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "addrs":
        _, symbols, _ = parse_map(sys.argv[2])
        with open(sys.argv[3], "w") as f:
            f.writelines(f"{a:x}\n" for a in symbols)
    elif len(sys.argv) == 5 and sys.argv[1] == "script":
        write_script(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "check":
        sys.exit(0 if check(sys.argv[2], sys.argv[3]) else 1)
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
