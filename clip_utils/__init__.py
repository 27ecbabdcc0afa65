"""clip_utils: adapt CLIP to fine-grained image classification (Flowers102, CUB-200-2011).

Modules, one concern each: `data` (datasets), `models` (CLIP loading, preprocessing, the
classifier), `features` (image encoding and its cache), `prompts` and `zeroshot`,
`metrics`, `train` (the training loop shared by the linear probe and LoRA), `lora`,
`vram`, `plots`, `photos`, `report`, `results` (layout, atomic writes), `lab` (run
context), `cli`, `notebooks` (headless execution), `params` (notebook parameters from
`CLIP_*` variables), `testkit` (offline tiny CLIP and synthetic datasets), `bench` (speed
benchmark).
"""

__version__ = "0.1.0"
