"""Registers, spills and shared memory of every CUDA kernel, as ptxas reports them (no GPU needed).

    python3 benchmarks/ptxas_report.py                 # markdown table on stdout
    python3 benchmarks/ptxas_report.py --raw out.txt   # also keep ptxas's own log

Compiles ``csrc/cuda/dora_kernels.cu`` the way ``make cuda-compile`` does (``nvcc -O3`` for sm_80 and sm_90)
with ``-Xptxas -v`` and tabulates each kernel per architecture: registers per thread, spill stores/loads
(bytes), stack frame and static shared memory (bytes). A change that makes a kernel spill shows up here.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "90")
TYPES = {"f": "fp32", "d": "fp64", "6__half": "fp16", "13__nv_bfloat16": "bf16"}
ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\d+)'")
PROPERTIES = re.compile(r"Function properties for (?P<name>\S+)")
FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
USED = re.compile(r"Used (?P<regs>\d+) registers")
SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def nvcc_path() -> str:
    found = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if not found:
        sys.exit("ptxas_report: nvcc not found")
    return found


def kernel_name(mangled: str) -> str:
    """``forward_rows<bf16>`` from the mangled entry name: the template's name (a length-prefixed identifier
    followed by ``I``, no digits in it) and its type argument; enough for this file's kernels."""
    for i in range(1, len(mangled)):
        if not (mangled[i - 1].isdigit() and (mangled[i].isalpha() or mangled[i] == "_")):
            continue
        for width in (1, 2):
            digits = mangled[max(i - width, 0) : i]
            if not digits.isdigit():
                continue
            name, rest = mangled[i : i + int(digits)], mangled[i + int(digits) :]
            arg = next((t for t in TYPES if rest.startswith(f"I{t}E")), None)
            if arg is not None and re.fullmatch(r"[A-Za-z_]+", name):
                return f"{name}<{TYPES[arg]}>"
    return mangled


def ptxas_log(source: Path) -> str:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc_path(), "-std=c++17", "-O3", f"-I{ROOT / 'csrc' / 'include'}", *gencode, "-Xptxas", "-v",
               "-c", str(source), "-o", str(Path(tmp) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    return proc.stderr + proc.stdout


def parse(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """(kernel, arch) → regs, stack, stores, loads, smem of each entry function in a ``-Xptxas -v`` log.

    An entry's block names its own "Function properties" and then lists those of the non-inlined device
    functions it calls; only the properties named after the entry are its figures (a callee's later
    0-byte frame must not overwrite the entry's spills)."""
    table: dict[tuple[str, str], dict[str, int]] = {}
    current = None  # (kernel, arch) of the entry being read
    entry_name = properties_of = ""
    for line in log.splitlines():
        if m := ENTRY.search(line):
            entry_name = m.group("name")
            current = (kernel_name(entry_name), m.group("arch"))
            table[current] = {"smem": 0}
        elif m := PROPERTIES.search(line):
            properties_of = m.group("name")
        elif current and properties_of == entry_name and (m := FRAME.search(line)):
            table[current].update({k: int(v) for k, v in m.groupdict().items()})
        elif current and properties_of == entry_name and (m := USED.search(line)):
            table[current]["regs"] = int(m.group("regs"))
            if s := SMEM.search(line):
                table[current]["smem"] = int(s.group("smem"))
    return table


def markdown(table: dict[tuple[str, str], dict[str, int]]) -> str:
    lines = ["| kernel | " + " | ".join(f"sm_{a} regs / spill st+ld / stack / smem" for a in ARCHS) + " |",
             "|---|" + "---|" * len(ARCHS)]
    for name in sorted({k for k, _ in table}):
        cells = []
        for arch in ARCHS:
            e = table.get((name, arch))
            cells.append("–" if e is None else
                         f"{e['regs']} / {e['stores']}+{e['loads']} / {e['stack']} / {e['smem']}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=ROOT / "csrc" / "cuda" / "dora_kernels.cu")
    p.add_argument("--raw", type=Path, help="also write ptxas's log here")
    args = p.parse_args(argv)
    log = ptxas_log(args.source)
    if args.raw:
        args.raw.write_text(log)
    print(markdown(parse(log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
