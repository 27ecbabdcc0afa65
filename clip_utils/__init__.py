"""clip_utils: adapt CLIP-style models to fine-grained image classification (Flowers102, CUB-200-2011, ...).

    from clip_utils.lab import Lab
    from clip_utils.methods.zeroshot import run_zeroshot
    run_zeroshot(Lab(), "flowers102", ["domain", "auto"])

The subpackages are the layers (DESIGN.md, Architecture, has the table; tests/test_architecture.py
enforces it): building blocks (`config`, `errors`, `registry`, `metrics`), `runtime`, `prompts`,
`data`, `model`, `figures`, `results`, `lab`, `methods` (one module per registered method),
`testkit`, `app` (the CLI, notebooks runner, photos, explorer, export, sweep, report, bench).
"""

__version__ = "0.1.0"
