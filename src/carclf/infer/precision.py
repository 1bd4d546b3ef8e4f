"""Which precision an export's engines run at on the CPU they land on.

An export holds its fp32 graphs and, when asked (``carclf export --precision``), bf16 programs and int8 graphs, each
file with the CPU instructions it needs (``needs`` in export.yaml): bf16 needs AVX512-BF16 or AMX-BF16 (without them
PyTorch emulates bfloat16, slower than fp32); an int8 graph with full 8-bit weights needs VNNI (without it the u8 x s8
products of the AVX2 kernels saturate, so only 7-bit ``reduce_range`` graphs run correctly everywhere). The export
records the precision it chose on its machine; :func:`resolve_precision` keeps that choice where this CPU has the
instructions, and otherwise falls back to fp32 with one clear line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from carclf.artifacts.export import ENGINE_PRECISIONS
from carclf.errors import CarclfError

PRECISIONS = ENGINE_PRECISIONS
# need -> (cpuinfo flags, any one of which is enough; what to call them in a message)
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "bf16": (("avx512_bf16", "amx_bf16"), "AVX512-BF16 or AMX-BF16"),
    "vnni": (("avx512_vnni", "avx_vnni", "amx_int8"), "VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8)"),
}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CarclfError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    return precision


def lacks(need: str | None, flags: Iterable[str]) -> str | None:
    """What the CPU with ``flags`` lacks for a file that ``need``-s an instruction set (None: nothing missing)."""
    if not need:
        return None
    if need not in NEEDS:
        return f"instructions '{need}' this carclf does not know (upgrade carclf)"
    wanted, label = NEEDS[need]
    return None if set(wanted) & set(flags) else label


def cpu_has(need: str | None, flags: Iterable[str]) -> bool:
    return lacks(need, flags) is None


def chosen_precision(doc: dict[str, Any]) -> str:
    """The precision an export chose when it was made (fp32 for an export made before the choice was recorded)."""
    return str((doc.get("precision") or {}).get("chosen", "fp32"))


def _need_of(doc: dict[str, Any], precision: str) -> str | None:
    needs = {e.get("files", {}).get(precision, {}).get("needs") for e in doc["engines"]}
    needs.discard(None)
    return next(iter(sorted(needs)), None)


def resolve_precision(doc: dict[str, Any], requested: str | None, cpu: dict[str, Any],
                      log: Callable[[str], None] = print, source: str = "the export") -> str:
    """The precision to run ``doc``'s engines at here: ``requested`` (None: the export's choice) when every engine
    has that file and this CPU has its instructions; else fp32, said in one line."""
    precision = check_precision(requested) if requested else chosen_precision(doc)
    missing = [e["name"] for e in doc["engines"] if precision not in e.get("files", {})]
    if missing:
        if requested:
            how = "--int8" if precision == "int8" else f"--precision {precision}"
            raise CarclfError(f"{source} has no {precision} file for engine(s) {', '.join(missing)}: export it with "
                              f"{how} (or auto)")
        raise CarclfError(f"{source} chose {precision} but has no {precision} file for engine(s) "
                          f"{', '.join(missing)}: it is incomplete; export it again")
    gap = lacks(_need_of(doc, precision), cpu.get("flags", []))
    if gap is None:
        return precision
    made_on = ((doc.get("precision") or {}).get("cpu") or {}).get("model", "another CPU")
    log(f"warning: the {precision} engines of {source} need {gap}, which this CPU ({cpu.get('model', '?')}) does "
        f"not have (they were chosen on {made_on}): running fp32 instead")
    return "fp32"


__all__ = ["NEEDS", "PRECISIONS", "check_precision", "chosen_precision", "cpu_has", "lacks", "resolve_precision"]
