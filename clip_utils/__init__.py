"""clip_utils: adapt CLIP to fine-grained image classification (Flowers102, CUB-200-2011, ...).

    from clip_utils.lab import Lab
    from clip_utils.methods.zeroshot import run_zeroshot
    run_zeroshot(Lab(), "flowers102", ["domain", "auto"])

Layers, imports pointing down only (a test fails on any cycle):

- building blocks, no files: `config` (settings and every default), `methods` (the method
  table), `params`, `progress`, `templates`, `waffle` (WaffleCLIP's descriptors), `classnames`,
  `preprocess`, `heads`, `logreg` (the L-BFGS probe), `metrics`, `distributed` (torchrun's process group);
- datasets: `imagelist` (`ImageListDataset`, `DatasetSpec`), the declarations `benchmarks`
  (with `tvdata`), `cub` and `imagefolder`, the registry `data`, `prompts` and `descriptions`
  (CuPL/DCLIP files as a prompt set);
- loading and encoding: `net`, `models`, `inputs` (the GPU input path), `features`
  (embeddings and their cache), `train` (the loop), `vram`;
- files and figures: `results`, `fewshot` (the K-shot draw and run folders), `checkpoints`,
  `evaluation`, `plots`, `charts`;
- the run context: `lab`, and `runs` (what the trained methods share);
- method support: `clip_lora` (CLIP's own classifier for text-adapted LoRA, adapter loading);
- the methods, peers: `zeroshot`, `probe`, `lora`;
- on top: `photos`, `explorer`, `export` (a self-contained classifier folder), `sweep` (the
  few-shot grid), `report`, `cli`, `notebooks`, `testkit` (and `testkit_benchmarks`), `bench`.
"""

__version__ = "0.1.0"
