"""The text summary that build-shards and merge print."""
from __future__ import annotations


def format_summary(s: dict) -> str:
    if s["status"] == "up-to-date":
        return f"{s['out']}: build already complete ({s['clips']} clips in {s['shards']} shards); nothing to do"
    lines = [f"{s['out']}: {s['status']}: {s['clips']} clips (N={s['N']}, T={s['T']}) in {s['shards']} shards "
             f"from {s['inputs_used']}/{s['inputs']} inputs, {s['sequences']} sequences"]
    if s.get("resumed_shards"):
        lines.append(f"  resumed after {s['resumed_shards']} finished shards")
    if s.get("seconds") is not None:
        lines.append(f"  {s['clips_this_run']} clips this run in {s['seconds']:.2f} s ({s['clips_per_s']} clips/s)")
    if s.get("sequences_skipped"):
        lines.append(f"  skipped {len(s['sequences_skipped'])} bad sequences (the rest of their files kept):")
        lines += [f"    {x}" for x in s["sequences_skipped"]]
    if s["skipped"]:
        lines.append(f"  skipped {len(s['skipped'])} inputs:")
        lines += [f"    {x['reason']}" for x in s["skipped"]]
    return "\n".join(lines)
