"""Draws docs/architecture.svg, the picture in docs/architecture.md (plain SVG, no dependencies).

Run from the repository root after changing the picture: ``python docs/architecture_svg.py``.
"""

from __future__ import annotations

import os
from xml.sax.saxutils import escape

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.svg")
WIDTH, HEIGHT = 1000, 780
FONT = "font-family='Helvetica, Arial, sans-serif'"
# fill, stroke per layer
COLOURS = {
    "command": ("#eef2ff", "#4f46e5"),
    "core": ("#ecfdf5", "#059669"),
    "plugin": ("#fff7ed", "#ea580c"),
    "train": ("#fdf2f8", "#db2777"),
    "runtime": ("#f1f5f9", "#475569"),
}


def box(x, y, w, h, kind, title, lines=(), dashed=False):
    fill, stroke = COLOURS[kind]
    dash = " stroke-dasharray='6 4'" if dashed else ""
    out = [f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='8' fill='{fill}' stroke='{stroke}' "
           f"stroke-width='1.6'{dash}/>",
           f"<text x='{x + w / 2}' y='{y + 20}' text-anchor='middle' {FONT} font-size='14' font-weight='bold' "
           f"fill='#111827'>{escape(title)}</text>"]
    for i, line in enumerate(lines):
        out.append(f"<text x='{x + w / 2}' y='{y + 39 + 16 * i}' text-anchor='middle' {FONT} font-size='11.5' "
                   f"fill='#374151'>{escape(line)}</text>")
    return out


def arrow(x1, y1, x2, y2, label="", dy=-6):
    out = [f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='#111827' stroke-width='1.4' "
           f"marker-end='url(#head)'/>"]
    if label:
        out.append(f"<text x='{(x1 + x2) / 2}' y='{(y1 + y2) / 2 + dy}' text-anchor='middle' {FONT} "
                   f"font-size='11' fill='#111827'>{escape(label)}</text>")
    return out


def band(y, h, label):
    return [f"<text x='12' y='{y + h / 2}' {FONT} font-size='11' fill='#6b7280' "
            f"transform='rotate(-90 12 {y + h / 2})' text-anchor='middle'>{escape(label)}</text>"]


def picture() -> str:
    parts = ["<defs><marker id='head' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
             "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#111827'/></marker></defs>",
             f"<rect width='{WIDTH}' height='{HEIGHT}' fill='#ffffff'/>",
             f"<text x='{WIDTH / 2}' y='26' text-anchor='middle' {FONT} font-size='17' font-weight='bold' "
             "fill='#111827'>mindone-lora-plugin: layers, plugin kinds and contracts</text>"]
    # commands
    parts += band(45, 70, "commands")
    parts += box(30, 45, 940, 70, "command", "mindone-lora (cli.py → commands/*, train/cli.py, ui/)",
                 ["train · run · convert · inspect · generate · merge · plugins · ui",
                  "integration.py / scripts/: the same operations inside a user's own mindone script"])
    # the three layers
    parts += band(150, 150, "core model")
    parts += box(30, 150, 250, 150, "core", "Model", ["MindSpore cells from mindone", "models.Models: component → cell",
                                                       "adapter layers in the cells", "(algorithm.make_layer)"])
    parts += box(380, 150, 240, 150, "core", "Canonical adapter state",
                 ["state.LoraState (numpy only)", "component → module path →", "LoraModule(algorithm, tensors, alpha)",
                  "+ base_config, metadata"])
    parts += box(720, 150, 250, 150, "core", "File in a named format",
                 ["formats/: diffusers, kohya, a plugin's", "read via formats/reader.py (claims)",
                  "safetensors only (safetensors_io.py)", "names: formats/names.py + family"])
    parts += arrow(280, 205, 380, 205, "strategy.extract")
    parts += arrow(380, 250, 280, 250, "strategy.apply", dy=14)
    parts += arrow(620, 205, 720, 205, "format.write")
    parts += arrow(720, 250, 620, 250, "format.read", dy=14)
    # plugin kinds
    parts += band(335, 165, "plugin kinds")
    parts += box(30, 335, 940, 165, "plugin", "", [])
    parts.append(f"<text x='500' y='355' text-anchor='middle' {FONT} font-size='14' font-weight='bold' "
                 "fill='#111827'>One registry: plugins.py KINDS, built-ins in builtin_plugins.py, "
                 "third parties via entry points</text>")
    kinds = [("Architectures", ["a model family", "architectures/sd/, flux/", "components, detection,",
                                "key prefixes, base config"]),
             ("Strategies", ["where adapters go", "(components, modules,", "rank, alpha)",
                             "strategies/base.py"]),
             ("Algorithms", ["what an adapter is", "(LoRA; LoHa/LoKr plugin)", "tensors, layer, delta",
                             "algorithms/base.py"]),
             ("Formats", ["how a state is stored", "diffusers, kohya", "claim / read / write",
                          "formats/base.py"]),
             ("Training features", ["EMA, validation loss,", "caches, buckets, captions,", "masks, samples, cadence",
                                    "train/features/base.py"])]
    for i, (title, lines) in enumerate(kinds):
        parts += box(45 + i * 184, 370, 170, 115, "plugin", title, lines)
    # trainer and contracts
    parts += band(535, 130, "training")
    parts += box(30, 535, 290, 130, "train", "Family contract",
                 ["Architecture (architectures/base.py)", "load_training_parts → TrainingParts",
                  "make_loss · model_inputs (TrainingContext)", "training_pipeline · text_conditioner"])
    parts += box(385, 535, 290, 130, "train", "Trainer (train/trainer.py)",
                 ["flags checked first (train/flags/checks.py)", "the loop: step, checkpoints, resume",
                  "LoRA only through the operation hooks", "(core_plugin.py: the core plugin)"])
    parts += box(740, 535, 230, 130, "train", "Feature contract",
                 ["TrainingFeature (features/base.py)", "check · setup · after_step",
                  "checkpoint · resume · finish", "sees the run as FeatureRun"])
    parts += arrow(385, 600, 320, 600, "asks")
    parts += arrow(675, 600, 740, 600, "calls")
    # runtime
    parts += band(700, 60, "runtime")
    parts += box(30, 700, 940, 60, "runtime",
                 "runtime/: process.py (versions, context, quiet start) · precision · recompute · cpu/ (CPU backend)",
                 ["cpu/: kernels.py, rng.py, attention.py, transformer.py (FLUX.1) replace the mint primitives "
                  "MindSpore's CPU target lacks; install.py puts them in place"])
    body = "\n".join(parts)
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
            f"viewBox='0 0 {WIDTH} {HEIGHT}'>\n{body}\n</svg>\n")


def main() -> None:
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(picture())
    os.replace(tmp, OUT)
    print(OUT)


if __name__ == "__main__":
    main()
