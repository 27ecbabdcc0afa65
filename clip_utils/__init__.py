"""clip_utils: adapt CLIP to fine-grained image classification (Flowers102, CUB-200-2011).

    from clip_utils.lab import Lab
    from clip_utils.zeroshot import run_zeroshot
    run_zeroshot(Lab(), "flowers102", ["domain", "auto"])

Layers, imports pointing down only (a test fails on any cycle):

- building blocks, no files: `config` (settings and every default), `methods` (the method
  table), `params`, `progress`, `templates`, `waffle` (WaffleCLIP's descriptors), `prompts`,
  `descriptions` (CuPL/DCLIP files as a prompt set), `preprocess`, `heads`, `metrics`;
- loading and encoding: `net`, `data`, `models`, `inputs` (the GPU input path), `features`
  (embeddings and their cache), `train` (the loop), `vram`;
- files and figures: `results`, `checkpoints`, `evaluation`, `plots`;
- the run context: `lab`, and `runs` (what the trained methods share);
- method support: `clip_lora` (CLIP's own classifier for text-adapted LoRA, adapter loading);
- the methods, peers: `zeroshot`, `probe`, `lora`;
- on top: `photos`, `export` (a self-contained classifier folder), `report`, `cli`,
  `notebooks`, `testkit`, `bench`.
"""

__version__ = "0.1.0"
