"""Speed knobs: thresholds and distances that choose among loops computing the
same bits (see bncy/kernels/knobs.pxi), derived at import from this machine's
caches.

Sizes come from sysfs (``/sys/devices/system/cpu/cpu0/cache``), else from
``os.sysconf``, else from the fallback below. L2 here is the L2 of all the cores
that share the L3 (the data of one call is spread over them). The environment
variable ``BNCY_KNOBS`` (``name=value,name=value``, integers) overrides any knob
at import; :func:`bncy.set_knobs` at run time. No knob changes a result.
"""

from __future__ import annotations

import os

#: Cache sizes (bytes) when the machine does not say: L1d per core, L2 of the
#: cores sharing the L3, L3; and the L1d's associativity (lines per set).
FALLBACK = {"l1": 32 << 10, "l2": 1 << 20, "l3": 32 << 20, "l1_ways": 8,
            "l2_core": 512 << 10}

#: Knobs that are not cache sizes: prefetch distances, the narrow-row widths of
#: the elementwise passes, the run length below which they take the rows
#: schedule, and (bncy._api) the smallest call that starts threads.
FIXED = {"pf_bytes": 4096, "mom_pf_bytes": 16384, "mom_max_row": 4096,
         "ew_rows_max_run": 32, "flat_row": 256, "flat_row_grad": 128,
         "small_work": 1 << 15}


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _cpus(text: str) -> int:
    """How many CPUs a sysfs list such as '0-3,8' names."""
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict:
    """{'l1', 'l2', 'l3'} in bytes for this machine, 'l1_ways' (the L1d's
    associativity, FALLBACK's when not given), 'l2_core' (one core's L2) and
    'source'."""
    found = {}
    try:
        for entry in sorted(os.listdir(root)):
            if not entry.startswith("index"):
                continue
            d = os.path.join(root, entry)
            with open(os.path.join(d, "level")) as fh:
                level = int(fh.read())
            with open(os.path.join(d, "type")) as fh:
                kind = fh.read().strip()
            with open(os.path.join(d, "size")) as fh:
                size = _size(fh.read())
            if kind == "Instruction" or level not in (1, 2, 3):
                continue
            found[f"l{level}"] = (size, d)
            if level == 1:
                try:
                    with open(os.path.join(d, "ways_of_associativity")) as fh:
                        found["l1_ways"] = (int(fh.read()), d)
                except (OSError, ValueError):
                    pass
    except (OSError, ValueError):
        found = {}
    if {"l1", "l2", "l3"} <= found.keys():
        # L2 is per core: count it once for each core that shares the L3
        try:
            with open(os.path.join(found["l3"][1], "shared_cpu_list")) as fh:
                l3_cpus = _cpus(fh.read())
            with open(os.path.join(found["l2"][1], "shared_cpu_list")) as fh:
                l2_cpus = _cpus(fh.read())
        except (OSError, ValueError):
            l3_cpus = l2_cpus = 1
        ways = found["l1_ways"][0] if "l1_ways" in found else 0
        return {"l1": found["l1"][0], "l2": found["l2"][0] * max(1, l3_cpus // l2_cpus),
                "l3": found["l3"][0], "l1_ways": ways or FALLBACK["l1_ways"],
                "l2_core": found["l2"][0], "source": "sysfs"}
    try:
        sizes = {k: os.sysconf(f"SC_LEVEL{n}_{'D' if n == 1 else ''}CACHE_SIZE")
                 for k, n in (("l1", 1), ("l2", 2), ("l3", 3))}
        if all(v > 0 for v in sizes.values()):
            ways = os.sysconf("SC_LEVEL1_DCACHE_ASSOC")
            return {**sizes, "l1_ways": ways if ways > 0 else FALLBACK["l1_ways"],
                    "l2_core": sizes["l2"], "source": "sysconf"}
    except (AttributeError, ValueError, OSError):
        pass
    return {**FALLBACK, "source": "fallback"}


#: A threshold no array reaches: the loop it gates is off.
OFF = 1 << 62


def derive(c: dict, avx512: bool = True) -> dict:
    """The knobs for caches c ({'l1', 'l2', 'l3', 'l2_core'} bytes, 'l1_ways') on a
    CPU with or without AVX-512.

    Loops that won on a CPU with AVX-512 (Zen 5) lost on one without (Zen 3)
    with the same cache sizes, so AVX-512 stands in for the core generation
    there (docs/tuning.md). Without it: grad_input takes whole rows while its
    coefficients fit half a core's L2 (chunks beyond), its rows twin takes only
    rows whose coefficients exceed coef_l1, and the float32 planes grad_input
    hints are off."""
    l1, l2, l3 = c["l1"], c["l2"], c["l3"]
    l2_core = c.get("l2_core", FALLBACK["l2_core"])
    ways = c.get("l1_ways", FALLBACK["l1_ways"])
    coef_l1 = 3 * l1 // 4
    return {
        "beyond_l2": l2,               # prefetch hints pay once arrays leave L2
        "wide_f64_bytes": l2,          # float64 calls up to L2 run on AVX-512
        "coef_l1": coef_l1,            # per-column coefficients that stay in L1
        "l1_ways": ways,               # chunked groups fill at most one set's lines
        # grad_input prefetches rows whose five coefficient vectors fill
        # L1/2..L1 (coef_l1..L1 without AVX-512) whole ...
        "gi_coef_min": l1 // 2 if avx512 else coef_l1,
        "gi_coef_max": l1,
        "gi_min_bytes": l3 // 2,       # ... in arrays beyond half of L3
        "mom_min_bytes": 3 * l3 // 4,  # rows moments prefetch beyond 3/4 of L3
        "group_bytes": l3 // 8,        # backward channel groups re-read from L3
        "gi_planes_min_bytes": l2 if avx512 else OFF,
        # grad_input's chunks: beyond coef_l1 (without AVX-512: L2_core / 2)
        "gi_chunk_coef": coef_l1 if avx512 else l2_core // 2,
        **FIXED,
    }


def from_env(text: str, names) -> dict:
    """BNCY_KNOBS parsed: {name: int}; ValueError for a bad entry."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in names:
            raise ValueError(f"bncy: BNCY_KNOBS: unknown or malformed entry {item!r}; "
                             f"knobs are {sorted(names)}")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"bncy: BNCY_KNOBS: {name} must be an integer, "
                             f"got {value!r}") from None
        if out[name] < 0:
            raise ValueError(f"bncy: BNCY_KNOBS: {name} must be >= 0, got {out[name]}")
    return out
