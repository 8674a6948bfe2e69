"""``mindone-lora plugins [--json]``: installed plugins, their strategies, formats, algorithms and architectures."""

from __future__ import annotations

import json


def add_parser(subparsers):
    p = subparsers.add_parser("plugins",
                              help="list installed plugins, strategies, formats, algorithms and architectures",
                              description="List installed plugins (distribution and version), strategies, formats, "
                                          "adapter algorithms and model architectures.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args) -> int:
    from mindone_lora_plugin.plugins import get_plugin_manager

    info = get_plugin_manager().describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("Plugins:")
    for p in info["plugins"]:
        kind = "built-in" if p["builtin"] else "third-party"
        print(f"  {p['name']:<16} {p['distribution']} {p['version']} ({kind})")
    for b in info["broken"]:
        print(f"  {b['name']:<16} BROKEN: {b['error']}")
    print("Strategies:")
    for s in info["strategies"]:
        print(f"  {s['name']:<16} {s['description']}  [{s['plugin']}]")
    print("Formats:")
    for f in info["formats"]:
        print(f"  {f['name']:<16} {f['description']}  [{f['plugin']}]")
    print("Algorithms:")
    for a in info["algorithms"]:
        print(f"  {a['name']:<16} {a['description']}  [{a['plugin']}]")
    print("Architectures:")
    for a in info["architectures"]:
        print(f"  {a['name']:<16} {a['description']}  [{a['plugin']}]")
    return 0
