"""SLURM's compressed host lists (``node[01-04,07],gpu-a1``) expanded to host names.

``scontrol show hostnames`` does this too, but it needs the SLURM client inside every task; the rendezvous address
is needed before anything else runs, so parse it here. Zero padding is kept (``n[08-10]`` → n08, n09, n10) and
several bracket groups multiply out (``r[1-2]-n[1-2]`` → r1-n1, r1-n2, r2-n1, r2-n2), as SLURM does.
"""

from __future__ import annotations


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` → ``a[1,2]``, ``b``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in host list {what!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {what!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in host list {what!r}")
    parts.append(text[start:])
    return parts


def _expand_range(item: str, what: str) -> list[str]:
    """``07`` → [07]; ``01-04`` → [01, 02, 03, 04] with the width of the lower bound (SLURM's rule)."""
    lo, sep, hi = item.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise ValueError(f"bad range {item!r} in host list {what!r}")
    if not sep:
        return [lo]
    if int(hi) < int(lo):
        raise ValueError(f"descending range {item!r} in host list {what!r}")
    width = len(lo)
    return [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]


def _expand_one(name: str, what: str) -> list[str]:
    open_at = name.find("[")
    if open_at < 0:
        return [name]
    close_at = name.index("]", open_at)  # balanced: checked by _split_top_level
    prefix, body, rest = name[:open_at], name[open_at + 1:close_at], name[close_at + 1:]
    if not body:
        raise ValueError(f"empty brackets in host list {what!r}")
    values = [v for item in body.split(",") for v in _expand_range(item, what)]
    tails = _expand_one(rest, what)  # further bracket groups multiply out
    return [prefix + v + tail for v in values for tail in tails]


def expand_hostlist(hostlist: str) -> list[str]:
    """All host names of a SLURM host list, in order. Raises ValueError on a malformed list."""
    text = hostlist.strip()
    if not text:
        raise ValueError("empty host list")
    hosts: list[str] = []
    for part in _split_top_level(text, hostlist):
        if not part:
            raise ValueError(f"empty host name in host list {hostlist!r}")
        hosts.extend(_expand_one(part, hostlist))
    return hosts


def first_host(hostlist: str) -> str:
    """The first host of a host list: where rank 0 runs and the rendezvous listens. The whole list is checked."""
    return expand_hostlist(hostlist)[0]
