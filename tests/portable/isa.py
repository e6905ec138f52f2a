"""Which instructions beyond AVX2 a compiled library contains, read from `objdump -d`.

The portable llama.cpp build (scripts/llama-wheel.sh) must run on any x86-64 CPU with AVX2.
AVX-512 code uses the zmm registers, the opmask registers k0-k7 and xmm/ymm16-31 (which only
EVEX encodings reach); AMX code uses the tile registers tmm0-7 and its own mnemonics; VNNI
dot products (AVX-VNNI or AVX512-VNNI) are not in AVX2 either. Any of them in the library is
a SIGILL waiting for the first machine that lacks it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

FORBIDDEN = re.compile(
    r"%zmm\d+"  # AVX-512 registers
    r"|%[xy]mm(?:1[6-9]|2\d|3[01])\b"  # the upper 16 xmm/ymm: EVEX (AVX-512VL) only
    r"|%k[0-7]\b"  # AVX-512 opmask registers
    r"|%tmm\d"  # AMX tile registers
    r"|\b(?:tilezero|ldtilecfg|sttilecfg|tileloadd\w*|tilestored|tilerelease|tdp\w+)\b"
    r"|\bvpdp(?:bu|ws)sds?\b"  # VNNI
)


def objdump() -> str:
    found = shutil.which("objdump")
    if found is None:
        raise RuntimeError("objdump not found: install binutils")
    return found


def forbidden_instructions(library: Path) -> Counter[str]:
    """Every forbidden register or mnemonic in the library's code, with how often it occurs."""
    listing = subprocess.run(
        [objdump(), "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    hits: Counter[str] = Counter()
    for line in listing.splitlines():
        if "\t" not in line:  # labels and headers, not instructions
            continue
        hits.update(FORBIDDEN.findall(line.split("\t", 1)[1]))
    return hits
