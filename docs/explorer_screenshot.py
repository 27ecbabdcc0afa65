"""The README's picture of the photo explorer, drawn from the demo kit, offline, on the CPU.

    .venv/bin/python docs/explorer_screenshot.py            # writes docs/explorer.png

It builds (or reuses) `make demo`'s kit under results/demo/, fits on the kit's CUB the
methods the picture shows that have no checkpoint there yet (two epochs: the kit's CLIP has
random weights, its numbers mean nothing, and the picture carries the demo mark), opens the
explorer on two photos of my_photo/ as an upload of both, and saves the static image it
leaves in a notebook: what a saved notebook shows under the explorer's controls. It also
times the explorer's answers to the slider and the method boxes, as a person drives them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, as `make demo` is


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "explorer.png"), help="PNG to write")
    parser.add_argument("--demo", default=str(ROOT / "results" / "demo"), help="the demo folder (kit/, results/)")
    parser.add_argument("--dataset", default="cub200")
    parser.add_argument("--methods", default="probe,lora", help="fitted methods shown beside the reference")
    parser.add_argument("--photos", default="bird.jpg,flower.png", help="photos of my_photo/ to upload")
    args = parser.parse_args(argv)

    from clip_utils.app.notebooks import demo_env

    env = demo_env(args.demo)
    os.environ.update({"HF_HUB_OFFLINE": "1", "CLIP_DEMO": "1", "CLIP_EPOCHS": "2"})

    import base64

    from clip_utils import registry
    from clip_utils.app.cli import main as cli
    from clip_utils.app.explorer import photo_explorer
    from clip_utils.app.photos import checkpoint_missing
    from clip_utils.lab import Lab

    lab = Lab(model=env["CLIP_MODEL"], data_root=env["CLIP_DATA_ROOT"], results_dir=env["CLIP_RESULTS_DIR"],
              device="cpu", download=False)
    shown = [registry.reference().name, *(registry.get(m).name for m in args.methods.split(",") if m)]
    for name in shown:
        if checkpoint_missing(lab, args.dataset, name):
            print(f"fitting {registry.get(name).label} on the kit's {args.dataset} ...", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli([registry.get(name).command, "--dataset", args.dataset, "--model", lab.model,
                            "--data-root", str(lab.data_root), "--results-dir", str(lab.results_dir),
                            "--device", "cpu", "--no-download"])
            if code:
                return code

    explorer = photo_explorer(lab, [args.dataset], methods=shown, photo_dir=ROOT / "my_photo")
    files = [ROOT / "my_photo" / name for name in args.photos.split(",")]
    now = dt.datetime.now(dt.timezone.utc)
    explorer.upload.value = tuple({"name": f.name, "type": "image/jpeg", "size": f.stat().st_size,
                                   "content": memoryview(f.read_bytes()), "last_modified": now} for f in files)

    class Handle:  # as in a notebook: every change also redraws the static image
        def update(self, obj, raw=False):
            pass

    explorer._snapshot = Handle()
    timings = {}
    for what, change in ((f"top-k {explorer.top_k.value} -> 3", lambda: setattr(explorer.top_k, "value", 3)),
                         ("top-k 3 -> 8", lambda: setattr(explorer.top_k, "value", 8)),
                         ("top-k 8 -> 5", lambda: setattr(explorer.top_k, "value", 5)),
                         (f"{shown[-1]} off", lambda: setattr(explorer.method_boxes[shown[-1]], "value", False)),
                         (f"{shown[-1]} on", lambda: setattr(explorer.method_boxes[shown[-1]], "value", True))):
        start = time.perf_counter()
        change()
        timings[what] = time.perf_counter() - start
    print(f"explorer answers ({len(files)} photos, {len(shown)} methods, demo mark on):",
          ", ".join(f"{what}: {seconds * 1000:.0f} ms" for what, seconds in timings.items()))
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(explorer.snapshot()["image/png"])))
    image.convert("RGB").quantize(256).save(args.out, optimize=True)  # a third of the size, for the repository
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
